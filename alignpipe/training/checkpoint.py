"""The policy on disk: loading it for training (LoRA, reward head), checkpoints, the final folder.

Checkpoints of a training run are written atomically into the stage's partial folder (`.OUT.partial/`):

    checkpoint-000012/
        trainable.safetensors   every parameter with requires_grad (the full model, or only the adapter
                                and any trained head with LoRA); frozen weights are reloaded from the inputs
        optimizer.pt            AdamW state (torch.save of tensors and numbers; loaded with weights_only)
        scheduler.pt            learning-rate schedule state
        rng-R.pt                python and torch (CPU, CUDA) RNG states of rank R
        state.json              step, next batch index, metrics so far, world size, file sizes (written last)

The folder is written as `checkpoint-STEP.tmp` and renamed when whole, so a killed run leaves either the
previous checkpoint or the new one; leftover `.tmp` folders are removed by `StageOutput`. Only the newest
checkpoint is kept. Weights and optimizer state are gathered as full (unsharded) state dicts keyed by
parameter name with `torch.distributed.checkpoint.state_dict`, the same for one process, DDP and FSDP (a
collective: every rank calls it); every rank writes its RNG state, rank 0 the rest, and renames after a
barrier. A checkpoint resumes under another number of processes too (ranks without an RNG file start fresh).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.data.manifest import TRAINER_STATE

_NAME = re.compile(r"^checkpoint-(\d+)$")


def _noop() -> None:
    return None


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _full(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_trainable(module) -> dict:
    """name -> full CPU copy of every trainable parameter (on rank 0; {} on other ranks under FSDP).
    A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_full(cpu_offload=True, ignore_frozen_params=True))
    return {k: v.detach().contiguous().clone() for k, v in state.items()}  # clone: tied weights share memory


