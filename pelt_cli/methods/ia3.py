"""(IA)³ (Liu et al. 2022): learned vectors rescale keys ``K ⊙ l_k``, values ``V ⊙ l_v`` and the FFN hidden.

All vectors start at ones, so the model is unchanged at step 0; only the vectors train. Sites:

* ``attn.k`` / ``attn.v`` (and any other Linear/Conv1D a recipe names, except the FFN roles below): a forward
  hook multiplies the layer's output by ``l`` (``out_features`` wide).
* ``attn.qkv`` (GPT-2's fused ``c_attn``): ``l`` covers only the k and v thirds (``2d`` trainable); the q third is
  fixed at ones by a buffer.
* the FFN hidden, by ``ffn_placement``: ``down_input`` (default, as in the paper and HF peft) scales the input of
  ``ffn.down`` (after the activation) with a forward pre-hook; ``up_output`` scales the output of ``ffn.up``
  (before the activation) with a forward hook, and the recipe targets ``ffn.up`` instead of ``ffn.down``.

Merging is exact: :func:`fold_output_scale` for output scales, :func:`fold_input_scale` for ``down_input``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import ExportRefused
from pelt_cli.methods import FoldOp, Insertion, ModelSite, always_exact, choice, linear_sites, register

FFN_PLACEMENTS = ("down_input", "up_output")
FFN_ROLE = {"down_input": "ffn.down", "up_output": "ffn.up"}


def fold_output_scale(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    l: torch.Tensor,  # noqa: E741
    transposed: bool,
    rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an output scale into its layer (k, v, fused qkv, ffn ``up_output``); computed in fp32.

    Args:
        weight: ``(out, in)`` for a Linear, ``(in, out)`` for a Conv1D (``transposed``).
        bias: ``(out,)`` or None.
        l: ``(out,)``, the full scale vector (ones where a fused part is not scaled).
        transposed: the weight is stored ``(in, out)``.
        rows: ``(r0, r1)``: ``weight`` holds only rows ``r0:r1`` of the layer's weight (a streamed block).

    Returns:
        ``(W', b')`` in the input dtypes.
    """
    # (W x + b) ⊙ l = (diag(l) W) x + l ⊙ b  →  W' = diag(l) W (scale rows; Conv1D columns), b' = l ⊙ b
    lf = l.detach().float()
    w = weight.float() * (lf[None, :] if transposed else lf[slice(*rows) if rows else slice(None), None])
    b = None if bias is None else (bias.float() * lf).to(bias.dtype)
    return w.to(weight.dtype), b


