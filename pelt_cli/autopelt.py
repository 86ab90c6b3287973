"""AutoPELT: each gated unit's contribution during training, pruning on it while training, and reactivation.

A *unit* is what ``pelt prune`` decides on (the methods' ``GateUnit``): one of UniPELT's ``lora``, ``prefix`` or
``adapter`` in one layer, or a domain adapter.

**Contribution.** At each optimizer step t, a live unit u contributes ``c_u,t = ḡ_u,t · ‖∇θ_u‖_t``:

* ``ḡ``: the unit's gate, averaged over the step's sequences (every micro-batch of the step): UniPELT's
  per-sequence gate of that module in that layer; a domain adapter's per-timestep gate;
* ``‖∇θ_u‖``: the L2 norm of the gradient of the unit's own parameters (the modules it gates: LoRA's A and B, the
  prefix, the adapter's projections — not the gate, which its layer's modules share), after averaging over ranks and
  before clipping.

Its windowed contribution is the mean of ``c_u,t`` over the last N optimizer steps in which it was live
(``--window N``, default 1000, the guide's). Its *relative* contribution is ``c_u / max_v c_v`` over the run's units,
in [0, 1]: the scale of gradients changes with the model, the loss and the phase of training, a share of the
strongest unit does not. The cost is one fused norm over the units' gradients and a few small ops per step, on the
device; the values reach the CPU only when a decision or a checkpoint needs them.

**Auto-prune** (``--auto-prune θ``): every N steps, each UniPELT unit whose relative contribution is below θ is
switched off, and a switched-off unit whose relative contribution is at least θ again is switched back on. The
strongest unit (relative contribution 1) is never switched off, so at least one module always trains. Off means:

* LoRA and adapter: their gate reads 0, so the branch adds exactly 0 (the layer's output is the one without them);
* prefix: taken out of its attention module, so nothing is prepended (a zero prefix would still take attention);
* their parameters stop requiring gradients and keep their values (the optimizer skips them); a layer whose every
  module is off keeps its gate's values too. The other gates of the layer keep computing as before, as after
  ``pelt prune``.

**How an off unit is still measured.** Its gate keeps being computed (its layer's controller runs for the live
modules), so its mean gate over the window is known. Its gradient norm comes from a probe at each decision: the off
units are switched on for one extra forward and backward pass on the step's last micro-batch (no optimizer step; the
gradients are dropped after), and ``‖∇θ_u‖`` of that pass, times the unit's mean gate over the window, is its
contribution. It costs one extra pass every N steps. Domain adapters are measured but never switched off.

Pruned and reactivated units are listed in ``metrics.jsonl`` rows ``{"kind": "autoprune", "step", "epoch",
"pruned", "reactivated", "off"}`` (labels ``SITE/MODULE``) and in ``gates.json``'s ``contribution``: per unit its
windowed ``value``, ``relative``, ``gate``, ``grad_norm``, ``steps`` and ``off``, the per-epoch history of the
values, and the units off at the best epoch. At the end of training (:func:`finish`) the units still off in the
weights the run keeps (the best epoch's) are pruned from the run as ``pelt prune`` does: the recipe is rewritten
without them, their weights move to ``pruned.safetensors`` (``pelt prune --restore`` brings them back), so load,
merge and export give exactly the model that was evaluated; as after ``pelt prune``, the training state is dropped.
All of it is part of the final checkpoint's commit (one generation of the run): a kill leaves the previous checkpoint
(``--resume`` goes on from it) or the finished, pruned run, never a trained run without its auto-prune.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pelt_cli import surgery
from pelt_cli.run import Run

NAN = float("nan")


def label(stats: tuple[str, ...] | list[str]) -> str:
    """A unit's label in rows and lists: ``SITE/MODULE`` for a UniPELT unit, ``domain`` for a domain adapter."""
    return "/".join(stats[1:]) if stats[0] == "layers" else stats[0]


def relative(values: dict[str, float]) -> dict[str, float]:
    """``c_u / max_v c_v`` over the finite values (NaN where a value is unknown or every value is 0)."""
    top = max((v for v in values.values() if math.isfinite(v)), default=0.0)
    return {k: v / top if top > 0 and math.isfinite(v) else NAN for k, v in values.items()}


