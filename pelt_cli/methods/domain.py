"""Transformer domain adapter: a small Transformer between two submodules, ``out = x + scale · g ⊙ Δ``.

Placed between an encoder and the projector that consumes its features (Qwen2-Audio: ``audio_tower`` →
``multi_modal_projector``; LLaVA: ``vision_tower`` → ``multi_modal_projector``) to map one input domain onto the
features the projector was trained on. Input and output shapes are identical. Inside: positional encoding →
N pre-norm Transformer encoder layers → ``Linear(d, d)`` + ``LayerNorm(d)`` giving Δ → per-timestep gate
``g = σ(Linear(d, 1)(x))``. It is attached as ``<before>.pelt_domain`` and runs in a forward pre-hook on
``before``, replacing that module's first positional input ``x`` with ``adapter(x)``.

The recipe's ``targets`` are not used: the two module names come from the params (on-disk names as
``pelt inspect`` shows them, or in-memory names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import PeltError
from pelt_cli.methods import GateUnit, Insertion, ModelSite, register

# preset → (layers, heads, ffn); the ffn size is taken as given whatever the model's width (see ``ffn_ratio``)
PRESETS: dict[str, tuple[int, int, int]] = {
    "lightweight": (1, 4, 1024),
    "standard": (2, 8, 2048),
    "heavy": (4, 16, 4096),
}
POS_KINDS = ["sinusoidal", "learned", "none"]


def sinusoidal_positions(length: int, width: int, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """Fixed encoding ``PE[t, 2i] = sin(t / 10000^(2i/d))``, ``PE[t, 2i+1] = cos(t / 10000^(2i/d))``; [length, d]."""
    half = (width + 1) // 2
    t = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / width))
    angles = t * freq[None, :]
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(length, 2 * half)[:, :width]
    return pe.to(dtype) if dtype is not None else pe


def gated_residual(x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The adapter's output ``out = x + scale · g ⊙ Δ``."""
    return x + scale * gate * delta


def encoder_layer_params(width: int, ffn: int) -> int:
    """Parameters of one ``nn.TransformerEncoderLayer``: in_proj 3d²+3d, out_proj d²+d, FFN 2·d·ff+ff+d, 2 LNs 4d."""
    return (3 * width * width + 3 * width) + (width * width + width) + (2 * width * ffn + ffn + width) + 4 * width


def domain_param_count(width: int, layers: int, ffn: int, pos: str = "sinusoidal", max_len: int = 1500) -> int:
    """Parameters of a :class:`DomainAdapter`: ``N·layer + (d²+d) proj + 2d LN + (d+1) gate + 1 scale [+ L·d]``."""
    extra = max_len * width if pos == "learned" else 0
    return layers * encoder_layer_params(width, ffn) + (width * width + width) + 2 * width + (width + 1) + 1 + extra


class DomainAdapter(nn.Module):
    """``out = x + scale · σ(Linear(x)) ⊙ LayerNorm(Linear(Transformer(x + PE)))``, identity at init.

    Computes in its own parameters' dtype (fp32 unless cast) and adds the residual in the input's dtype, so it
    works inside bf16/fp16 models. Keeps the detached gate of the last forward in ``last_gate`` ([B, T, 1]).

    Args:
        width: ``d``, the feature width (last dimension of the input).
        layers: number of encoder layers ``N``.
        heads: attention heads (must divide ``width``).
        ffn: inner width of each layer's feed-forward ``d → ff → d``.
        dropout: dropout inside the encoder layers.
        scale_init: initial value of the learned scalar ``scale``.
        pos: ``sinusoidal`` (fixed, no parameters), ``learned`` (``max_len × d`` table) or ``none``.
        max_len: the longest sequence the learned table covers.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        ffn: int,
        dropout: float = 0.1,
        scale_init: float = 0.1,
        pos: str = "sinusoidal",
        max_len: int = 1500,
    ) -> None:
        super().__init__()
        self.width, self.pos, self.max_len = width, pos, max_len
        self.pos_embed = nn.Parameter(torch.zeros(max_len, width)) if pos == "learned" else None
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    width, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True
                )
                for _ in range(layers)
            ]
        )
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.gate = nn.Linear(width, 1)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.last_gate: torch.Tensor | None = None
        if self.proj.weight.device.type != "meta":
            # gamma = beta = 0 makes Δ exactly 0 at step 0 while d(out)/d(gamma) = scale·g·norm(h) ≠ 0 keeps it learning
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)
            if self.pos_embed is not None:
                nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ([..., T, d]) plus the gated, scaled correction; same shape and dtype as ``x``."""
        shape = x.shape
        h = x.reshape(-1, shape[-2], shape[-1]) if x.dim() != 3 else x
        h = h.to(self.proj.weight.dtype)
        length = h.shape[1]
        z = h
        if self.pos == "sinusoidal":
            z = z + sinusoidal_positions(length, self.width, h.device, h.dtype)
        elif self.pos_embed is not None:
            if length > self.max_len:
                raise PeltError(
                    f"domain adapter: sequence of {length} steps is longer than max_len {self.max_len} "
                    "of its learned positions",
                    hint="raise max_len or use pos: sinusoidal",
                )
            z = z + self.pos_embed[:length].to(h.dtype)
        for layer in self.layers:
            z = layer(z)
        delta = self.norm(self.proj(z))
        g = torch.sigmoid(self.gate(h))
        self.last_gate = g.detach()
        return gated_residual(h, delta, g, self.scale.to(h.dtype)).reshape(shape).to(x.dtype)

    def gate_stats(self) -> dict[str, float]:
        """``mean``, ``std``, ``min`` and ``max`` of the per-timestep gate of the last forward.

        Raises:
            PeltError: the adapter has not run yet.
        """
        if self.last_gate is None:
            raise PeltError("domain adapter: no forward has run yet, so there is no gate to summarise")
        g = self.last_gate.float()
        return {
            "mean": g.mean().item(),
            "std": g.std(unbiased=False).item(),
            "min": g.min().item(),
            "max": g.max().item(),
        }


