"""Several processes for training: the process group, DDP or FSDP2 sharding, and the gradient sync switch.

Several processes: plain `torch.distributed` (gloo on CPU, NCCL on GPUs) from the RANK / WORLD_SIZE /
LOCAL_RANK variables that `torchrun` and `accelerate launch` set; no `Accelerator` object, so loss scaling
and accumulation stay as in alignpipe.training.loop whatever the launcher. Replicated weights (DDP) by default; sharded with
torch FSDP2 (`fully_shard`, per decoder layer) as 'full' (FULL_SHARD, ZeRO-3) or 'grad-op' (weights kept
whole between forward and backward, gradients and optimizer state sharded: SHARD_GRAD_OP, ZeRO-2), chosen
by --sharding or read from the FSDP / DeepSpeed settings `accelerate launch` exports.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from alignpipe.core.errors import UserError
from alignpipe.training.checkpoint import is_peft

SHARDING = ("auto", "none", "grad-op", "full")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    sharding: str = "none"  # none (DDP) | grad-op | full

    @property
    def sharded(self) -> bool:
        return self.world > 1 and self.sharding != "none"

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, tensor):
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor


def sharding_mode(choice: str = "auto", env=None) -> str:
    """'none', 'grad-op' or 'full'; 'auto' reads the FSDP / DeepSpeed settings of `accelerate launch`."""
    env = os.environ if env is None else env
    if choice != "auto":
        if choice not in SHARDING:
            raise UserError(f"--sharding '{choice}': unknown (known: {', '.join(SHARDING)})")
        return choice
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
        if strategy in ("NO_SHARD", "3"):
            return "none"
        grad_op = strategy in ("SHARD_GRAD_OP", "2", "HYBRID_SHARD_ZERO2", "5")
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "").lower() != "false"
        return "full" if reshard and not grad_op else "grad-op"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "full" if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "grad-op"
    return "none"


def init_distributed(device: str = "auto", sharding: str = "auto") -> Dist:
    """The process group from torchrun / accelerate launch environment variables (or one process)."""
    import torch

    from alignpipe.models.loading import resolve_device

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)
    if dev.startswith("cuda"):  # one GPU per process, else one line naming the cause
        from alignpipe.training.devices import process_device

        dev = process_device(dev, int(os.environ.get("LOCAL_RANK", "0")), world, torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
    return Dist(rank, world, dev, sharding_mode(sharding))


def shard(module, reshard_after_forward: bool):
    """FSDP2: each decoder layer (the model's `_no_split_modules`) and then the root become shards."""
    import torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard

    from alignpipe.training.devices import shard_mesh

    mesh = shard_mesh(str(next(module.parameters()).device), tdist.get_world_size())  # not the machine's GPU
    base = module.get_base_model() if is_peft(module) else module
    layers = set(getattr(base, "_no_split_modules", None) or [])
    for sub in list(module.modules()):
        if type(sub).__name__ in layers:
            fully_shard(sub, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)


@contextlib.contextmanager
def no_sync(run, sync: bool):
    """Skip the gradient all-reduce of a micro-batch that is not the last of its step."""
    if sync or run.dist.world == 1:
        yield
    elif run.dist.sharded:
        run.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            run.model.set_requires_gradient_sync(True)
    else:
        with run.model.no_sync():
            yield


def unsharded(run, rebuild):
    """The trained policy as a whole model on rank 0 (None elsewhere): the module itself, or under FSDP a
    fresh `rebuild()` with the gathered trainable weights (a collective: every rank calls it)."""
    from alignpipe.training.checkpoint import gather_trainable, set_trainable

    if not run.dist.sharded:
        return run.module if run.dist.rank == 0 else None
    weights = gather_trainable(run.module)
    if run.dist.rank != 0:
        return None
    fresh = rebuild()
    set_trainable(fresh, weights, "gathered weights")
    return fresh



def shutdown(dist: Dist) -> None:
    """Leave the process group (several processes)."""
    if dist.world > 1:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
