"""UniPELT (Mao et al., ACL 2022): LoRA + Prefix + Adapter in each layer, each behind its own learned gate.

Per selected layer one gate controller (``pelt_gate``, attached to the layer's query projection) reads the
layer's attention input ``h`` when the query projection runs — before any gated branch of that layer runs — and
computes one gate per enabled module and per sequence:

* ``sigmoid`` (the paper): ``G_m = mean_t σ(W_m h_t / T)`` — independent gates in (0, 1);
* ``softmax`` (the practical guide's variant): ``softmax(W_2 ReLU(W_1 mean_t h_t) / T)`` with a hidden width of
  64 — the gates sum to 1.

Initial gates: with ``gate_init`` g (sigmoid gates only) each gate's bias is ``T·logit(g)`` and its weights small
(``gate_weight_init``: ``normal`` N(0, 0.02), the default then; ``xavier``; ``zeros``), so the mean gate starts
at ≈ g (the guide's "mostly closed" 0.1). Without it (the default) the controller keeps PyTorch's default
initialisation: gates start at 0.40–0.55, as in every pelt run so far. Softmax gates sum to 1 and so cannot all
start at g: ``gate_init`` is refused for them; ``gate_weight_init`` applies to the MLP's output layer (bias zeroed;
``zeros`` starts them exactly uniform, 1/k each).

Gate-L scales the LoRA deltas, Gate-P the prefix keys/values, Gate-A the adapter branch. LoRA's B and the
adapter's up-projection start at zero, so without the prefix the model is the base model at step 0.
The controller keeps the last gates and running statistics (mean, std, min, max) for ``pelt train``/``prune``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import MergeRefused, PeltError, PruneRefused
from pelt_cli.methods import FoldOp, GateUnit, Insertion, ModelSite, register
from pelt_cli.methods.adapter import AdapterMethod, AdapterParams
from pelt_cli.methods.lora import LoRAMethod, LoRAParams
from pelt_cli.methods.prefix import PrefixMethod, PrefixParams

MODULES = ("lora", "prefix", "adapter")
PREFIX_ROLES = ("attn.k", "attn.qkv")
LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|blocks)\.\d+)\.")
FOLD_EVERY = 64  # forwards whose gates a controller keeps before folding them into its statistics
HIST_BINS = 10  # a gate histogram: counts in equal bins on [0, 1], gathered with the statistics (evaluation only)


def bin_counts(values: torch.Tensor, bins: int = HIST_BINS) -> torch.Tensor:
    """Per column of ``values`` [N, k] in [0, 1], the counts in ``bins`` equal bins (1.0 in the last) → [k, bins]."""
    idx = (values.double() * bins).floor().long().clamp_(0, bins - 1)
    return torch.nn.functional.one_hot(idx, bins).sum(0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``Σ_t m_t x_t / Σ_t m_t`` over dim 1 (all positions without a mask): padding never moves the mean."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def sigmoid_gates(
    h: torch.Tensor, proj: nn.Linear, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Paper gates ``G = mean_t σ(W h_t / T)`` over real tokens: ``h`` [B, T, d], ``mask`` [B, T] → [B, k]."""
    return masked_mean(torch.sigmoid(proj(h) / temperature), mask)


def softmax_gates(
    h: torch.Tensor, mlp: nn.Sequential, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Guide gates ``softmax(W_2 ReLU(W_1 mean_t h) / T)``, the mean over real tokens: → [B, k], rows sum to 1."""
    return torch.softmax(mlp(masked_mean(h, mask)) / temperature, dim=-1)


class TokenMask:
    """The attention mask of the current forward, captured from the model's call for the gate controllers.

    Gates pool over real tokens only. With a KV cache a decoder is called with the mask of past and new tokens while
    a layer sees only the new ones: the gates of a generation step pool over that step's tokens (the mask's last
    columns), so they are what the same tokens would get in a forward of their own.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: keep a 2-D ``attention_mask`` (None otherwise)."""
        mask = kwargs.get("attention_mask")
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def for_states(self, h: torch.Tensor) -> torch.Tensor | None:
        """The mask of hidden states ``h`` [B, T, d]: the last T columns of the call's mask, if it fits."""
        m = self.mask
        if m is None or m.shape[0] != h.shape[0] or m.shape[1] < h.shape[1] or h.dim() != 3:
            return None
        return m[:, m.shape[1] - h.shape[1] :].to(h.device)


