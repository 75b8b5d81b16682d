"""Checkpoints of a training run, written atomically into the stage's partial folder (`.OUT.partial/`).

    checkpoint-000012/
        trainable.safetensors   every parameter with requires_grad (the full model, or only the adapter
                                and any trained head with LoRA); frozen weights are reloaded from the inputs
        optimizer.pt            AdamW state (torch.save of tensors and numbers; loaded with weights_only)
        scheduler.pt            learning-rate schedule state
        rng-R.pt                python and torch (CPU, CUDA) RNG states of rank R
        state.json              step, next batch position, metrics so far, world size, file sizes; written last

The folder is written as `checkpoint-STEP.tmp` and renamed when whole, so a killed run leaves either the
previous checkpoint or the new one; leftover `.tmp` folders are removed by `StageOutput`. Only the newest
checkpoint is kept. Under several processes every rank writes its RNG state, rank 0 writes the rest
(model and optimizer are replicated under DDP), and rank 0 renames after a barrier.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from alignpipe.errors import UserError

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


def trainable_state(module) -> dict:
    """name -> detached CPU copy of every trainable parameter."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(partial: Path, step: int, module, optimizer, scheduler, state: dict, *, rank: int = 0,
                    world: int = 1, barrier=_noop) -> Path:
    """Write checkpoint-STEP atomically (all ranks call this); returns its path."""
    import torch
    from safetensors.torch import save_file

    final = Path(partial) / f"checkpoint-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")
    barrier()
    if rank == 0:
        save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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
    return UserError(f"checkpoint {path}: {what}; delete that folder to start the run over (or rerun with --force)")


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
    import torch
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path / "trainable.safetensors"))
    except Exception as e:
        raise _damaged(path, f"cannot read trainable.safetensors ({type(e).__name__})")
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        diff = sorted(set(saved) ^ set(params))[:3]
        raise _damaged(path, f"its parameters do not match the model being trained (e.g. {diff})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))


def load_checkpoint(path: Path, module, optimizer, scheduler, *, rank: int = 0) -> dict:
    """Restore trainable weights, optimizer, scheduler and this rank's RNG; return the state dict."""
    path = Path(path)
    state = read_state(path)
    _load_trainable(path, module)
    try:
        optimizer.load_state_dict(_torch_load(path, "optimizer.pt"))
        scheduler.load_state_dict(_torch_load(path, "scheduler.pt"))
    except (ValueError, KeyError, RuntimeError) as e:
        raise _damaged(path, f"optimizer/scheduler state does not fit this run ({str(e).splitlines()[0][:120]})")
    rng = path / f"rng-{rank}.pt"
    if rng.exists():  # absent when resuming with more processes than wrote it: that rank starts fresh
        set_rng_state(_torch_load(path, rng.name))
    return state
