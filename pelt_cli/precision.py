"""Precision and memory for ``pelt train``: autocast and the fp16 gradient scaler (:class:`Amp`), the base's dtype
with the trained parameters kept in fp32 (:func:`cast_for_training`), activation checkpointing on the blocks
(:func:`enable_grad_checkpoint`), and the process's peak memory (:func:`peak_memory`)."""

from __future__ import annotations

import contextlib
import functools
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)
BASE_DTYPES = (*DTYPES, "auto")
BLOCK_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")  # the ModuleLists that hold a model's blocks


@dataclass
class Amp:
    """Mixed precision of a training run: autocast to ``dtype`` on ``device_type`` (None: plain fp32), and for fp16
    a gradient scaler (the loss is scaled before backward; the gradients unscaled before clipping)."""

    device_type: str
    dtype: torch.dtype | None = None
    scaler: Any = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the forward runs in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the scaler when there is one."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size (before measuring or clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)

    def step(self, opt: torch.optim.Optimizer) -> None:
        """The optimizer step (the scaler skips it when a gradient overflowed, then adapts its scale)."""
        if self.scaler is None:
            opt.step()
            return
        self.scaler.step(opt)
        self.scaler.update()


def make_amp(precision: str, device: torch.device, sharded: bool = False) -> Amp:
    """The :class:`Amp` of ``--precision`` on ``device`` (``sharded``: under ``--fsdp``).

    Raises:
        UsageError: a precision this torch cannot autocast to on the device, or fp16 with FSDP.
    """
    if precision not in DTYPES:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return Amp(device.type)
    dtype = DTYPES[precision]
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise UsageError(f"--precision {precision}: torch {torch.__version__} has no autocast on {device.type}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16 support", hint="use --precision fp16")
    if precision == "fp16" and sharded:
        raise UsageError("--precision fp16 with --fsdp: the gradient scaler is not sharded", hint="use bf16")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Amp(device.type, dtype, scaler)


def cast_for_training(model: nn.Module, base_dtype: str) -> None:
    """Put the frozen base in ``base_dtype`` (``auto``: as stored) and every trained parameter — the inserted
    modules' and the task head's — in fp32, so the optimizer updates fp32 master weights.

    The inserted modules cast their weights to the hidden states' dtype themselves; the task head's modules get a
    pre-hook that casts their inputs to fp32 when the base computes in another dtype.
    """
    if base_dtype not in BASE_DTYPES:
        raise UsageError(f"--base-dtype {base_dtype!r}: expected one of {', '.join(BASE_DTYPES)}")
    if base_dtype != "auto":
        model.to(DTYPES[base_dtype])
    for name, module in model.named_modules():
        if surgery.is_inserted(name):
            module.float()
    low = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.is_floating_point()]
        if not own or surgery.is_inserted(name):
            continue
        for p in own:  # a task head's module
            p.data = p.data.float()
        if low:
            module.register_forward_pre_hook(_inputs_to_fp32)


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    """A head module's pre-hook: its floating inputs in fp32 (its weights are; the base's outputs may not be)."""
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def enable_grad_checkpoint(model: nn.Module) -> str:
    """Activation checkpointing on the model's blocks: transformers' own (non-reentrant) where the model supports
    it, else ``torch.utils.checkpoint`` around each block of its layer lists. Returns which was used.

    The inserted modules run inside the blocks, so their forward hooks run again in the backward pass (the gates'
    statistics count only evaluation forwards, which are not checkpointed).

    Raises:
        UsageError: a model with neither transformers' support nor a list of blocks.
    """
    kwargs = {"use_reentrant": False}
    if getattr(model, "supports_gradient_checkpointing", False):
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return "transformers"
    blocks = find_blocks(model)
    if not blocks:
        raise UsageError(f"--grad-checkpoint: {type(model).__name__} has no list of blocks to checkpoint")
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block, block.forward)
    return "torch"


def _checkpointed(block: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    """A block's forward, checkpointed while it trains with gradients."""
    if not (block.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the members of its ``layer``/``layers``/``h``/``block(s)`` ModuleLists whose
    members share a class (an encoder-decoder has two such lists), inserted modules excluded."""
    out: list[nn.Module] = []
    for name, module in model.named_modules():
        if surgery.is_inserted(name) or not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES and len({type(m) for m in module}) == 1:
            out.extend(module)
    return out


def peak_memory(device: torch.device | None = None) -> dict[str, float]:
    """The process's peak memory so far in MiB: ``rss_mb`` (resident set, from ``getrusage``) and, on a CUDA
    device, ``cuda_mb`` (the most torch allocated on it)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        out["cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def describe_peak(peak: dict[str, float]) -> str:
    """:func:`peak_memory` in words: ``rss 812 MiB, cuda 3,420 MiB``."""
    return ", ".join(f"{k.removesuffix('_mb')} {v:,.0f} MiB" for k, v in peak.items())