def _domain_hook(module: nn.Module, args: tuple) -> tuple:
    if not args:
        raise PeltError(f"domain adapter: {type(module).__name__} was called without a positional input to adapt")
    return (module.pelt_domain(args[0]), *args[1:])


@dataclass(frozen=True)
class DomainParams:
    """Hyper-parameters of ``domain``."""

    preset: str = field(
        default="lightweight",
        metadata={
            "choices": list(PRESETS),
            "help": "lightweight (1 layer, 4 heads, FFN 1024), standard (2, 8, 2048), heavy (4, 16, 4096)",
        },
    )
    layers: int | None = field(default=None, metadata={"min": 1, "help": "encoder layers (overrides the preset)"})
    heads: int | None = field(default=None, metadata={"min": 1, "help": "attention heads; must divide the width"})
    ffn: int | None = field(default=None, metadata={"min": 1, "help": "feed-forward inner width (overrides preset)"})
    ffn_ratio: float | None = field(default=None, metadata={"min": 1e-9, "help": "ffn = round(ratio · width)"})
    dropout: float = field(default=0.1, metadata={"min": 0.0, "max": 0.999, "help": "dropout in encoder layers"})
    scale_init: float = field(default=0.1, metadata={"help": "initial value of the learned output scale"})
    after: str = field(default="audio_tower", metadata={"help": "module whose output the adapter reads"})
    before: str = field(default="multi_modal_projector", metadata={"help": "module whose input the adapter writes"})
    pos: str = field(default="sinusoidal", metadata={"choices": POS_KINDS, "help": "positional encoding"})
    max_len: int = field(default=1500, metadata={"min": 1, "help": "longest sequence of learned positions"})
    width: int | None = field(default=None, metadata={"min": 1, "help": "feature width (default: inferred)"})

    @staticmethod
    def validate(kwargs: dict) -> list[str]:
        """``ffn`` and ``ffn_ratio`` are alternatives."""
        if kwargs.get("ffn") is not None and kwargs.get("ffn_ratio") is not None:
            return ["give ffn or ffn_ratio, not both"]
        return []


def resolve_shape(params: DomainParams, width: int) -> tuple[int, int, int]:
    """``(layers, heads, ffn)``: the preset's, overridden by ``layers``/``heads``/``ffn``/``ffn_ratio``."""
    layers, heads, ffn = PRESETS[params.preset]
    if params.ffn_ratio is not None:
        ffn = max(1, round(params.ffn_ratio * width))
    return (params.layers or layers, params.heads or heads, params.ffn or ffn)


def resolve_module(model: nn.Module, name: str) -> str | None:
    """The in-memory path of a module named in memory form or on-disk form (``audio_tower``), or None."""
    if not name:
        return None
    try:
        model.get_submodule(name)
        return name
    except AttributeError:
        pass
    from pelt_cli.keymap import key_map

    try:
        km = key_map(model)
    except Exception:  # not a transformers model: there are no disk names to try
        return None
    for disk, mem in km.to_memory.items():
        if not disk.startswith(name + "."):
            continue
        suffix = disk[len(name) + 1 :]
        if mem.endswith("." + suffix):
            path = mem[: -len(suffix) - 1]
            try:
                model.get_submodule(path)
                return path
            except AttributeError:
                continue
    return None