def fold_input_scale(
    weight: torch.Tensor,
    l: torch.Tensor,  # noqa: E741
    transposed: bool,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fold an input scale (ffn ``down_input``) into the layer's weight; the bias is unchanged. fp32 math.

    Args:
        weight: ``(out, in)`` for a Linear, ``(in, out)`` for a Conv1D (``transposed``).
        l: ``(in,)``.
        transposed: the weight is stored ``(in, out)``.
        rows: ``(r0, r1)``: ``weight`` holds only rows ``r0:r1`` of the layer's weight (a streamed block).
    """
    # W (x ⊙ l) + b = (W diag(l)) x + b  →  W' = W diag(l) (scale input columns; Conv1D rows)
    lf = l.detach().float()
    w = weight.float() * (lf[slice(*rows) if rows else slice(None), None] if transposed else lf[None, :])
    return w.to(weight.dtype)


class IA3Vector(nn.Module):
    """A learned vector ``l`` (ones at init) that multiplies the last dimension of a tensor.

    Args:
        width: length of the full vector (the scaled tensor's last dimension).
        fixed: leading entries held at one and not trained (the q third of a fused QKV layer).
        side: ``output`` (the layer's output is scaled) or ``input`` (its input is); tells merge which fold.
    """

    def __init__(self, width: int, fixed: int = 0, side: str = "output") -> None:
        super().__init__()
        self.side, self.fixed = side, fixed
        self.l = nn.Parameter(torch.ones(width - fixed))
        if fixed:
            self.register_buffer("ones", torch.ones(fixed))

    def vector(self) -> torch.Tensor:
        """The full scale vector (fixed ones first, then ``l``)."""
        return torch.cat([self.ones, self.l]) if self.fixed else self.l

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x ⊙ l`` (in x's dtype)."""
        return x * self.vector().to(x.dtype)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"width={self.l.numel() + self.fixed}, fixed={self.fixed}, side={self.side}"


def _output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.pelt_ia3(output)


def _input_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.pelt_ia3(args[0]), *args[1:])


@dataclass(frozen=True)
class IA3Params:
    """Hyper-parameters of ``ia3``."""

    ffn_placement: str = choice(
        "down_input",
        FFN_PLACEMENTS,
        "down_input: scale the input of ffn.down (after the activation; target ffn.down); "
        "up_output: scale the output of ffn.up (before the activation; target ffn.up)",
    )


def kv_start(model: nn.Module, layer: nn.Module) -> int | None:
    """Where the k and v outputs of a fused ``[q | k | v]`` layer begin (grouped-query widths from the config);
    None when k and v are not one block that ends the output (per-head interleaved layouts) or cannot be told."""
    from pelt_cli.roles import fused_slices

    out_f = surgery.features(layer)[1]
    try:
        spans = fused_slices(model.config.to_dict(), out_f, ["k", "v"])
    except ValueError:
        return None
    return spans[0][0] if len(spans) == 1 and spans[0][1] == out_f and spans[0][0] > 0 else None


def site_kind(role: str, params: IA3Params) -> str:
    """How a site of ``role`` is scaled: ``qkv``, ``input``, ``output``, or ``bad`` (an FFN role off-placement)."""
    if role == "attn.qkv":
        return "qkv"
    if role in ("ffn.up", "ffn.down", "ffn.gate"):
        if role != FFN_ROLE[params.ffn_placement]:
            return "bad"
        return "input" if params.ffn_placement == "down_input" else "output"
    return "output"


@register
class IA3Method:
    """``ia3``: learned rescaling vectors on keys, values and the FFN hidden."""

    name = "ia3"
    peft_type = "IA3"
    Params = IA3Params
    default_targets = ("attn.k", "attn.v", "ffn.down")  # ffn_placement up_output: target ffn.up instead

    def check(self, model: nn.Module, params: IA3Params, sites: list[ModelSite]) -> list[str]:
        """Sites must be Linear/Conv1D; an FFN site must fit ``ffn_placement``; a fused QKV layer must be [q|k|v]."""
        problems = []
        for s, mod in linear_sites(model, sites, self.name, problems):
            kind = site_kind(s.role, params)
            if kind == "bad":
                want = FFN_ROLE[params.ffn_placement]
                other = next(p for p in FFN_PLACEMENTS if p != params.ffn_placement)
                hint = (
                    f"target {want}, or set ffn_placement: {other}" if s.role == FFN_ROLE[other] else f"target {want}"
                )
                problems.append(
                    f"ffn_placement {params.ffn_placement} scales the FFN hidden at {want}; "
                    f"{s.disk_module} has role {s.role} ({hint})"
                )
            elif kind == "qkv" and kv_start(model, mod) is None:
                problems.append(
                    f"{s.disk_module} is a fused QKV layer whose k and v outputs are not one block after q "
                    f"(width {surgery.features(mod)[1]}, per-head interleaved or of unknown layout); ia3 scales a "
                    "contiguous [q | k | v] layer only"
                )
        return problems

    def insert(self, model: nn.Module, params: IA3Params, sites: list[ModelSite]) -> list[Insertion]:
        """Attach ``pelt_ia3`` to each layer and scale its output (or, for ffn ``down_input``, its input)."""
        return [self._insert_at(model, s, site_kind(s.role, params)) for s in sites]

    def _insert_at(self, model: nn.Module, s: ModelSite, kind: str) -> Insertion:
        """Attach one vector at ``s`` and hook it to scale what ``kind`` (:func:`site_kind`) says."""
        mod = surgery.get_module(model, s.module)
        in_f, out_f, _ = surgery.features(mod)
        with torch.device(mod.weight.device):
            if kind == "input":
                vec = IA3Vector(in_f, side="input")
            elif kind == "qkv":
                vec = IA3Vector(out_f, fixed=kv_start(model, mod) or 0)
            else:
                vec = IA3Vector(out_f)
        path = surgery.attach(model, s.module, "ia3", vec)
        if kind == "input":
            surgery.hook_input(model, s.module, _input_hook)
            note = "scales the input"
        else:
            surgery.hook_output(model, s.module, _output_hook)
            note = "scales the k and v part of the output" if kind == "qkv" else "scales the output"
        return Insertion(s.module, s.role, self.name, [path], note)

    foldable = always_exact  # a scale on a layer's output or input is a scale of its weight (and bias) rows or columns

    def fold(
        self, model: nn.Module, row: Any, adapter: dict[str, torch.Tensor], gate: float | None = None
    ) -> dict[str, list[FoldOp]]:
        """The fold of each vector of an insertion row into its layer's weight (and bias, for output scales)."""
        site = surgery.get_module(model, row.site)
        _, _, transposed = surgery.features(site)
        ops: dict[str, list[FoldOp]] = {}
        for path in row.modules:
            mod = surgery.get_module(model, path)
            vec = torch.cat([torch.ones(mod.fixed), adapter[f"{path}.l"].float()])
            if mod.side == "input":
                fn = functools.partial(fold_input_scale, l=vec, transposed=transposed)
                ops.setdefault(f"{row.site}.weight", []).append(FoldOp(fn, late=True))
                continue
            ops.setdefault(f"{row.site}.weight", []).append(
                FoldOp(functools.partial(_scale_weight, l=vec, transposed=transposed))
            )
            if getattr(site, "bias", None) is not None:
                ops.setdefault(f"{row.site}.bias", []).append(FoldOp(functools.partial(_scale_bias, l=vec)))
        return ops

    def to_peft(self, model: nn.Module, rows: list[Any], adapter: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """PEFT ``ia3_l`` vectors by site (output scales ``(out, 1)``, input scales ``(1, in)``, listed in
        ``feedforward_modules``) and the IA³ part of ``adapter_config.json``."""
        tensors, ff, fan_in_fan_out = {}, [], False
        for row in rows:
            path = row.modules[0]
            mod = surgery.get_module(model, path)
            fan_in_fan_out |= surgery.features(surgery.get_module(model, row.site))[2]
            vec = torch.cat([torch.ones(mod.fixed, dtype=adapter[f"{path}.l"].dtype), adapter[f"{path}.l"]])
            tensors[f"{row.site}.ia3_l"] = vec[None, :] if mod.side == "input" else vec[:, None]
            if mod.side == "input":
                ff.append(row.site)
        return tensors, {"feedforward_modules": ff, "init_ia3_weights": True, "fan_in_fan_out": fan_in_fan_out}

    def from_peft(self, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[list[dict], Any]:
        """Recipe entries (one per side) and a function that checks each vector against the skeleton's modules
        and gives pelt's tensors.

        Raises:
            ExportRefused: a tensor that is not an IA³ vector, or a vector on a side pelt's ia3 does not scale.
        """
        sides: dict[str, list[str]] = {"input": [], "output": []}
        vectors = {}
        for name in sorted(state):
            if not name.endswith(".ia3_l"):
                raise ExportRefused(f"{name}: not an IA³ vector; pelt imports ia3_l tensors only")
            site, t = name[: -len(".ia3_l")], state[name]
            side = "input" if t.shape[0] == 1 and t.dim() == 2 and t.shape[1] > 1 else "output"
            sides[side].append(site)
            vectors[site] = (side, t.reshape(-1))
        entries = [
            {"method": self.name, "targets": sites, "params": {"ffn_placement": p}}
            for sites, p in ((sides["input"], "down_input"), (sides["output"], "up_output"))
            if sites
        ]
        return entries, functools.partial(_fit_vectors, vectors)


def _fit_vectors(vectors: dict[str, tuple[str, torch.Tensor]], skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """pelt's ``l`` tensors for PEFT vectors, each checked against the module pelt inserts at its site."""
    values = {}
    for site, (side, vec) in vectors.items():
        mod = skeleton.get_submodule(f"{site}.pelt_ia3")
        if mod.side != side or vec.numel() != mod.l.numel() + mod.fixed:
            raise ExportRefused(
                f"{site}: the PEFT vector scales the layer's {side} ({vec.numel()} wide); pelt's "
                f"ia3 scales its {mod.side} there"
            )
        if mod.fixed and not torch.equal(vec[: mod.fixed], torch.ones(mod.fixed, dtype=vec.dtype)):
            raise ExportRefused(
                f"{site}: the PEFT vector scales the q third of a fused QKV layer; pelt's ia3 keeps it at one"
            )
        values[f"{site}.pelt_ia3.l"] = vec[mod.fixed :].contiguous()
    return values


def _scale_weight(
    w: torch.Tensor,
    l: torch.Tensor,  # noqa: E741
    transposed: bool,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    return fold_output_scale(w, None, l, transposed, rows)[0]  # W' = diag(l) W


def _scale_bias(b: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    return b * l.float()  # (W x + b) ⊙ l → b' = l ⊙ b