def decide(
    values: dict[str, float], off: set[str], theta: float, prunable: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """AutoPELT's rule at one decision: ``(switch off, switch back on)``, each sorted.

    A live unit in ``prunable`` (default: every unit) whose relative contribution (:func:`relative`) is below θ goes
    off; an off unit whose relative contribution is ≥ θ comes back. A unit without a finite value is left as it is.

    Args:
        values: windowed contribution per unit label (off units: their probe's).
        off: the units off now.
        theta: the threshold on the relative contribution, in [0, 1].
        prunable: the units that may be switched off.
    """
    rel = relative(values)
    may = set(values) if prunable is None else prunable
    prune = sorted(k for k, r in rel.items() if k not in off and k in may and r == r and r < theta)
    back = sorted(k for k, r in rel.items() if k in off and r == r and r >= theta)
    return prune, back


class ZeroGate:
    """A switched-off branch's gate: zeros shaped like the gate it replaces (kept, to switch back on)."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref

    def __call__(self) -> torch.Tensor:
        return torch.zeros_like(self.ref())


class Unit:
    """One measured unit: its label, gate source, parameters, and how to switch it off."""

    def __init__(self, gate_unit: Any, root: torch.nn.Module, rows: list[Any]) -> None:
        from pelt_cli.methods.prefix import Prefix
        from pelt_cli.methods.unipelt import GateController

        self.stats: tuple[str, ...] = tuple(gate_unit.stats)
        self.label = label(self.stats)
        self.gate_module = surgery.get_module(root, rows[gate_unit.row].modules[0])
        self.is_controller = isinstance(self.gate_module, GateController)
        self.column = self.gate_module.names.index(gate_unit.module) if self.is_controller else 0
        paths = [p for i in gate_unit.members for p in rows[i].modules if i != gate_unit.row or not self.is_controller]
        self.modules = [(p, surgery.get_module(root, p)) for p in paths]
        self.params = [p for _, m in self.modules for p in m.parameters()]
        self.root = root
        self.prefixes = [(p, m) for p, m in self.modules if isinstance(m, Prefix)]
        self.parked: list[tuple[torch.nn.Module, str, torch.nn.Module, Any]] = []
        self.off = False

    def switch(self, on: bool) -> None:
        """Switch the unit on or off (see the module docstring)."""
        if on == (not self.off):
            return
        for p in self.params:
            p.requires_grad_(on)
            p.grad = None
        for _, m in self.modules:
            g = getattr(m, "gate", None)
            if not on and g is not None and not isinstance(g, (ZeroGate, torch.nn.Module)):
                m.gate = ZeroGate(g)
            elif on and isinstance(g, ZeroGate):
                m.gate = g.ref
        if on:
            for parent, attr, child, handle in self.parked:
                handle.remove()
                parent.add_module(attr, child)
            self.parked = []
        else:
            for path, child in self.prefixes:
                parent_path, attr = path.rsplit(".", 1)
                parent = surgery.get_module(self.root, parent_path)
                delattr(parent, attr)
                self.parked.append((parent, attr, child, parent.register_state_dict_post_hook(_keeps(attr, child))))
        self.off = not on


def _keeps(attr: str, child: torch.nn.Module) -> Callable:
    """A state-dict hook that keeps a parked child's tensors in its parent's state dict (checkpoints stay whole)."""

    def hook(module: torch.nn.Module, state: dict, prefix: str, meta: Any) -> None:
        state.update({f"{prefix}{attr}.{k}": v for k, v in child.state_dict().items()})

    return hook


def _width(m: torch.nn.Module) -> int:
    """How many gates a gate source gives: a controller's modules, a domain adapter's one."""
    return len(m.names) if hasattr(m, "names") else 1


def _batch_gates(m: torch.nn.Module) -> torch.Tensor:
    """A gate source's gates of the last forward averaged over the batch, ``[width]`` fp32 (NaN before any)."""
    g = m.current if hasattr(m, "names") else m.last_gate
    if g is None:
        return torch.full((_width(m),), NAN, device=next(m.parameters()).device)
    g = g.detach().float()
    return g.mean(0) if hasattr(m, "names") else g.mean().reshape(1)


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    """Means over dim 0 of the non-NaN entries (NaN for a column without one)."""
    ok = ~torch.isnan(x)
    n = ok.sum(0)
    total = torch.where(ok, x, torch.zeros_like(x)).sum(0)
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, NAN))


