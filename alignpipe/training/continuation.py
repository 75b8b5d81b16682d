"""One optimisation across iterations: a policy's trainer state, and `train --continue-from` starting from it.

Every `train` writes, beside the policy it saves, the optimiser state of its last step:

    POLICY/trainer_state/
        optimizer.pt    AdamW moments and step counts (keyed by parameter name, as checkpoints keep them)
        scheduler.pt    the learning-rate schedule's position (its global step)
        rng-R.pt        python and torch RNG states of rank R after the last step
        state.json      global step, world size, the optimiser settings, the trainable parameters' shapes,
                        and the file sizes (written last)

It is a checkpoint (alignpipe.training.checkpoint) without the weights, which the policy folder itself holds;
loading the model never reads it, fingerprints leave it out (alignpipe.data.manifest) and a `--merge` output
has none (its weights are no longer the adapter the moments belong to).

`--continue-from PREV` takes the policy's weights from `--policy` as always, and the moments, the schedule
position and the RNG from PREV's trainer state, so K trains over B1..BK equal one train over B1..BK: AdamW's
update at global step t is

    m_t = b1 m_{t-1} + (1 - b1) g_t,   v_t = b2 v_{t-1} + (1 - b2) g_t^2,
    theta_t = theta_{t-1} - lr_t (m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps) + wd theta_{t-1})

(Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019): it depends on m, v and t, which a fresh
optimiser would reset to 0, 0 and 1. `lr_t` is --lr times the schedule's factor at the global step t over
`--schedule-steps` (the whole run's steps). The settings may change between iterations (--lr,
--adam-beta1/2, --weight-decay, the schedule): the new ones apply from the next step, said in one line and
recorded in the manifest.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.data.manifest import TRAINER_STATE

FORMAT = 1


def settings(o, schedule_steps: int) -> dict:
    """The optimiser settings a trainer state records (and a continuation compares)."""
    return {"lr": o.lr, "betas": [o.adam_beta1, o.adam_beta2], "weight_decay": o.weight_decay,
            "scheduler": o.scheduler, "warmup_steps": o.warmup_steps, "schedule_steps": schedule_steps}


def shapes(module) -> dict:
    """name -> shape of every trainable parameter (global shapes, also when sharded)."""
    return {n: list(p.shape) for n, p in module.named_parameters() if p.requires_grad}


def read(prev: Path) -> dict:
    """The state.json of PREV's trainer state, checked whole (one-line error when absent or damaged)."""
    from alignpipe.training.checkpoint import read_state

    folder = Path(prev) / TRAINER_STATE
    if not Path(prev).is_dir():
        raise UserError(f"--continue-from {prev}: no such policy folder")
    if not folder.is_dir():
        raise UserError(f"--continue-from {prev}: has no {TRAINER_STATE}/ (policies written by `alignpipe train` "
                        f"have one, except --merge and --no-trainer-state outputs); drop --continue-from")
    state = read_state(folder)
    if state.get("format") != FORMAT or not isinstance(state.get("settings"), dict):
        raise UserError(f"--continue-from {prev}: {TRAINER_STATE}/state.json is not a trainer state of this "
                        f"alignpipe (format {state.get('format')!r})")
    return state


def check_fits(prev: Path, state: dict, module) -> None:
    """The trainer state must belong to the same trainable parameters (model, LoRA rank and targets)."""
    have, saved = shapes(module), state.get("params") or {}
    if have == saved:
        return
    other = sorted(set(have) ^ set(saved))
    what = f"parameter {other[0]} is only in one of them" if other else next(
        f"{n} is {saved[n]} there, {have[n]} here" for n in sorted(have) if have[n] != saved[n])
    raise UserError(f"--continue-from {prev}: its trainer state is for other trainable parameters ({what}); "
                    f"continue with the same model and LoRA shape, or drop --continue-from")


def changes(old: dict, new: dict) -> dict:
    """setting -> [old, new] for each setting that differs."""
    return {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}


def describe(changed: dict) -> str:
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())


def restore(prev: Path, run, rank: int) -> int:
    """Load PREV's moments, schedule position and this rank's RNG into `run`, then put back this run's
    settings (lr, betas, weight decay, schedule); returns the global step reached."""
    from alignpipe.training.checkpoint import load_checkpoint

    fresh = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    state = load_checkpoint(Path(prev) / TRAINER_STATE, run.module, run.optimizer, run.scheduler, rank=rank)
    sched = run.scheduler
    for group, settings_ in zip(run.optimizer.param_groups, fresh):
        group.update(settings_)
    sched.base_lrs = [g["initial_lr"] for g in run.optimizer.param_groups]
    factors = [f(sched.last_epoch) for f in sched.lr_lambdas]
    for group, base, factor in zip(run.optimizer.param_groups, sched.base_lrs, factors):
        group["lr"] = base * factor
    sched._last_lr = [g["lr"] for g in run.optimizer.param_groups]
    return int(state["step"])


def export(checkpoint: Path, folder: Path, *, step: int, world: int, settings_: dict, params: dict) -> None:
    """Write `folder` (POLICY/trainer_state) from the run's last checkpoint, without its weights."""
    folder.mkdir()
    for f in sorted(Path(checkpoint).iterdir()):
        if f.name.endswith(".pt"):
            shutil.copyfile(f, folder / f.name)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir())}
    body = {"format": FORMAT, "step": step, "world_size": world, "settings": settings_, "params": params,
            "files": files}
    (folder / "state.json").write_text(json.dumps(body, indent=1, sort_keys=True))