def _first_linear(module: nn.Module) -> nn.Module | None:
    return next((m for m in module.modules() if surgery.is_linear(m)), None)


def _hint(model: nn.Module) -> str:
    names = []
    for n, child in model.named_children():
        names.append(n)
        names += [f"{n}.{c}" for c, _ in child.named_children() if not c.isdigit()][:8]
    return ", ".join(names[:16])


@register
class DomainMethod:
    """``domain``: a Transformer domain adapter between two named submodules (``after`` → ``before``)."""

    name = "domain"
    Params = DomainParams
    default_targets: tuple[str, ...] = ()

    def _places(self, model: nn.Module, params: DomainParams) -> tuple[str | None, str | None]:
        return resolve_module(model, params.after), resolve_module(model, params.before)

    def _width(self, model: nn.Module, params: DomainParams, before: str) -> int | None:
        if params.width is not None:
            return params.width
        lin = _first_linear(surgery.get_module(model, before))
        return surgery.features(lin)[0] if lin is not None else None

    def check(self, model: nn.Module, params: DomainParams, sites: list[ModelSite]) -> list[str]:
        """Both modules exist; ``before`` takes ``[.., d]`` input; heads divide ``d``. ``sites`` are ignored."""
        problems = []
        after, before = self._places(model, params)
        for key, value, found in (("after", params.after, after), ("before", params.before, before)):
            if found is None:
                problems.append(
                    f"{key}: module {value!r} not found in {type(model).__name__}; its modules include {_hint(model)}"
                )
        if before is None:
            return problems
        if after is not None and after == before:
            problems.append(f"after and before are the same module {after!r}; expected two adjacent modules")
        mod = surgery.get_module(model, before)
        if isinstance(mod, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            problems.append(
                f"before: {params.before!r} is a {type(mod).__name__}, which would run an inserted child "
                f"itself; name its first layer instead (e.g. {params.before}.0)"
            )
        lin = _first_linear(mod)
        width = self._width(model, params, before)
        if width is None:
            problems.append(
                f"before: cannot infer the feature width of {params.before!r} (no Linear layer in it); set width"
            )
            return problems
        if lin is not None and surgery.features(lin)[0] != width:
            problems.append(
                f"width {width} does not match {params.before!r}, whose first Linear takes "
                f"{surgery.features(lin)[0]} features; expected width {surgery.features(lin)[0]}"
            )
        _, heads, _ = resolve_shape(params, width)
        if width % heads:
            divisors = [h for h in range(1, min(width, 64) + 1) if width % h == 0]
            problems.append(
                f"heads {heads} does not divide the width {width} of {params.before!r}; expected one of "
                f"{', '.join(map(str, divisors))}"
            )
        return problems

    def insert(self, model: nn.Module, params: DomainParams, sites: list[ModelSite]) -> list[Insertion]:
        """Attach ``pelt_domain`` to ``before`` and route ``before``'s first input through it."""
        after, before = self._places(model, params)
        if after is None or before is None:
            raise PeltError(f"domain: module {params.after if after is None else params.before!r} not found")
        width = self._width(model, params, before)
        if width is None:
            raise PeltError(f"domain: cannot infer the feature width of {params.before!r}; set width")
        layers, heads, ffn = resolve_shape(params, width)
        mod = surgery.get_module(model, before)
        weight = next(mod.parameters(), None)
        if weight is None:
            weight = next(model.parameters())
        with torch.device(weight.device):
            adapter = DomainAdapter(
                width, layers, heads, ffn, params.dropout, params.scale_init, params.pos, params.max_len
            )
        path = surgery.attach(model, before, "domain", adapter)
        surgery.hook_input(model, before, _domain_hook)
        note = f"between {after} and {before}: d={width}, {layers} layers, {heads} heads, ffn {ffn}"
        return [Insertion(before, "projector", self.name, [path], note)]

    def gate_units(self, entry: int, params: DomainParams, rows: list[tuple[int, Any]]) -> list[GateUnit]:
        """The adapter is one unit, gated by its own per-timestep gate."""
        return [GateUnit(entry, self.name, rows[0][0], tuple(i for i, _ in rows), ("domain", "gate"))] if rows else []

    def pruned_entries(
        self, entry: dict[str, Any], decided: list[tuple[GateUnit, str]], rows: list[Any]
    ) -> list[dict[str, Any]]:
        """A pruned domain adapter goes whole."""
        return []

    def param_group(self, name: str) -> str | None:
        """The learned ``scale`` trains in its own group (the guide: a higher learning rate, no weight decay)."""
        return "scale" if name.endswith("pelt_domain.scale") else None
