"""Bottleneck adapter (Houlsby 2019 / Pfeiffer 2020): ``h' = h + s · W_up σ(W_down h)``, ``W_up`` zero at init.

The adapter sits on the OUTPUT of the selected Linear/Conv1D layer (a forward hook ``y → y + s·A(y)``), i.e.
after the FFN or attention sub-block and before its residual add and LayerNorm: BERT ``output.dense`` /
``attention.output.dense``, LLaMA ``down_proj`` / ``o_proj``, Whisper ``fc2`` / ``out_proj``, GPT-2
``mlp.c_proj`` / ``attn.c_proj``. Placements:

* ``after_ffn`` (default): the recipe targets ``ffn.down`` (the method's default targets).
* ``after_attn``: the recipe must target ``attn.o`` (default targets are a class attribute and stay ``ffn.down``).
* ``parallel`` (He et al. 2022): ``FFN(h) + s·A(h)`` with ``h`` the FFN block's input, captured by a forward
  pre-hook on the layer's ``ffn.up`` (or ``ffn.gate``) sibling and added at the output of ``ffn.down``.

An adapter is non-linear: it cannot be merged into the base weights, only kept or pruned.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import PeltError
from pelt_cli.methods import Insertion, ModelSite, choice, linear_sites, register

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
PLACEMENTS = ("after_ffn", "after_attn", "parallel")
PLACEMENT_ROLE = {"after_ffn": "ffn.down", "after_attn": "attn.o", "parallel": "ffn.down"}
FFN_INPUT_ROLES = ("ffn.up", "ffn.gate")  # both read the FFN block's input; ffn.up preferred
DEFAULT_REDUCTION = 16.0


def bottleneck_size(d: int, size: int | None, reduction: float | None) -> int:
    """The bottleneck width ``r``: ``size`` if given, else ``⌊d / reduction⌋`` (reduction 16 when neither is set)."""
    if size is not None:
        return size
    return int(d // (reduction if reduction is not None else DEFAULT_REDUCTION))


def adapter_param_count(d: int, r: int, learn_scale: bool = False) -> int:
    """Trainable parameters of one adapter: ``d·r + r`` (W_down, b_down) ``+ r·d + d`` (W_up, b_up) ``+ 1`` (s)."""
    return d * r + r + r * d + d + (1 if learn_scale else 0)


class BottleneckAdapter(nn.Module):
    """The branch ``s · W_up dropout(σ(W_down h))`` (``W_up``, ``b_up`` zero, so the branch starts at 0).

    Args:
        in_features: width of ``h`` (the hooked layer's output, or the FFN input for ``parallel``).
        out_features: width of the branch output (the hooked layer's output width ``d``).
        rank: the bottleneck width ``r``.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
        dropout: dropout after the activation, inside the branch.
        scale: ``s``, the branch multiplier (its initial value when learned).
        learn_scale: make ``s`` a trainable scalar.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        activation: str = "relu",
        dropout: float = 0.0,
        scale: float = 1.0,
        learn_scale: bool = False,
    ) -> None:
        super().__init__()
        self.rank, self.activation = rank, activation
        self.act = ACTIVATIONS[activation]
        self.down = nn.Linear(in_features, rank)  # default (Kaiming-uniform) init; a no-op on meta
        self.up = nn.Linear(rank, out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale: Any = nn.Parameter(torch.tensor(float(scale))) if learn_scale else float(scale)
        self.gate: Any = None  # UniPELT sets a callable returning a gate broadcastable to the branch
        self.captured: torch.Tensor | None = None  # the FFN input, for the parallel placement

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The branch's output ``s · W_up dropout(σ(W_down h + b_down)) + s · b_up`` (times the gate, if set)."""
        z = F.linear(h, self.down.weight.to(h.dtype), self.down.bias.to(h.dtype))
        z = self.dropout(self.act(z))
        delta = F.linear(z, self.up.weight.to(h.dtype), self.up.bias.to(h.dtype))
        mult = self._multiplier(h.dtype)
        return delta if mult is None else delta * mult

    def _multiplier(self, dtype: torch.dtype) -> torch.Tensor | float | None:
        """``s · g`` in ``dtype`` (a scalar, or the gate's ``[B, 1, …]``); None for a fixed ``s = 1`` and no gate."""
        scale = self.scale.to(dtype) if isinstance(self.scale, torch.Tensor) else self.scale
        if self.gate is None:
            return None if isinstance(scale, float) and scale == 1.0 else scale
        gate = self.gate()
        return (gate if isinstance(scale, float) and scale == 1.0 else gate * scale).to(dtype)

    def add_to(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``y + forward(h)`` with the scale and gate applied to the bottleneck, not the output width.

        ``s·g·(W_up z + b_up) = [s·g·z, s·g] · [W_upᵀ; b_up]``: a ones column appended to the bottleneck ``z`` carries
        the bias, so the up-projection, bias, scale, gate and residual add are one ``addmm`` over ``y``. Written into
        ``y`` in place without autograd recording (``no_grad``, ``inference_mode``); into a new tensor with it (the
        sequential adapter's down-projection saved ``y`` for its weight gradient).
        """
        if not y.is_contiguous():
            return y + self(h)
        z = F.linear(h, self.down.weight.to(h.dtype), self.down.bias.to(h.dtype))
        z = self.dropout(self.act(z)).to(y.dtype)
        z = torch.cat([z, z.new_ones(*z.shape[:-1], 1)], dim=-1)
        mult = self._multiplier(y.dtype)
        if mult is not None:
            z = z * mult
        w = torch.cat([self.up.weight.t(), self.up.bias.unsqueeze(0)]).to(y.dtype)
        y2, z2 = y.view(-1, y.shape[-1]), z.reshape(-1, z.shape[-1])
        if torch.is_grad_enabled():
            return torch.addmm(y2, z2, w).view(y.shape)
        y2.addmm_(z2, w)
        return y

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"activation={self.activation}, learn_scale={isinstance(self.scale, nn.Parameter)}"


def _sequential_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.pelt_adapter.add_to(output, output)


def _capture_hook(adapter: BottleneckAdapter, module: nn.Module, args: tuple) -> None:
    # bound with functools.partial (not a closure) so that copy.deepcopy(model) rebinds it to the copied adapter
    adapter.captured = args[0]


def _parallel_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    adapter = module.pelt_adapter
    h, adapter.captured = adapter.captured, None
    if h is None:
        raise PeltError("parallel adapter: the FFN input was not captured before the FFN down projection ran")
    return adapter.add_to(output, h)


@dataclass(frozen=True)
class AdapterParams:
    """Hyper-parameters of ``adapter``."""

    size: int | None = field(
        default=None, metadata={"min": 1, "help": "bottleneck width r (give size or reduction, not both)"}
    )
    reduction: float | None = field(
        default=None, metadata={"min": 1e-9, "help": "r = d / reduction (16 when neither size nor reduction is given)"}
    )
    activation: str = field(default="relu", metadata={"choices": list(ACTIVATIONS), "help": "σ in the bottleneck"})
    placement: str = choice(
        "after_ffn",
        PLACEMENTS,
        "after_ffn (targets ffn.down), after_attn (targets attn.o) or parallel to the FFN (targets ffn.down)",
    )
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.999, "help": "dropout inside the branch"})
    scale: float = field(default=1.0, metadata={"help": "s, the branch multiplier (initial value if learned)"})
    learn_scale: bool = field(default=False, metadata={"help": "make s a trainable scalar"})

    @staticmethod
    def validate(kwargs: dict) -> list[str]:
        """``size`` and ``reduction`` both set the bottleneck: at most one may be given."""
        if kwargs.get("size") is not None and kwargs.get("reduction") is not None:
            return [
                f"size ({kwargs['size']}) and reduction ({kwargs['reduction']}) both set the bottleneck "
                "width; give only one of them"
            ]
        return []


def ffn_input_site(all_sites: list[ModelSite], site: ModelSite) -> ModelSite | None:
    """The ``ffn.up`` (else ``ffn.gate``) module of the same layer and block as ``site``: it reads the FFN input."""
    if site.layer is None:
        return None
    for role in FFN_INPUT_ROLES:
        hits = [s for s in all_sites if s.role == role and s.layer == site.layer and s.block == site.block]
        if hits:
            return max(hits, key=lambda s: len(os.path.commonprefix([s.module, site.module])))
    return None


@register
class AdapterMethod:
    """``adapter``: a bottleneck MLP added to the output of the FFN or attention sub-block, or beside the FFN."""

    name = "adapter"
    Params = AdapterParams
    default_targets = ("ffn.down",)  # placement after_attn: the recipe targets attn.o

    def check(self, model: nn.Module, params: AdapterParams, sites: list[ModelSite]) -> list[str]:
        """Sites must be Linear/Conv1D with the role the placement expects; ``1 ≤ r ≤ d``; parallel needs ffn.up."""
        problems = []
        all_sites = _all_sites(model) if params.placement == "parallel" else []
        expected = PLACEMENT_ROLE[params.placement]
        for s, mod in linear_sites(model, sites, self.name, problems, " (its output is what the adapter transforms)"):
            if s.role not in (expected, "unknown"):
                problems.append(
                    f"placement {params.placement} expects {expected} sites; {s.disk_module} has role "
                    f"{s.role} (set targets: [{expected}] or another placement)"
                )
            d = surgery.features(mod)[1]
            r = bottleneck_size(d, params.size, params.reduction)
            if r < 1:
                problems.append(
                    f"reduction {params.reduction or DEFAULT_REDUCTION:g} leaves no bottleneck at "
                    f"{s.disk_module} (d = {d} → r = {r}); expected reduction ≤ {d} or a size"
                )
            elif r > d:
                problems.append(
                    f"adapter size {r} is larger than the output width of {s.disk_module} (d = {d}); "
                    f"expected size ≤ {d}"
                )
            if params.placement == "parallel" and s.role == "ffn.down":
                up = ffn_input_site(all_sites, s)
                if up is None:
                    problems.append(
                        f"placement parallel needs the FFN input: {s.disk_module} has no ffn.up or "
                        f"ffn.gate module in its layer ({s.block} layer {s.layer})"
                    )
                elif surgery.is_linear(surgery.get_module(model, up.module)):
                    h = surgery.features(surgery.get_module(model, up.module))[0]
                    if h != d:
                        problems.append(
                            f"placement parallel: the FFN input of {s.disk_module} ({up.disk_module}, "
                            f"width {h}) differs from its output width {d}; expected equal widths"
                        )
        return problems

    def insert(self, model: nn.Module, params: AdapterParams, sites: list[ModelSite]) -> list[Insertion]:
        """Attach ``pelt_adapter`` to each layer and add its branch to the layer's output."""
        all_sites = _all_sites(model) if params.placement == "parallel" else []
        out = []
        for s in sites:
            mod = surgery.get_module(model, s.module)
            d = surgery.features(mod)[1]
            r = bottleneck_size(d, params.size, params.reduction)
            with torch.device(mod.weight.device):
                branch = BottleneckAdapter(d, d, r, params.activation, params.dropout, params.scale, params.learn_scale)
            path = surgery.attach(model, s.module, "adapter", branch)
            note = f"r={r} {params.placement}"
            if params.placement == "parallel":
                up = ffn_input_site(all_sites, s)
                if up is None:
                    raise PeltError(f"placement parallel: no ffn.up/ffn.gate module beside {s.disk_module}")
                surgery.hook_input(model, up.module, functools.partial(_capture_hook, branch))
                surgery.hook_output(model, s.module, _parallel_hook)
                note += f" (input of {up.module})"
            else:
                surgery.hook_output(model, s.module, _sequential_hook)
            out.append(Insertion(s.module, s.role, self.name, [path], note))
        return out


def _all_sites(model: nn.Module) -> list[ModelSite]:
    from pelt_cli import targets

    return targets.view(model).sites
