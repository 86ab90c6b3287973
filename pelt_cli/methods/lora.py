"""LoRA (Hu et al. 2021): ``y = W x + (α/r) · B A x`` with ``A: r×in`` random and ``B: out×r`` zero."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pelt_cli import surgery

from . import Insertion, ModelSite, register

QKV_PARTS = ("q", "k", "v")


def lora_scale(rank: int, alpha: float) -> float:
    """LoRA's scaling factor ``α / r``."""
    return alpha / rank


def lora_delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update LoRA adds: ``ΔW = (α/r) · B A`` (shape out×in), computed in fp32."""
    return scale * (b.float() @ a.float())


class LoRA(nn.Module):
    """The low-rank branch ``(α/r) · B A dropout(x)``, optionally written into column slices of the output.

    Args:
        in_features: width of the layer's input.
        out_features: width of the branch's output (the sum of the slice widths when ``slices`` is given).
        rank: ``r``.
        alpha: ``α``.
        dropout: dropout on the branch input.
        init: ``kaiming`` (uniform, as in the reference code) or ``gaussian`` (N(0, 1/r)) for A; B is zero.
        slices: ``[(start, end), …]`` of the layer's output that the branch writes (fused QKV), or None for all.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 init: str = "kaiming", slices: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.rank, self.alpha, self.scale = rank, alpha, lora_scale(rank, alpha)
        self.slices = [tuple(s) for s in slices] if slices else None
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gate: Any = None  # UniPELT sets a callable returning a gate broadcastable to the delta
        if self.A.device.type != "meta":
            if init == "gaussian":
                nn.init.normal_(self.A, std=1 / rank)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def low(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-r intermediate ``(α/r) · A dropout(x)`` (times the gate): scaling r columns, not the layer's
        output width, is the same product and costs a fraction of the time."""
        h = (self.dropout(x) @ self.A.t().to(x.dtype)) * self.scale
        if self.gate is not None:
            h = h * self.gate()
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's output ``(α/r) · B A dropout(x)`` (times the gate, if one is set)."""
        return self.low(x) @ self.B.t().to(x.dtype)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y`` plus the branch, written into the configured output slices."""
        delta = self(x)
        if self.slices is None:
            return y + delta
        out, offset = y.clone(), 0
        for start, end in self.slices:
            out[..., start:end] = out[..., start:end] + delta[..., offset: offset + end - start]
            offset += end - start
        return out


def _lora_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.pelt_lora.add_to(output, args[0])


def qkv_slices(out_features: int, parts: list[str]) -> list[tuple[int, int]]:
    """Column ranges of q, k, v inside a fused QKV projection of ``out_features = 3·d`` (GPT-2 ``c_attn``)."""
    d = out_features // 3
    return [(QKV_PARTS.index(p) * d, (QKV_PARTS.index(p) + 1) * d) for p in parts]


@dataclass(frozen=True)
class LoRAParams:
    """Hyper-parameters of ``lora``."""

    rank: int = field(default=8, metadata={"min": 1, "help": "r, the rank of A and B"})
    alpha: float = field(default=16.0, metadata={"min": 1e-9, "help": "α; the branch is scaled by α/r"})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.999, "help": "dropout on the branch input"})
    init: str = field(default="kaiming", metadata={"choices": ["kaiming", "gaussian"], "help": "init of A (B is 0)"})
    fused_parts: list[str] | None = field(
        default=None, metadata={"choices": list(QKV_PARTS), "help": "for a fused QKV layer: which of q, k, v"})


@register
class LoRAMethod:
    """``lora``: a low-rank update on Linear / Conv1D layers."""

    name = "lora"
    Params = LoRAParams
    default_targets = ("attn.q", "attn.v")

    def check(self, model: nn.Module, params: LoRAParams, sites: list[ModelSite]) -> list[str]:
        """Rank must fit the layer; sites must be Linear/Conv1D; fused_parts only on fused QKV."""
        problems = []
        for s in sites:
            mod = surgery.get_module(model, s.module)
            if not surgery.is_linear(mod):
                problems.append(f"{s.disk_module} is a {type(mod).__name__}; lora needs a Linear or Conv1D layer")
                continue
            in_f, out_f, _ = surgery.features(mod)
            if params.fused_parts and s.role != "attn.qkv":
                problems.append(f"fused_parts is for fused QKV layers; {s.disk_module} has role {s.role}")
            width = out_f // 3 if params.fused_parts else out_f
            if params.rank > min(in_f, width):
                problems.append(f"rank {params.rank} is larger than the layer {s.disk_module} "
                                f"(in {in_f}, out {width}); expected rank ≤ {min(in_f, width)}")
        return problems

    def insert(self, model: nn.Module, params: LoRAParams, sites: list[ModelSite]) -> list[Insertion]:
        """Attach ``pelt_lora`` to each layer and add its branch to the layer's output."""
        out = []
        for s in sites:
            mod = surgery.get_module(model, s.module)
            in_f, out_f, _ = surgery.features(mod)
            slices = qkv_slices(out_f, params.fused_parts) if params.fused_parts else None
            width = sum(e - b for b, e in slices) if slices else out_f
            with torch.device(mod.weight.device):
                branch = LoRA(in_f, width, params.rank, params.alpha, params.dropout, params.init, slices)
            path = surgery.attach(model, s.module, "lora", branch)
            surgery.hook_output(model, s.module, _lora_hook)
            out.append(Insertion(s.module, s.role, self.name, [path]))
        return out
