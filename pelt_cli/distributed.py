"""Data parallelism for ``pelt train`` under ``torchrun``, with torch's own engines: the process group, each rank's
device, ``DistributedDataParallel`` (``--fsdp``: FSDP2 ``fully_shard`` per block), and the full state for writes.

Every rank trains on its shard of each global batch. DDP averages the trainable parameters' gradients in buckets
that overlap the backward pass (no communication on the non-final micro-steps of gradient accumulation), so all
ranks hold identical weights. FSDP2 shards every parameter, frozen base included, over the ranks, gathers a block's
weights just before it runs and reduce-scatters the gradients. Only rank 0 writes; under FSDP every rank first takes
part in gathering the full inserted weights and optimizer state (:func:`full_state`, :func:`full_optimizer_state`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pelt_cli.errors import TrainingError, UsageError
from pelt_cli.precision import Amp, find_blocks, make_amp

BACKEND_ENV = "PELT_DIST_BACKEND"  # gloo or nccl: overrides the choice by device


def dist_info(device: torch.device | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun, else ``(0, 1)``; initialises the process group once (nccl for CUDA
    devices, gloo for the CPU; ``PELT_DIST_BACKEND`` overrides)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        dist.init_process_group(os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo"))
    return dist.get_rank(), dist.get_world_size()


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device becomes this rank's own GPU (``cuda:LOCAL_RANK``, made current)."""
    if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class StepModule(nn.Module):
    """What DDP and FSDP wrap: ``forward(fn, *args)`` is ``fn(model, *args)``, so every task's loss — whichever of
    the model's submodules it calls — runs inside the wrapper's forward (DDP's reducer and FSDP's root hooks)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


@dataclass
class Engine:
    """How a run's forward and backward execute: ``kind`` ``single``, ``ddp`` or ``fsdp``; ``amp`` its precision."""

    model: nn.Module
    wrapped: nn.Module
    kind: str
    amp: Amp

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)`` through the wrapper, under autocast (a training step's loss)."""
        with self.amp.autocast():
            return self.wrapped(fn, *args)

    def evaluate(self, fn: Callable[[nn.Module], Any]) -> Any:
        """``fn(model)`` without gradients, under autocast; under FSDP inside the root's forward, which gathers the
        weights outside the blocks (embeddings, head) for it."""
        with torch.no_grad(), self.amp.autocast():
            return self.wrapped(lambda m: fn(m)) if self.kind == "fsdp" else fn(self.model)

    def sync(self, final: bool) -> contextlib.AbstractContextManager:
        """The context of a micro-step's forward and backward: gradients are communicated only on the ``final``
        micro-step of an optimizer step (DDP ``no_sync``, FSDP ``set_requires_gradient_sync``)."""
        if self.kind == "ddp" and not final:
            return self.wrapped.no_sync()
        if self.kind == "fsdp":
            self.wrapped.set_requires_gradient_sync(final)
        return contextlib.nullcontext()


def make_engine(model: nn.Module, cfg: Any, world: int, device: torch.device, find_unused: bool = False) -> Engine:
    """Wrap a run's model (trainable parameters already in place, before the optimizer is made) for ``world`` ranks.

    Args:
        model: the task model, base frozen.
        cfg: the run's TrainConfig (``precision``, ``fsdp``).
        world: the number of ranks.
        device: this rank's device.
        find_unused: let DDP look for parameters a step leaves unused (gates frozen during gate warm-up).

    Raises:
        UsageError: ``--fsdp`` outside torchrun, or on a model without a list of blocks.
    """
    amp = make_amp(cfg.precision, device, sharded=cfg.fsdp)
    step = StepModule(model)
    if cfg.fsdp:
        return Engine(model, shard(step, world, device), "fsdp", amp)
    if world <= 1:
        return Engine(model, step, "single", amp)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=find_unused)
    return Engine(model, ddp, "ddp", amp)


def shard(step: StepModule, world: int, device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` each transformer block, then the root (what remains: embeddings, head)."""
    if world <= 1:
        raise UsageError("--fsdp: shards over processes; run under torchrun with 2 or more", hint="torchrun ...")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = find_blocks(step.model)
    if not blocks:
        raise UsageError(f"--fsdp: {type(step.model).__name__} has no list of blocks to shard")
    mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(step, mesh=mesh)


def is_sharded(t: Any) -> bool:
    """Whether a tensor is a DTensor (an FSDP shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors with every FSDP shard gathered into the full tensor (a collective: all ranks call it)."""
    return {k: v.full_tensor() if is_sharded(v) else v for k, v in tensors.items()}


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.state_dict()`` with sharded state gathered, in the layout one process saves (a collective)."""
    sd = opt.state_dict()
    sd["state"] = {i: full_state(s) for i, s in sd["state"].items()}
    return sd


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After ``opt.load_state_dict`` of a full state: shard each state tensor like its (sharded) parameter."""
    from torch.distributed.tensor import distribute_tensor

    for p, state in opt.state.items():
        if not is_sharded(p):
            continue
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and not is_sharded(v) and v.shape == p.shape:
                state[k] = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)


def check_ranks_agree(params: list[torch.nn.Parameter], world: int) -> None:
    """Raise if the ranks' trainable weights differ (they must be identical after averaged-gradient steps; FSDP
    shards are not compared: each rank holds its own)."""
    params = [p for p in params if not is_sharded(p)]
    if world <= 1 or not params:
        return
    import torch.distributed as dist

    local = torch.stack([p.detach().double().sum() for p in params] + [p.detach().double().abs().sum() for p in params])
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainingError(f"ranks disagree on the trained weights (max checksum gap {(hi - lo).abs().max():.3e})")
