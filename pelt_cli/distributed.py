"""Data parallelism for ``pelt train`` under ``torchrun``, with torch's own engines: the process group, each rank's
device, ``DistributedDataParallel`` (``--fsdp``: FSDP2 ``fully_shard`` per block), and the full state for writes.

Every rank trains on its shard of each global batch. DDP averages the trainable parameters' gradients in buckets
that overlap the backward pass (no communication on the non-final micro-steps of gradient accumulation), so all
ranks hold identical weights. FSDP2 shards every parameter, frozen base included, over the ranks, gathers a block's
weights just before it runs and reduce-scatters the gradients. Only rank 0 writes; under FSDP every rank first takes
part in gathering the full inserted weights and optimizer state (:func:`full_state`, :func:`full_optimizer_state`).

Under FSDP only rank 0 reads the base (and the run's weights): the other ranks build the same model on ``meta``
(:func:`share_from_rank0`), every rank shards it, and rank 0 sends each rank its shards (:func:`fill_from_rank0`), so
the CPU memory of N ranks is one model plus the shards, not N models.
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
    """FSDP2: ``fully_shard`` each transformer block, then the root (what remains: embeddings, head); then every
    rank's shards are filled from rank 0's model (the only one with weights, see :func:`fill_from_rank0`)."""
    if world <= 1:
        raise UsageError("--fsdp: shards over processes; run under torchrun with 2 or more", hint="torchrun ...")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = find_blocks(step.model)
    if not blocks:
        raise UsageError(f"--fsdp: {type(step.model).__name__} has no list of blocks to shard")
    mesh = init_device_mesh(device.type, (world,))
    full = step.state_dict() if mesh.get_rank() == 0 else {}  # rank 0's whole model: what every rank's shards hold
    for block in blocks:
        fully_shard(block, mesh=mesh)  # moves the block to the mesh's device, then keeps this rank's shard
    wrapped = fully_shard(step, mesh=mesh)
    fill_from_rank0(wrapped, full, device)
    return wrapped


def reads_weights(cfg: Any, device: torch.device) -> bool:
    """Whether this rank reads the base and the run's weights: every rank, except under ``--fsdp`` only rank 0 (the
    others build the model on ``meta`` and receive their shards from it)."""
    return not cfg.fsdp or dist_info(device)[0] == 0


def share_from_rank0(
    model: nn.Module | None, head: Any, build: Callable[[Any], nn.Module] | None, failed: Exception | None = None
) -> tuple[nn.Module, Any]:
    """Under ``--fsdp``, right after rank 0 built the run's model (before it is cast, moved or sharded): every other
    rank builds the same model on ``meta``, reading no weight (a collective: all ranks call it).

    Rank 0 sends its head spec, each parameter's and buffer's name, shape and dtype, and its RNG state; the others
    build ``build(head)``, check it against rank 0's, take rank 0's dtypes (the stored ones, not the config's) and
    continue from its RNG state, as if they had initialised the same new modules.

    Args:
        model: rank 0's model; None on the other ranks.
        head: rank 0's head spec (ignored elsewhere).
        build: the run's model on ``meta`` from a head spec.
        failed: on rank 0, the error that stopped it building its model: it is sent to the other ranks, which
            raise it in one line (instead of waiting for weights that never come), and raised again on rank 0.

    Returns:
        ``(model, head)``: this rank's model and rank 0's head spec.

    Raises:
        TrainingError: a rank whose model has other tensors than rank 0's (names or shapes), or rank 0 failed.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    if rank == 0:
        sent: list[Any] = [str(failed) if failed else (head, tensor_layout(model), torch.get_rng_state())]
    else:
        sent = [None]
    dist.broadcast_object_list(sent, src=0)
    if failed is not None:
        raise failed
    if isinstance(sent[0], str):
        raise TrainingError(f"rank {rank}: rank 0 could not build the model: {sent[0]}")
    head, layout, rng = sent[0]
    if rank == 0:
        return model, head
    model = build(head)  # type: ignore[misc]  # None only on rank 0, with ``failed``
    mine = tensor_layout(model)
    if mine.keys() != layout.keys() or any(mine[k][0] != layout[k][0] for k in layout):
        bad = next(k for k in [*layout, *mine] if mine.get(k, (None,))[0] != layout.get(k, (None,))[0])
        raise TrainingError(f"rank {rank}: its model differs from rank 0's at {bad}; cannot receive its weights")
    set_dtypes(model, {k: dtype for k, (_, dtype) in layout.items()})
    torch.set_rng_state(rng)
    return model, head


def tensor_layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → ``(shape, dtype)`` of every parameter and buffer of a model, shared ones under each of their names."""
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {n: (tuple(t.shape), t.dtype) for n, t in tensors}


def set_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Cast each parameter and buffer of a (``meta``) model to the dtype ``dtypes`` names for it."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    for name, b in model.named_buffers(remove_duplicate=False):
        if b.dtype != dtypes[name]:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, b.to(dtypes[name]))


def fill_from_rank0(wrapped: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """After ``fully_shard`` on every rank: the other ranks' ``meta`` shards made real on ``device`` and every rank's
    shards, and buffers, filled from rank 0's whole model ``full`` (a collective; empty on the other ranks).

    Buffers outside the state dict (rotary ``inv_freq``, ``position_ids``) are sent too: no rank recomputes them."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if dist.get_rank() != 0:
        wrapped.to_empty(device=device)
    set_model_state_dict(wrapped, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        for _, b in wrapped.named_buffers(remove_duplicate=False):
            dist.broadcast(b.view(torch.uint8) if b.dtype == torch.bool else b, src=0)


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