class GateController(nn.Module):
    """Computes a layer's UniPELT gates from its attention input and keeps their statistics.

    Args:
        width: the layer's hidden width d.
        names: the gated modules, in gate order (e.g. ``["lora", "prefix", "adapter"]``).
        mode: ``sigmoid`` or ``softmax``.
        hidden: hidden width of the softmax gate MLP.
        temperature: T, dividing the gate logits.
        gate_init: the mean sigmoid gate at initialisation (None: PyTorch's default initialisation).
        weight_init: ``auto`` (``normal`` with ``gate_init``, else PyTorch's), ``torch``, ``normal``, ``xavier`` or
            ``zeros``: the gate weights (the softmax MLP's output layer).
    """

    def __init__(
        self,
        width: int,
        names: list[str],
        mode: str = "sigmoid",
        hidden: int = 64,
        temperature: float = 1.0,
        gate_init: float | None = None,
        weight_init: str = "auto",
    ) -> None:
        super().__init__()
        self.names, self.mode, self.temperature = list(names), mode, temperature
        k = len(self.names)
        if mode == "softmax":
            self.net: nn.Module = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, k))
        else:
            self.net = nn.Linear(width, k)
        self.init_gates(gate_init, weight_init)
        self.current: torch.Tensor | None = None
        self.tokens = TokenMask()  # replaced by the one the model's call hook fills (see UniPELTMethod.insert)
        self.reset_stats()
        self.measuring = False  # statistics are gathered only between start_measuring and stop_measuring
        self.fixed: float | None = None  # every gate held at this value (the no-gate ablation: 1.0); None: learned

    def init_gates(self, gate_init: float | None, weight_init: str = "auto") -> None:
        """Initialise the gate layer: small or default weights, and the bias that makes the mean gate ``gate_init``.

        Raises:
            PeltError: ``gate_init`` on softmax gates (they sum to 1), or out of (0, 1).
        """
        if gate_init is not None and (self.mode == "softmax" or not 0 < gate_init < 1):
            raise PeltError(f"internal: gate_init {gate_init} applies to sigmoid gates only, in (0, 1)")
        last = self.net[-1] if isinstance(self.net, nn.Sequential) else self.net
        kind = weight_init if weight_init != "auto" else ("torch" if gate_init is None else "normal")
        with torch.no_grad():
            if kind == "normal":
                nn.init.normal_(last.weight, 0.0, 0.02)
            elif kind == "xavier":
                nn.init.xavier_uniform_(last.weight)
            elif kind == "zeros":
                nn.init.zeros_(last.weight)
            if gate_init is not None:
                last.bias.fill_(self.temperature * math.log(gate_init / (1 - gate_init)))
            elif kind != "torch":
                last.bias.zero_()

    def reset_stats(self) -> None:
        """Forget the accumulated statistics."""
        k, cpu = len(self.names), torch.device("cpu")
        self._pending: list[torch.Tensor] = []
        self._n = 0
        self._sum = torch.zeros(k, dtype=torch.float64, device=cpu)
        self._sq = torch.zeros(k, dtype=torch.float64, device=cpu)
        self._min = torch.full((k,), float("inf"), dtype=torch.float64, device=cpu)
        self._max = torch.full((k,), float("-inf"), dtype=torch.float64, device=cpu)
        self._hist = torch.zeros(k, HIST_BINS, dtype=torch.int64, device=cpu)

    def start_measuring(self) -> None:
        """Forget the statistics and gather them from every forward until :meth:`stop_measuring` (an evaluation)."""
        self.reset_stats()
        self.measuring = True

    def stop_measuring(self) -> dict[str, dict[str, float]]:
        """The statistics since :meth:`start_measuring`; forwards after this are not counted."""
        self.measuring = False
        return self.stats()

    def compute(self, h: torch.Tensor) -> torch.Tensor:
        """Gates [B, k] for hidden states [B, T, d]; kept as ``current``, counted in the statistics while measuring.

        Only forwards between :meth:`start_measuring` and :meth:`stop_measuring` count (an evaluation); training
        steps and plain inference pay nothing. Only a detached reference is kept here: the gates are folded into the
        running sums, on the CPU in float64, when :meth:`stats` asks or every :data:`FOLD_EVERY` forwards — about
        ten small ops and, on a GPU, a device sync saved per layer and forward.
        """
        x = h.to(next(self.net.parameters()).dtype)
        mask = self.tokens.for_states(x)
        if self.fixed is not None:
            g = x.new_full((x.shape[0], len(self.names)), self.fixed)
        elif self.mode == "softmax":
            g = softmax_gates(x, self.net, self.temperature, mask)
        else:
            g = sigmoid_gates(x, self.net, self.temperature, mask)
        self.current = g
        if self.measuring and g.device.type != "meta" and g.numel():
            self._pending.append(g.detach())
            if len(self._pending) >= FOLD_EVERY:
                self._fold()
        return g

    def _fold(self) -> None:
        """Add the pending gates to the running count, sums, minimum and maximum."""
        if not self._pending:
            return
        d = torch.cat(self._pending).to("cpu", torch.float64)
        self._pending = []
        self._n += d.shape[0]
        self._sum += d.sum(0)
        self._sq += (d * d).sum(0)
        self._min = torch.minimum(self._min, d.min(0).values)
        self._max = torch.maximum(self._max, d.max(0).values)
        self._hist += bin_counts(d)

    def value(self, name: str) -> torch.Tensor:
        """The current gate of one module as a [B] tensor."""
        if self.current is None:
            raise RuntimeError("gate read before the layer's query projection ran")
        return self.current[:, self.names.index(name)]

    def stats(self) -> dict[str, dict[str, float]]:
        """Per gated module: mean, std, min, max, count and ``hist`` (:func:`bin_counts`) of the sequences measured."""
        self._fold()
        out = {}
        for i, name in enumerate(self.names):
            if self._n == 0:
                out[name] = {
                    "mean": float("nan"),
                    "std": float("nan"),
                    "min": float("nan"),
                    "max": float("nan"),
                    "count": 0,
                    "hist": [0] * HIST_BINS,
                }
                continue
            mean = self._sum[i].item() / self._n
            var = max(self._sq[i].item() / self._n - mean * mean, 0.0)
            out[name] = {
                "mean": mean,
                "std": var**0.5,
                "min": self._min[i].item(),
                "max": self._max[i].item(),
                "count": self._n,
                "hist": self._hist[i].tolist(),
            }
        return out