def set_trainable(module, state: dict, where) -> None:
    """Load a full trainable state dict into `module` (sharded or not); every trainable name must be there."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    names = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(names - set(state))
    if missing:
        raise _damaged(where, f"its parameters do not match the model being trained (missing {missing[:2]})")
    set_model_state_dict(module, state, options=_full(strict=False))


def save_checkpoint(partial: Path, step: int, module, optimizer, scheduler, state: dict, *, rank: int = 0,
                    world: int = 1, barrier=_noop) -> Path:
    """Write checkpoint-STEP atomically (all ranks call this); returns its path."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    final = Path(partial) / f"checkpoint-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    weights = gather_trainable(module)
    optim = get_optimizer_state_dict(module, optimizer, options=_full(cpu_offload=True))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        body = {**state, "step": step, "world_size": world, "files": files}
        (tmp / "state.json").write_text(json.dumps(body, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(partial):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def checkpoints(partial: Path) -> list[Path]:
    """Finished checkpoint folders under `partial`, oldest first."""
    found = [p for p in Path(partial).glob("checkpoint-*") if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(partial: Path) -> Path | None:
    found = checkpoints(partial) if Path(partial).is_dir() else []
    return found[-1] if found else None


def _damaged(path: Path, what: str) -> UserError:
    if Path(path).name == TRAINER_STATE:  # a finished policy's state (alignpipe.training.continuation)
        return UserError(f"--continue-from: trainer state {path}: {what}; retrain that policy, or drop "
                         f"--continue-from to start a fresh optimiser")
    return UserError(f"checkpoint {path}: {what}; delete that folder to start over (or rerun with --force)")


def read_state(path: Path) -> dict:
    """state.json of a checkpoint, after checking that every file it lists is whole."""
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        raise _damaged(path, "has no state.json (incomplete)")
    except (OSError, ValueError) as e:
        raise _damaged(path, f"state.json is unreadable ({type(e).__name__})")
    for name, size in state.get("files", {}).items():
        f = path / name
        have = f.stat().st_size if f.exists() else None
        if have != size:
            found = "missing" if have is None else f"truncated ({have} of {size} bytes)"
            raise _damaged(path, f"{name} is {found}")
    return state


def _torch_load(path: Path, file: str):
    import torch

    try:
        return torch.load(path / file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _damaged(path, f"cannot read {file} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def _load_trainable(path: Path, module) -> None:
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path / "trainable.safetensors"))
    except Exception as e:
        raise _damaged(path, f"cannot read trainable.safetensors ({type(e).__name__})")
    set_trainable(module, saved, path)


def load_checkpoint(path: Path, module, optimizer, scheduler, *, rank: int = 0) -> dict:
    """Restore trainable weights (when the folder has them), optimizer, scheduler and this rank's RNG; return
    the state dict. Also reads a policy's `trainer_state/` (alignpipe.training.continuation)."""
    path = Path(path)
    state = read_state(path)
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if "trainable.safetensors" in state.get("files", {}):  # a trainer state has none: the policy has them
        _load_trainable(path, module)
    try:
        set_optimizer_state_dict(module, optimizer, _torch_load(path, "optimizer.pt"), options=_full())
        scheduler.load_state_dict(_torch_load(path, "scheduler.pt"))
    except (ValueError, KeyError, RuntimeError) as e:
        raise _damaged(path, f"optimizer/scheduler state does not fit ({str(e).splitlines()[0][:120]})")
    rng = path / f"rng-{rank}.pt"
    if rng.exists():  # absent when resuming with more processes than wrote it: that rank starts fresh
        set_rng_state(_torch_load(path, rng.name))
    return state


def resume(partial: Path, module, optimizer, scheduler, *, rank: int = 0, require: bool = False):
    """(steps done, metrics so far, checkpoint path) from the newest checkpoint under `partial`, or a fresh
    start (0, [], None); `require` (--resume) makes a missing checkpoint an error."""
    found = latest_checkpoint(partial)
    if found is None:
        if require:
            raise UserError(f"--resume: no checkpoint under {partial} for these inputs and options")
        return 0, [], None
    state = load_checkpoint(found, module, optimizer, scheduler, rank=rank)
    return int(state["step"]), list(state.get("metrics", [])), found


# ------------------------------------------------------------------------------------ the policy to train
@dataclass
class LoraOptions:
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: list | None = None  # None: every linear layer except the output head ("all-linear")


def _architectures(path) -> list[str]:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return []


def _load_reward_policy(path, init_reward_head: bool):
    """A 1-output sequence classifier from a reward-model folder, or from a causal LM with a fresh head."""
    from alignpipe.models.loading import check_model_folder, is_adapter, load_reward_model

    path = check_model_folder(path, "policy")  # a Hub id: its snapshot folder
    archs = _architectures(path)
    if is_adapter(path):
        raise UserError(f"policy {path}: reward models are trained from full model folders, not adapters")
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return load_reward_model(path)
    if not init_reward_head:
        raise UserError(f"policy {path}: is a {archs[0] if archs else 'model'}, not a reward model "
                        f"(*ForSequenceClassification); pass --init-reward-head to add a new score head")
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights newly initialised": that is the point
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                                  use_safetensors=True)
    finally:
        logging.set_verbosity(verbosity)


def apply_lora(model, lora: LoraOptions, task: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules) if lora.target_modules else "all-linear",
                        task_type="SEQ_CLS" if task in ("reward", "value") else "CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"--target-modules: {str(e).splitlines()[0][:200]}")


def is_peft(module) -> bool:
    return hasattr(module, "disable_adapter") and hasattr(module, "peft_config")


def frozen(model):
    """A model as a reference: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(module):
    """The initial policy as a frozen reference (call before training or loading a checkpoint)."""
    import copy

    return frozen(copy.deepcopy(module))


def _check_same_adapter(path, lora: LoraOptions | None) -> None:
    if lora is None:
        return
    have = json.loads((Path(path) / "adapter_config.json").read_text())
    if have.get("r") != lora.r:
        raise UserError(f"policy {path}: is a LoRA adapter of rank {have.get('r')}, not --lora-r {lora.r}; "
                        f"it keeps training its own adapter (drop --lora-r, or start from its base model)")


def load_policy(path, task: str, *, lora: LoraOptions | None = None, init_reward_head: bool = False,
                gradient_checkpointing: bool = False):
    """(model, tokenizer): float32 master weights on the CPU, with a new LoRA adapter when `lora` is given.
    An adapter folder keeps training its own adapter (on its base model): the online loop's iteration k+1
    continues iteration k's adapter; `lora`, if given, must then agree with the adapter's rank."""
    from alignpipe.models.loading import check_model_folder, is_adapter, load_causal_lm, load_tokenizer

    path = check_model_folder(path, "policy")  # a Hub id: its snapshot folder
    tokenizer = load_tokenizer(path)
    if task == "reward":
        model = _load_reward_policy(path, init_reward_head)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    elif task == "value":  # PPO's critic: a value model, or a causal LM with a new zero value head
        from alignpipe.models.values import load_value_model

        model, _ = load_value_model(path, pad_token_id=tokenizer.pad_token_id, what="policy (critic)")
    else:
        model = load_causal_lm(path, trainable_adapter=True)
    if is_adapter(path):
        _check_same_adapter(path, lora)
        lora = None
    model.config.use_cache = False
    if gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora is not None:
        model = apply_lora(model, lora, task)
    return model, tokenizer


# ------------------------------------------------------------------------------------- the final policy
def save_policy(module, tokenizer, folder, *, base_path=None, merge: bool = False,
                dtype: str = "float32") -> str:
    """Write the trained policy into `folder`: an adapter folder (base_model_name_or_path = the absolute base
    path, or the base's Hub id), merged full weights, or the full model; tokenizer beside it. Returns what was written."""
    import torch

    what = "model"
    peft = is_peft(module)
    if peft and merge:
        module, what = module.merge_and_unload(), "merged"
    elif peft:
        for cfg in module.peft_config.values():
            if base_path is not None:  # a local base as an absolute path, a Hub id as it was named
                local = Path(base_path).exists()
                cfg.base_model_name_or_path = str(Path(base_path).resolve()) if local else str(base_path)
        what = "adapter"
    if dtype != "float32":
        module = module.to(getattr(torch, dtype))
    module.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if what == "adapter":
        _sort_target_modules(Path(folder) / "adapter_config.json")
    return what


def _sort_target_modules(config: Path) -> None:
    """PEFT writes `target_modules` (a set) in a per-process order: sorted, the same adapter is the same bytes."""
    data = json.loads(config.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True))
