"""Which device a process computes on, and the device mesh of its sharded weights.

One process per GPU is the rule of torchrun / accelerate launch: the process with LOCAL_RANK r takes cuda:r.
Two processes on one GPU cannot share it under NCCL (it refuses a duplicate GPU), so a launch with more
processes per machine than visible GPUs stops at start with one line naming the cause, instead of CUDA's
`invalid device ordinal` in the middle of setting up.

FSDP2's `fully_shard` builds its default mesh on the machine's accelerator whatever device the weights are
on; a CPU run (gloo) on a machine with one GPU then asks for cuda:LOCAL_RANK. `shard_mesh` names the mesh of
the device the run chose.
"""
from __future__ import annotations

from alignpipe.core.errors import UserError


def process_device(device: str, local_rank: int, world: int, cuda_count: int) -> str:
    """The device of the process with `local_rank` (of `world`) for a resolved --device (cpu | cuda | cuda:N)
    on a machine with `cuda_count` visible CUDA devices: cpu, or cuda:LOCAL_RANK when several processes."""
    if not device.startswith("cuda"):
        return device
    if world > 1 and device != "cuda":
        raise UserError(f"--device {device} with {world} processes: each process takes the GPU of its "
                        f"LOCAL_RANK; pass --device cuda")
    if world == 1 and device != "cuda":
        index = int(device.split(":", 1)[1]) if device.split(":", 1)[1].isdigit() else -1
        if not 0 <= index < cuda_count:
            raise UserError(f"--device {device}: no such CUDA device ({cuda_count} visible)")
        return device
    if local_rank >= cuda_count:
        raise UserError(f"--device cuda: the process with LOCAL_RANK={local_rank} needs a GPU of its own but "
                        f"{cuda_count} CUDA device(s) are visible; start at most {cuda_count} process(es) per "
                        f"machine (torchrun --nproc_per_node {cuda_count}), or pass --device cpu")
    return f"cuda:{local_rank}"


def shard_mesh(device: str, world: int):
    """A 1-D device mesh over the `world` processes on the device type of `device` (cpu or cuda)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
