"""Several processes (GPUs or machines) with PyTorch DDP, started by ``torchrun``.

``torchrun --nproc_per_node N -m edgetl finetune ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU). Each rank trains on its
own slice of every epoch's sample order with ``batch_size / world_size`` images per step, so the
global batch, the number of steps and the learning-rate schedule match a single-process run. Rank
0 alone writes the run directory.
"""

from __future__ import annotations

import dataclasses
import os

from edgetl.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def init_from_env(device_type: str) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch
    import torch.distributed as dist

    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend=backend)
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def per_rank_batch(batch_size: int, ctx: DistContext) -> int:
    if batch_size % ctx.world_size:
        raise ConfigError(f"--batch-size {batch_size} must be divisible by the number of processes ({ctx.world_size})")
    return batch_size // ctx.world_size


def rank_slice(order, ctx: DistContext):
    """This rank's part of an epoch order, padded by wrapping so every rank takes the same steps."""
    if not ctx.enabled:
        return order
    n = len(order)
    total = -(-n // ctx.world_size) * ctx.world_size
    if total > n:
        import torch

        order = torch.cat([order, order[: total - n]])
    return order[ctx.rank :: ctx.world_size]


def all_reduce_sums(values: list[float], ctx: DistContext, device) -> list[float]:
    """Sum ``values`` over ranks (metrics such as loss sums and correct counts)."""
    if not ctx.enabled:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