class GateRef:
    """A gate read: ``controller.value(name)`` reshaped to broadcast over a branch of ``dims`` dimensions."""

    def __init__(self, controller: GateController, name: str, dims: int) -> None:
        self.controller, self.name, self.dims = controller, name, dims

    def __call__(self) -> torch.Tensor:
        g = self.controller.value(self.name)
        return g.reshape(g.shape[0], *([1] * (self.dims - 1)))


def _gate_hook(module: nn.Module, args: tuple) -> None:
    module.pelt_gate.compute(args[0])


@dataclass(frozen=True)
class UniLoRA:
    """The LoRA part of UniPELT."""

    rank: int = field(default=8, metadata={"min": 1})
    alpha: float = field(default=16.0, metadata={"min": 1e-9})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.999})
    targets: list[str] = field(
        default_factory=lambda: ["attn.q", "attn.v"], metadata={"help": "roles in each layer that get LoRA"}
    )


@dataclass(frozen=True)
class UniPrefix:
    """The prefix part of UniPELT."""

    length: int = field(default=10, metadata={"min": 1})
    reparam: bool = False
    reparam_hidden: int = field(default=512, metadata={"min": 1})


@dataclass(frozen=True)
class UniAdapter:
    """The adapter part of UniPELT."""

    reduction: float | None = field(default=16.0, metadata={"min": 1e-9})
    size: int | None = field(default=None, metadata={"min": 1})
    activation: str = field(default="relu", metadata={"choices": ["relu", "gelu", "silu", "tanh"]})
    placement: str = field(default="after_ffn", metadata={"choices": ["after_ffn", "parallel"]})


