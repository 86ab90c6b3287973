"""Data parallelism for ``pelt train`` under ``torchrun``: the process group, gradient averaging, rank checks.

Every rank trains on its shard of each batch; the trainable parameters' gradients are averaged with
``all_reduce`` before each step, so all ranks hold identical weights; only rank 0 writes.
"""

from __future__ import annotations

import os

import torch

from pelt_cli.errors import TrainingError


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun, else ``(0, 1)``; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PELT_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks (a zero gradient stands in for a missing one)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def check_ranks_agree(params: list[torch.nn.Parameter], world: int) -> None:
    """Raise if the ranks' trainable weights differ (they must be identical after averaged-gradient steps)."""
    if world <= 1:
        return
    import torch.distributed as dist

    local = torch.stack(
        [p.detach().double().sum() for p in params] + [p.detach().double().abs().sum() for p in params]
    ).cpu()
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainingError(f"ranks disagree on the trained weights (max checksum gap {(hi - lo).abs().max():.3e})")
