"""LoRA (Hu et al. 2021): ``y = W x + (α/r) · B A x`` with ``A: r×in`` random and ``B: out×r`` zero."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import ExportRefused
from pelt_cli.fold import power_of_two
from pelt_cli.methods import FoldOp, Insertion, ModelSite, register

QKV_PARTS = ("q", "k", "v")


def lora_scale(rank: int, alpha: float) -> float:
    """LoRA's scaling factor ``α / r``."""
    return alpha / rank


def add_scaled_product(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """``w += s · (b a)`` in fp32, rounded as peft merges: the product ``b a``, then ``× s``, then the add.

    A power-of-two ``s`` scales exactly, so one ``addmm_`` gives those bits; any other ``s`` goes a block of rows at
    a time (about 1 MiB of fp32) through a product, a scale and an add (``addmm``'s ``alpha`` would round ``s · Σ``
    and the add once, peft rounds twice).
    """
    if power_of_two(scale):
        return w.addmm_(b, a, alpha=scale)
    step = max(1, (1 << 18) // max(1, a.shape[1]))
    for i in range(0, b.shape[0], step):
        w[i : i + step].add_(torch.mm(b[i : i + step], a).mul_(scale))
    return w


def fold_lora(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    slices: list[tuple[int, int]] | None = None,
    transposed: bool = False,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fold a LoRA branch into its layer's fp32 weight, in place (no out×in temporary; :func:`add_scaled_product`).

    Args:
        w: the layer's weight in fp32, ``(out, in)`` (Conv1D: ``(in, out)``, ``transposed``); with ``rows``, only
            rows ``r0:r1`` of it (a streamed block: each row of ``W'`` depends on the same row of ``W`` alone).
        a: ``A`` (r × in).
        b: ``B`` (out × r, or the width of ``slices``).
        scale: ``α/r`` (times a frozen gate).
        slices: the output rows the branch writes (fused QKV), or None for all.
        transposed: the weight is stored ``(in, out)``.
        rows: ``(r0, r1)``: ``w`` holds rows ``r0:r1`` of the weight; None: all of it.
    """
    # W' = W + (α/r) B A   (Conv1D: W' = W + (α/r) Aᵀ Bᵀ)
    a, b = a.float(), b.float()
    r0, r1 = rows or (0, w.shape[0])  # without slices, the branch writes every row
    if transposed:  # rows of W are input features: the block takes the same rows of Aᵀ
        at, offset = a[:, r0:r1].t(), 0
        for start, end in slices or [(0, w.shape[1])]:
            add_scaled_product(w[:, start:end], at, b[offset : offset + end - start].t(), scale)
            offset += end - start
        return w
    offset = 0
    for start, end in slices or [(0, r1)]:
        lo, hi = max(start, r0), min(end, r1)  # the part of this slice's output rows inside the block
        if lo < hi:
            add_scaled_product(w[lo - r0 : hi - r0], b[offset + lo - start : offset + hi - start], a, scale)
        offset += end - start
    return w


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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        slices: list[tuple[int, int]] | None = None,
    ) -> None:
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
        """``y`` plus the branch, written into the configured output slices.

        The up-projection and the add are one ``addmm`` with ``α/r`` as its ``alpha`` (the gate stays on the rank-r
        intermediate): ``y + (α/r) · (g · A x) Bᵀ``, the same product as :meth:`forward` added to ``y``. Without
        autograd recording (``no_grad``, ``inference_mode``) the sum is written in place into ``y``, the layer's
        fresh output (no later code has seen it yet); with it, into a new tensor (autograd would have to rebase an
        in-place write into the view ``F.linear`` returns, costing more in backward than it saves).
        """
        if self.slices is not None or not y.is_contiguous():
            return self._add_slices(y, self(x))
        z = self.dropout(x) @ self.A.t().to(x.dtype)
        if self.gate is not None:
            z = z * self.gate()
        z2, bt = z.reshape(-1, self.rank).to(y.dtype), self.B.t().to(y.dtype)
        y2 = y.view(-1, y.shape[-1])
        if torch.is_grad_enabled():
            return torch.addmm(y2, z2, bt, alpha=self.scale).view(y.shape)
        y2.addmm_(z2, bt, alpha=self.scale)
        return y

    def _add_slices(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``y`` plus ``delta`` (whole, or its columns spread over the output slices); in place without autograd."""
        inplace = not torch.is_grad_enabled()
        if self.slices is None:
            return y.add_(delta) if inplace else y + delta
        out, offset = (y if inplace else y.clone()), 0
        for start, end in self.slices:
            out[..., start:end] += delta[..., offset : offset + end - start]
            offset += end - start
        return out


def _lora_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.pelt_lora.add_to(output, args[0])


def qkv_slices(out_features: int, parts: list[str], config: dict[str, Any] | None = None) -> list[tuple[int, int]]:
    """Output ranges of ``parts`` (q, k, v) inside a fused QKV projection: from the config's head counts and the
    family's layout (GPT-2 ``c_attn``: thirds; Phi-3 ``qkv_proj``: grouped-query sizes; GPT-NeoX/BLOOM: per head)."""
    from pelt_cli.roles import fused_slices

    return fused_slices(config, out_features, parts)


def site_slices(
    model: nn.Module, params: LoRAParams, site: ModelSite, out_features: int
) -> list[tuple[int, int]] | None:
    """The output ranges a branch at ``site`` writes: the explicit ``fused_parts``, else the parts of a fused QKV
    layer that the recipe's roles chose (``attn.q``, ``attn.v`` on ``c_attn``), else None (the whole output)."""
    from pelt_cli.targets import config_dict

    parts = params.fused_parts or (list(site.parts) if site.parts else None)
    return qkv_slices(out_features, parts, config_dict(model)) if parts else None


@dataclass(frozen=True)
class LoRAParams:
    """Hyper-parameters of ``lora``."""

    rank: int = field(default=8, metadata={"min": 1, "help": "r, the rank of A and B"})
    alpha: float = field(default=16.0, metadata={"min": 1e-9, "help": "α; the branch is scaled by α/r"})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.999, "help": "dropout on the branch input"})
    init: str = field(default="kaiming", metadata={"choices": ["kaiming", "gaussian"], "help": "init of A (B is 0)"})
    fused_parts: list[str] | None = field(
        default=None, metadata={"choices": list(QKV_PARTS), "help": "for a fused QKV layer: which of q, k, v"}
    )


@register
class LoRAMethod:
    """``lora``: a low-rank update on Linear / Conv1D layers."""

    name = "lora"
    Params = LoRAParams
    default_targets = ("attn.q", "attn.v")
    peft_type = "LORA"

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
            try:
                slices = site_slices(model, params, s, out_f)
            except ValueError as e:
                problems.append(f"{s.disk_module}: {e}")
                continue
            width = sum(e - b for b, e in slices) if slices else out_f
            if params.rank > min(in_f, width):
                problems.append(
                    f"rank {params.rank} is larger than the layer {s.disk_module} "
                    f"(in {in_f}, out {width}); expected rank ≤ {min(in_f, width)}"
                )
        return problems

    def insert(self, model: nn.Module, params: LoRAParams, sites: list[ModelSite]) -> list[Insertion]:
        """Attach ``pelt_lora`` to each layer and add its branch to the layer's output."""
        out = []
        for s in sites:
            mod = surgery.get_module(model, s.module)
            in_f, out_f, _ = surgery.features(mod)
            slices = site_slices(model, params, s, out_f)
            width = sum(e - b for b, e in slices) if slices else out_f
            with torch.device(mod.weight.device):
                branch = LoRA(in_f, width, params.rank, params.alpha, params.dropout, params.init, slices)
            path = surgery.attach(model, s.module, "lora", branch)
            surgery.hook_output(model, s.module, _lora_hook)
            out.append(Insertion(s.module, s.role, self.name, [path]))
        return out

    def foldable(self, row: Any) -> str | None:
        """``exact``: ``W' = W + (α/r) B A`` gives the same function."""
        return "exact"

    def fold(
        self, model: nn.Module, row: Any, adapter: dict[str, torch.Tensor], gate: float | None = None
    ) -> dict[str, list[FoldOp]]:
        """The fold of each LoRA branch of an insertion row into its layer's weight (``gate``: a frozen gate)."""
        _, _, transposed = surgery.features(surgery.get_module(model, row.site))
        ops = []
        for path in row.modules:
            mod = surgery.get_module(model, path)
            a, b, scale = adapter[f"{path}.A"], adapter[f"{path}.B"], mod.scale * (1.0 if gate is None else gate)
            ops.append(
                FoldOp(functools.partial(fold_lora, a=a, b=b, scale=scale, slices=mod.slices, transposed=transposed))
            )
        return {f"{row.site}.weight": ops}

    def to_peft(self, model: nn.Module, rows: list[Any], adapter: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """PEFT ``lora_A`` / ``lora_B`` tensors by site (a sliced fused-QKV ``B`` widened with zero rows: the same
        function) and the LoRA part of ``adapter_config.json`` (the commonest r and α, the rest as patterns)."""
        tensors, ranks, dropout, fan_in_fan_out = {}, {}, 0.0, False
        for row in rows:
            path = row.modules[0]
            _, out_f, transposed = surgery.features(surgery.get_module(model, row.site))
            mod = surgery.get_module(model, path)
            b = adapter[f"{path}.B"]
            if mod.slices:
                full, offset = torch.zeros(out_f, b.shape[1], dtype=b.dtype), 0
                for start, end in mod.slices:
                    full[start:end] = b[offset : offset + end - start]
                    offset += end - start
                b = full
            tensors[f"{row.site}.lora_A.weight"] = adapter[f"{path}.A"].contiguous()
            tensors[f"{row.site}.lora_B.weight"] = b.contiguous()
            ranks[row.site] = (mod.rank, mod.alpha)
            dropout = max(dropout, float(getattr(mod.dropout, "p", 0.0)))
            fan_in_fan_out |= transposed
        r, alpha = max(set(ranks.values()), key=list(ranks.values()).count)
        return tensors, {
            "r": r,
            "lora_alpha": _num(alpha),
            "lora_dropout": dropout,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "fan_in_fan_out": fan_in_fan_out,
            "rank_pattern": {s: v[0] for s, v in ranks.items() if v[0] != r},
            "alpha_pattern": {s: _num(v[1]) for s, v in ranks.items() if v[1] != alpha},
        }

    def from_peft(self, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[list[dict], Any]:
        """Recipe entries (one per rank/α pair, naming the exact modules) and a function giving pelt's tensors.

        Raises:
            ExportRefused: PEFT options pelt's lora does not have (DoRA, biases, …).
        """
        unsupported = [
            k
            for k in (
                "use_dora",
                "lora_bias",
                "modules_to_save",
                "layer_replication",
                "target_parameters",
                "trainable_token_indices",
                "alora_invocation_tokens",
            )
            if cfg.get(k)
        ]
        if cfg.get("bias", "none") != "none":
            unsupported.append(f"bias={cfg['bias']}")
        odd = sorted(n for n in state if not n.endswith((".lora_A.weight", ".lora_B.weight")))
        if unsupported or odd:
            found = ", ".join(unsupported + odd[:3])
            raise ExportRefused(f"this PEFT LoRA uses what pelt's lora does not have: {found}")
        groups: dict[tuple, list[str]] = {}
        values = {}
        for name in sorted(n for n in state if n.endswith(".lora_A.weight")):
            site = name[: -len(".lora_A.weight")]
            r = state[name].shape[0]
            alpha = next(
                (v for k, v in (cfg.get("alpha_pattern") or {}).items() if pattern_matches(k, site)), cfg["lora_alpha"]
            )
            alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha  # rsLoRA α/√r = (α√r)/r
            groups.setdefault((r, float(alpha)), []).append(site)
            values[f"{site}.pelt_lora.A"] = state[name]
            values[f"{site}.pelt_lora.B"] = state[f"{site}.lora_B.weight"]
        entries = [
            {
                "method": self.name,
                "targets": sites,
                "params": {"rank": r, "alpha": a, "dropout": float(cfg.get("lora_dropout") or 0.0)},
            }
            for (r, a), sites in groups.items()
        ]
        return entries, lambda skeleton: values


def pattern_matches(pattern: str, key: str) -> bool:
    """PEFT's pattern rule (``rank_pattern``/``alpha_pattern``): the key ends with the pattern at a dot boundary."""
    import re

    return re.match(rf"(.*\.)?({pattern})$", key) is not None


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