@dataclass(frozen=True)
class UniPELTParams:
    """Hyper-parameters of ``unipelt`` (paper defaults: prefix length 10, adapter reduction 16, LoRA r=8)."""

    modules: list[str] = field(
        default_factory=lambda: list(MODULES),
        metadata={"choices": list(MODULES), "help": "which of lora, prefix, adapter to use"},
    )
    gate: str = field(default="sigmoid", metadata={"choices": ["sigmoid", "softmax"]})
    gate_hidden: int = field(default=64, metadata={"min": 1, "help": "hidden width of the softmax gate MLP"})
    temperature: float = field(default=1.0, metadata={"min": 1e-6, "help": "gate temperature T"})
    gate_init: float | None = field(
        default=None,
        metadata={
            "min": 1e-4,
            "max": 0.9999,
            "help": "mean sigmoid gate at initialisation, through the gate bias (the guide: 0.1); "
            "unset: PyTorch's default initialisation, gates ≈ 0.4–0.55",
        },
    )
    gate_weight_init: str = field(
        default="auto",
        metadata={
            "choices": ["auto", "torch", "normal", "xavier", "zeros"],
            "help": "gate weights: N(0, 0.02), Xavier, zeros or PyTorch's default "
            "(auto: normal with gate_init, else torch)",
        },
    )
    pruned: list[str] = field(
        default_factory=list,
        metadata={
            "choices": list(MODULES),
            "help": "modules removed by pelt prune: still gated (the other gates keep their values), not inserted",
        },
    )
    lora: UniLoRA = field(default_factory=UniLoRA)
    prefix: UniPrefix = field(default_factory=UniPrefix)
    adapter: UniAdapter = field(default_factory=UniAdapter)

    @staticmethod
    def validate(kwargs: dict) -> list[str]:
        """At least one module; each at most once; size and reduction not both."""
        mods = kwargs.get("modules", list(MODULES))
        problems = []
        if kwargs.get("gate_init") is not None and kwargs.get("gate") == "softmax":
            problems.append(
                "gate_init: softmax gates sum to 1, so they cannot all start at one value; they start near uniform "
                "(exactly 1/k with gate_weight_init: zeros). Use gate_init with gate: sigmoid"
            )
        if isinstance(mods, list) and (not mods or len(set(mods)) != len(mods)):
            problems.append(f"modules {mods}: expected a non-empty list of distinct names from {', '.join(MODULES)}")
        pruned = kwargs.get("pruned", [])
        if isinstance(mods, list) and isinstance(pruned, list):
            if set(pruned) - set(mods):
                problems.append(f"pruned {pruned}: every pruned module must be one of modules {mods}")
            elif mods and set(pruned) >= set(mods):
                problems.append(f"pruned {pruned}: prunes every module; remove the entry instead")
        return problems


def layer_path(module: str) -> str | None:
    """``encoder.layer.3.attention.self.query`` → ``encoder.layer.3`` (None outside repeated blocks)."""
    m = LAYER_RE.match(module + ".")
    return m.group(1) if m else None


def _adapter_params(p: UniAdapter) -> AdapterParams:
    if p.size is not None:
        return AdapterParams(size=p.size, activation=p.activation, placement=p.placement)
    return AdapterParams(reduction=p.reduction, activation=p.activation, placement=p.placement)