class Tracker:
    """Measures every unit's contribution during training and, with ``theta``, switches units off and on.

    Args:
        run: the run in training.
        model: its model (a task model built around the run included).
        window: N, the steps of the window (and between decisions).
        theta: ``--auto-prune`` θ, or None to measure only.
        params: every trainable parameter (their gradients are dropped after a probe).
    """

    def __init__(
        self, run: Run, model: torch.nn.Module, window: int, theta: float | None, params: list | None = None
    ) -> None:
        root = surgery.run_root(model)
        self.units = [Unit(u, root, run.insertions) for u in run.gate_units() if u.members and not u.pruned]
        self.window, self.theta = window, theta
        self.params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
        self.count = 0
        self.buf: torch.Tensor | None = None  # [3, N, U]: contribution, gate, gradient norm per step
        self._gsum: torch.Tensor | None = None
        self._gn = 0
        self.probed: dict[str, float] = {}
        self.history: dict[str, Any] = {}
        self.best: dict[str, Any] | None = None
        self._index()

    def _index(self) -> None:
        """What each step needs, precomputed after each switch: the gate sources and each unit's gate among their
        outputs, the live units' parameters with, per parameter, its unit, the parameters without gradient."""
        offsets: dict[int, int] = {}  # gate source → where its gates start in the concatenation of all sources'
        self._sources: list[torch.nn.Module] = []
        for u in self.units:
            if id(u.gate_module) not in offsets:
                offsets[id(u.gate_module)] = sum(_width(m) for m in self._sources)
                self._sources.append(u.gate_module)
        cols = [offsets[id(u.gate_module)] + u.column for u in self.units]
        live = [(i, p) for i, u in enumerate(self.units) if not u.off for p in u.params]
        self._live = [p for _, p in live]
        self._on_cpu = {
            "gate": torch.tensor(cols, dtype=torch.long),
            "owner": torch.tensor([i for i, _ in live], dtype=torch.long),
            "live": torch.tensor([not u.off for u in self.units]),
        }
        self._on: dict[str, torch.Tensor] = {}
        ctls: dict[int, list[Unit]] = {}
        for u in self.units:
            if u.is_controller:
                ctls.setdefault(id(u.gate_module), []).append(u)
        self._frozen = [p for us in ctls.values() if all(u.off for u in us) for p in us[0].gate_module.parameters()]
        self._no_grad = self._frozen + [p for u in self.units if u.off for p in u.params]

    def _at(self, name: str, device: torch.device) -> torch.Tensor:
        """A precomputed index or mask on ``device`` (copied there once per switch)."""
        t = self._on.get(name)
        if t is None or t.device != device:
            t = self._on[name] = self._on_cpu[name].to(device)
        return t

    def set_off(self, labels: set[str] | list[str]) -> None:
        """Switch exactly the units with these labels off, every other unit on."""
        for u in self.units:
            u.switch(u.label not in labels)
        self._index()

    @property
    def off(self) -> list[str]:
        """The labels of the units off now."""
        return [u.label for u in self.units if u.off]

    def observe(self) -> None:
        """After a micro-batch's forward: add each unit's mean gate to the step's."""
        if not self.units:
            return
        g = torch.cat([_batch_gates(m) for m in self._sources])
        g = g[self._at("gate", g.device)]
        self._gsum = g if self._gsum is None else self._gsum + g
        self._gn += 1
        for p in self._frozen:  # a layer whose modules are all off: its gate stays as it is (see the docstring)
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def measure(self) -> None:
        """After the step's backward (gradients averaged over ranks, not yet clipped): record ``ḡ · ‖∇θ‖`` per live
        unit, and drop the gradients the optimizer must not see (off units, frozen gates)."""
        for p in self._no_grad:
            p.grad = None
        if not self.units or self._gsum is None:
            return
        gate = self._gsum / self._gn
        self._gsum, self._gn = None, 0
        sq = torch.zeros(len(self.units), dtype=torch.float32, device=gate.device)
        grads = [p.grad for p in self._live]
        if grads and all(g is not None for g in grads):
            norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).to(sq.device)
            sq.index_add_(0, self._at("owner", sq.device), norms.pow(2))
        elif grads:
            for i, p in zip(self._on_cpu["owner"].tolist(), self._live, strict=True):
                if p.grad is not None:
                    sq[i] += torch.linalg.vector_norm(p.grad.detach().float()).pow(2).to(sq.device)
        norm = sq.sqrt()
        nan = torch.full_like(norm, NAN)
        # a step whose gradients are not finite (fp16's scaler then skips it) does not count
        live = self._at("live", sq.device) & torch.isfinite(norm)
        row = torch.stack([torch.where(live, gate * norm, nan), gate, torch.where(live, norm, nan)])
        if self.buf is None or self.buf.shape[1] != self.window:
            self.buf = torch.full((3, self.window, len(self.units)), NAN, device=sq.device)
        self.buf[:, self.count % self.window] = row.to(self.buf.device, self.buf.dtype)
        self.count += 1

    def windowed(self) -> dict[str, dict[str, float]]:
        """Per unit label: windowed ``value`` (off units, and units back on but not measured since: their last
        probe's), ``gate``, ``grad_norm``, ``steps`` (live steps in the window)."""
        if self.buf is None or not self.count:
            return {u.label: {"value": NAN, "gate": NAN, "grad_norm": NAN, "steps": 0} for u in self.units}
        filled = self.buf[:, : min(self.count, self.window)]
        means = torch.stack([_nanmean(filled[i]) for i in range(3)])
        steps = (~torch.isnan(filled[0])).sum(0).tolist()
        c, g, n = (means[i].tolist() for i in range(3))
        out = {}
        for i, u in enumerate(self.units):
            value = self.probed.get(u.label, NAN) if u.off or c[i] != c[i] else c[i]  # back on, not yet measured
            out[u.label] = {"value": value, "gate": g[i], "grad_norm": n[i], "steps": int(steps[i])}
        return out

    def after_step(
        self, st: dict[str, Any], epoch: int, probe_loss: Callable[[], torch.Tensor], emit: Callable
    ) -> None:
        """After optimizer step ``st["step"]``: with θ, every N steps, probe the off units, decide, switch, and log
        the decision (a ``"kind": "autoprune"`` row in ``st["history"]`` and a progress event)."""
        if self.theta is None or not self.units or st["step"] % self.window:
            return
        self._probe(probe_loss)
        values = _agree({k: v["value"] for k, v in self.windowed().items()}, self.buf)
        prunable = {u.label for u in self.units if u.is_controller}
        prune, back = decide(values, set(self.off), self.theta, prunable)
        if prune or back:
            self.set_off((set(self.off) | set(prune)) - set(back))
        row = {
            "kind": "autoprune",
            "step": st["step"],
            "epoch": epoch,
            "threshold": self.theta,
            "window": self.window,
            "pruned": prune,
            "reactivated": back,
            "off": self.off,
        }
        st["history"].append(row)
        emit(row)

    def _probe(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """The off units' contribution: switched on for one forward and backward (no step), gradient norm × mean
        gate over the window (see the module docstring)."""
        units = [(i, u) for i, u in enumerate(self.units) if u.off]
        if not units or self.buf is None:
            return
        gates = _nanmean(self.buf[1, : min(self.count, self.window)]).tolist()
        for _, u in units:
            u.switch(True)
        try:
            for p in self.params:
                p.grad = None
            with torch.enable_grad():
                loss_fn().backward()
            for i, u in units:
                sq = sum(float(torch.linalg.vector_norm(p.grad.float())) ** 2 for p in u.params if p.grad is not None)
                self.probed[u.label] = gates[i] * math.sqrt(sq)
        finally:
            for p in self.params:
                p.grad = None
            for _, u in units:
                u.switch(False)

    def record(self, doc: dict[str, Any], st: dict[str, Any], epoch: int, improved: bool) -> None:
        """Put the windowed contributions into a ``gates.json`` document (``contribution``) after an epoch, and the
        tracker's state into the loop state (for ``--resume``)."""
        w = self.windowed()
        rel = relative({k: v["value"] for k, v in w.items()})
        tree: dict[str, Any] = {}
        entry: dict[str, Any] = {}
        for u in self.units:
            _put(tree, u.stats, {**_clean(w[u.label]), "relative": _num(rel[u.label]), "off": u.off})
            _put(entry, u.stats[1:] if u.stats[0] == "layers" else u.stats[:1], _num(w[u.label]["value"]))
        self.history[str(epoch)] = entry
        if improved or self.best is None:  # the units off in the weights early stopping keeps
            self.best = {"epoch": epoch, **tree, "off": self.off}
        doc["contribution"] = {
            "window": self.window,
            "auto_prune": self.theta,
            "step": st["step"],
            "epoch": epoch,
            **tree,
            "off": self.off,
            "history": self.history,
            "best": self.best,
        }
        st["autopelt"] = self.state()

    def state(self) -> dict[str, Any]:
        """What ``--resume`` needs (saved with the loop state)."""
        return {
            "count": self.count,
            "buf": None if self.buf is None else self.buf.detach().cpu(),
            "off": self.off,
            "probed": dict(self.probed),
            "history": self.history,
            "best": self.best,
        }

    def load(self, state: dict[str, Any] | None) -> None:
        """Continue from :meth:`state` (units off again, the window as it was when it still fits)."""
        if not state:
            return
        buf = state.get("buf")
        if buf is not None and tuple(buf.shape) == (3, self.window, len(self.units)):
            self.buf, self.count = buf.clone(), int(state["count"])
        self.probed = dict(state.get("probed") or {})
        self.history, self.best = dict(state.get("history") or {}), state.get("best")
        self.set_off(set(state.get("off") or []))


def _num(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _num(v) if isinstance(v, float) else v for k, v in d.items()}


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _agree(values: dict[str, float], like: torch.Tensor | None) -> dict[str, float]:
    """The values averaged over ranks under data parallelism (every rank then decides alike); as they are alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=like.device if like is not None else "cpu")
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist(), strict=True))


# ---------------------------------------------------------------------------------------------- the loop's hooks


def tracker(run: Run, model: torch.nn.Module, cfg: Any, params: list, st: dict[str, Any]) -> Tracker | None:
    """The run's tracker, continued from the loop state ``st`` on resume; None when nothing is gated, or under
    FSDP (sharded gradients: contributions are not measured there, and ``--auto-prune`` is refused)."""
    if getattr(cfg, "fsdp", False):
        return None
    t = Tracker(run, model, cfg.window, cfg.auto_prune, params)
    if not t.units:
        return None
    t.load(st.get("autopelt"))
    return t


def keep_state(t: Tracker | None, st: dict[str, Any]) -> None:
    """Put the tracker's state into the loop state before a checkpoint (``--resume`` continues from it)."""
    if t is not None:
        st["autopelt"] = t.state()


def record(t: Tracker | None, doc: dict[str, Any], st: dict[str, Any], epoch: int, improved: bool) -> None:
    """:meth:`Tracker.record` when there is a tracker."""
    if t is not None:
        t.record(doc, st, epoch, improved)


def finish(gen: Path, run_dir: Any = None) -> list[str]:
    """At the end of training, inside the final checkpoint's new generation ``gen`` before its commit (see
    :func:`pelt_cli.train_state.save_checkpoint`; the best epoch's weights are in it): the contribution of the best
    epoch at the top of ``gates.json``'s ``contribution``, and the units off in those weights pruned from it as
    ``pelt prune`` does (see the module docstring). Both commit with the checkpoint, as one unit: a kill leaves the
    previous checkpoint or the finished run, never a trained run without its auto-prune. Returns the pruned labels.

    Args:
        gen: the filled, uncommitted generation (rewritten where it lies).
        run_dir: the run it will be committed as (for the recipe's note; default: ``gen``).
    """
    import json

    from pelt_cli import gates as gatestats
    from pelt_cli.prune import prune_units

    gen = Path(gen)
    doc = gatestats.read(gen)
    con = (doc or {}).get("contribution")
    if not con:
        return []
    best = con.get("best") or {}
    if best and best.get("epoch") != con.get("epoch"):
        kept = {k: v for k, v in con.items() if k not in ("layers", "domain")}
        con = {**kept, **{k: v for k, v in best.items() if k != "epoch"}, "epoch": best["epoch"]}
        con["last_epoch"] = kept.get("epoch")
        doc["contribution"] = con
        (gen / gatestats.GATES_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")  # uncommitted
    off = set(con.get("off") or [])
    if not off:
        return []
    rule = {"auto_prune": con.get("auto_prune"), "window": con.get("window"), "epoch": con.get("epoch")}
    report = prune_units(gen, lambda stats: label(stats) in off, rule, doc, staged=str(run_dir or gen))
    return sorted(label(u.gate.stats) for u in report.units if u.decision == "prune")