@register
class UniPELTMethod:
    """``unipelt``: gated LoRA + Prefix + Adapter in each layer that has a selected query projection."""

    name = "unipelt"
    Params = UniPELTParams
    default_targets = ("attn.q",)

    def _layers(self, model: nn.Module, params: UniPELTParams, sites: list[ModelSite]) -> list[dict[str, Any]]:
        from pelt_cli.targets import view

        everything = view(model).sites
        layers, seen = [], set()
        for s in sites:  # one controller per layer: the first selected query projection (Whisper: self-attention)
            path = layer_path(s.module) or s.module
            if path in seen:
                continue
            seen.add(path)
            same = [x for x in everything if x.block == s.block and (layer_path(x.module) or x.module) == path]
            lora = [x for x in same if x.role in params.lora.targets]
            if not lora and "attn.q" in params.lora.targets:  # fused attention (GPT-2): LoRA on the q, v thirds
                lora = [x for x in same if x.role == "attn.qkv"]
            layers.append(
                {
                    "anchor": s,
                    "lora": lora,
                    "prefix": [x for x in same if x.role in PREFIX_ROLES][:1],
                    "adapter": [x for x in same if x.role == "ffn.down"][:1],
                }
            )
        return layers

    def check(self, model: nn.Module, params: UniPELTParams, sites: list[ModelSite]) -> list[str]:
        """Every selected layer needs the parts its modules use; each part's own checks apply."""
        problems = []
        for s in sites:
            if s.role not in ("attn.q", "attn.qkv"):
                problems.append(
                    f"{s.disk_module} has role {s.role}; unipelt selects layers by their query "
                    "projection (attn.q, or attn.qkv for fused attention)"
                )
        if problems:
            return problems
        for layer in self._layers(model, params, sites):
            a = layer["anchor"]
            for part in params.modules:
                if not layer[part] and part not in params.pruned:
                    problems.append(f"{part}: no site for it in {a.block} layer {a.layer} ({a.disk_module})")
        lora_sites = [x for lay in self._layers(model, params, sites) for x in lay["lora"]]
        if "lora" in params.modules and "lora" not in params.pruned and lora_sites:
            problems += LoRAMethod().check(model, self._lora_params(params, lora_sites), lora_sites)
        return problems

    @staticmethod
    def _lora_params(params: UniPELTParams, sites: list[ModelSite]) -> LoRAParams:
        fused = ["q", "v"] if any(s.role == "attn.qkv" for s in sites) else None
        return LoRAParams(
            rank=params.lora.rank, alpha=params.lora.alpha, dropout=params.lora.dropout, fused_parts=fused
        )

    def insert(self, model: nn.Module, params: UniPELTParams, sites: list[ModelSite]) -> list[Insertion]:
        """Insert the enabled modules per layer, then a gate controller whose gates they read."""
        out, tokens = [], TokenMask()
        surgery.hook_call(model, "", tokens)
        for layer in self._layers(model, params, sites):
            anchor: ModelSite = layer["anchor"]
            q = surgery.get_module(model, anchor.module)
            width = surgery.features(q)[0]
            with torch.device(q.weight.device):
                ctl = GateController(
                    width,
                    list(params.modules),
                    params.gate,
                    params.gate_hidden,
                    params.temperature,
                    params.gate_init,
                    params.gate_weight_init,
                )
            ctl.tokens = tokens
            gate_path = surgery.attach(model, anchor.module, "gate", ctl)
            surgery.hook_input(model, anchor.module, _gate_hook)
            inserted: list[Insertion] = []
            if "lora" in params.modules and "lora" not in params.pruned:
                ins = LoRAMethod().insert(model, self._lora_params(params, layer["lora"]), layer["lora"])
                self._gate(model, ins, ctl, "lora", 3)
                inserted += ins
            if "prefix" in params.modules and "prefix" not in params.pruned:
                pp = PrefixParams(
                    length=params.prefix.length,
                    reparam=params.prefix.reparam,
                    reparam_hidden=params.prefix.reparam_hidden,
                )
                ins = PrefixMethod().insert(model, pp, layer["prefix"])
                self._gate(model, ins, ctl, "prefix", 4)
                inserted += ins
            if "adapter" in params.modules and "adapter" not in params.pruned:
                ins = AdapterMethod().insert(model, _adapter_params(params.adapter), layer["adapter"])
                self._gate(model, ins, ctl, "adapter", 3)
                inserted += ins
            for ins in inserted:
                ins.method = f"{self.name}.{ins.method}"
            note = f"{params.gate} gates over {', '.join(params.modules)} (T={params.temperature})"
            if params.gate_init is not None:
                note += f"; initial gate {params.gate_init}"
            if params.pruned:
                note += f"; pruned: {', '.join(params.pruned)}"
            out.append(Insertion(anchor.module, "gate", f"{self.name}.gate", [gate_path], note))
            out += inserted
        return out

    @staticmethod
    def _gate(model: nn.Module, insertions: list[Insertion], ctl: GateController, name: str, dims: int) -> None:
        for ins in insertions:
            for path in ins.modules:
                surgery.get_module(model, path).gate = GateRef(ctl, name, dims)

    def foldable(self, row: Any) -> str | None:
        """Only the gated LoRA folds, and only with its gate frozen (``gated``): the gate depends on the input."""
        return "gated" if row.method == f"{self.name}.lora" else None

    def fold(
        self, model: nn.Module, row: Any, adapter: dict[str, torch.Tensor], gate: float | None = None
    ) -> dict[str, list[FoldOp]]:
        """The gated LoRA folded with its gate fixed at ``gate``: ``W' = W + g·(α/r) B A`` (approximate)."""
        if gate is None or row.method != f"{self.name}.lora":
            raise PeltError(f"internal: {row.method} at {row.disk_site} folds only as gated LoRA with a frozen gate")
        return LoRAMethod().fold(model, row, adapter, gate)

    def gate_units(self, entry: int, params: UniPELTParams, rows: list[tuple[int, Any]]) -> list[GateUnit]:
        """One unit per layer and module: the layer's gate controller row and the rows it gates."""
        groups: list[tuple[int, Any, list[tuple[int, Any]]]] = []
        for i, row in rows:
            if row.method == f"{self.name}.gate":
                groups.append((i, row, []))
            elif groups:
                groups[-1][2].append((i, row))
        return [
            GateUnit(
                entry,
                name,
                g,
                tuple(i for i, r in members if r.method == f"{self.name}.{name}"),
                ("layers", gate.site, name),
                pruned=name in params.pruned,
            )
            for g, gate, members in groups
            for name in params.modules
        ]

    def pruned_entries(
        self, entry: dict[str, Any], decided: list[tuple[GateUnit, str]], rows: list[Any]
    ) -> list[dict[str, Any]]:
        """The entry split by layer groups, each group's removed modules in ``params.pruned``."""
        modules = entry["params"]["modules"]
        by_gate: dict[int, set[str]] = {}
        for unit, decision in decided:
            gone = by_gate.setdefault(unit.row, set())
            if decision != "keep":
                gone.add(unit.module)
        groups: dict[tuple, list[int]] = {}
        for g, gone in by_gate.items():
            if gone >= set(modules):
                continue  # every module of this layer is pruned: its gate goes too
            if rows[g].layer is None:
                raise PruneRefused(f"{rows[g].disk_site}: not in a numbered layer, so it cannot be pruned on its own")
            groups.setdefault((rows[g].block, tuple(m for m in modules if m in gone)), []).append(rows[g].layer)
        out = []
        for (block, gone), layer_ids in groups.items():
            new = copy.deepcopy(entry)
            new["layers"] = sorted(layer_ids)
            if block:
                new["blocks"] = [block]
            new["params"]["pruned"] = list(gone)
            out.append(new)
        return out

    def unfolded_entry(self, entry: dict[str, Any], folded: set[str]) -> tuple[dict[str, Any], Any]:
        """The entry without the folded modules, and a function that cuts the gate tensors to the kept gates."""
        mods = entry["params"]["modules"]
        left = [m for m in mods if m not in folded]
        if not left:
            raise PeltError(f"internal: every module of a {self.name} entry was folded; the entry should be gone")
        if entry["params"]["gate"] == "softmax":
            raise MergeRefused(
                "softmax gates share one normalisation across lora, prefix and adapter: after "
                "folding the LoRA, the remaining gates could not be reproduced",
                hint="merge without --freeze-gates and with --keep-unmerged (the gated LoRA "
                "then stays in the rest run, exactly)",
            )
        new = copy.deepcopy(entry)
        new["params"]["modules"] = left
        keep = [mods.index(m) for m in left]

        def cut(name: str, t: torch.Tensor) -> torch.Tensor:  # sigmoid gates are independent: keep their rows
            return t[keep].contiguous() if ".pelt_gate.net." in name else t

        return new, cut

    def param_group(self, name: str) -> str | None:
        """Gate parameters form the ``gates`` group (their own learning rate, warm-up)."""
        return "gates" if ".pelt_gate." in name else None


def gate_controllers(model: nn.Module) -> dict[str, GateController]:
    """Every UniPELT gate controller of a model, by the path of the query projection it sits on."""
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules() if isinstance(m, GateController)}


@contextlib.contextmanager
def gates_fixed(model: nn.Module, value: float = 1.0) -> Iterator[int]:
    """Hold every UniPELT gate of ``model`` at ``value`` inside the block (the no-gate ablation: each module's
    output added unscaled, ``h + Σ_m Δ_m``); yields how many controllers it holds. The learned gates return after."""
    ctls = list(gate_controllers(model).values())
    for c in ctls:
        c.fixed = value
    try:
        yield len(ctls)
    finally:
        for c in ctls:
            c.fixed = None
