"""Gate statistics: UniPELT's per-layer gates and the domain adapter's per-timestep gate.

``gates.json`` in a run holds, for the last evaluation, per gate site (the query projection a UniPELT controller
sits on) and per gated module, the mean, std, min and max of the gate over the eval set, plus the history of the
means per epoch; for a domain adapter, its gate statistics, its ``scale`` and whether the mean gate is in the
healthy band (0.3–0.7, the brief's rule of thumb). Each gate's statistics carry ``hist``, the counts of its values in
ten equal bins on [0, 1] (per sequence for UniPELT, per timestep for a domain adapter), and ``histograms`` keeps them
per epoch (``{epoch: {site: {module: counts}}}``, the domain gate under ``domain.gate``), as ``history`` the means.

Diagnostics (the guide's): the entropy of each layer's mean gate distribution (:func:`layer_entropy`), the share of
attention the queries put on prefix positions, measured only while evaluating (:func:`reset` starts it,
:func:`snapshot` reads it), and remedy hints (:func:`hints`) for a module always suppressed or a domain gate outside
the healthy band.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

GATES_FILE = "gates.json"
HEALTHY = (0.3, 0.7)
SUPPRESSED = 0.05  # a gate whose mean stays below this in every epoch is "always suppressed" (AutoPELT's θ)
DIAGNOSTIC_KEYS = ("prefix_activation",)  # in a snapshot, not in gates.json: they go to the eval rows
PLOT_EXTRA = "pip install 'pelt[plot]' (or: pelt report RUN -o report.html, which needs nothing more)"


class DomainGateMeter:
    """Accumulates a domain adapter's per-timestep gate over many forwards (its ``last_gate`` after each)."""

    def __init__(self) -> None:
        from pelt_cli.methods.unipelt import HIST_BINS

        self.n, self.total, self.sq = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.hist = [0] * HIST_BINS

    def add(self, gate: Any) -> None:
        """Add the gate values of one forward ([B, T, 1])."""
        if gate is None:
            return
        g = gate.detach().double().flatten()
        self.n += g.numel()
        self.total += g.sum().item()
        self.sq += (g * g).sum().item()
        self.lo = min(self.lo, g.min().item())
        self.hi = max(self.hi, g.max().item())
        from pelt_cli.methods.unipelt import bin_counts

        self.hist = [a + b for a, b in zip(self.hist, bin_counts(g.unsqueeze(1))[0].tolist(), strict=True)]

    def stats(self) -> dict[str, float]:
        """mean, std, min, max, count and histogram (``hist``) of the gate values seen."""
        if not self.n:
            return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "count": 0, "hist": self.hist}
        mean = self.total / self.n
        return {
            "mean": mean,
            "std": max(self.sq / self.n - mean * mean, 0.0) ** 0.5,
            "min": self.lo,
            "max": self.hi,
            "count": self.n,
            "hist": self.hist,
        }


def controllers(model: Any) -> dict[str, Any]:
    """UniPELT gate controllers by gate site (the run's own module paths, also inside a task model)."""
    from pelt_cli.methods.unipelt import gate_controllers
    from pelt_cli.surgery import run_root

    return gate_controllers(run_root(model))


def prefixes(model: Any) -> dict[str, Any]:
    """The prefix modules (``pelt_prefix``) by the path of the attention module they sit on."""
    from pelt_cli.methods.prefix import CHILD, Prefix

    return {n.removesuffix("." + CHILD): m for n, m in model.named_modules() if isinstance(m, Prefix)}


def reset(model: Any) -> None:
    """Clear every controller's running statistics and start measuring prefix activation (before an evaluation)."""
    for ctl in controllers(model).values():
        ctl.start_measuring()
    for p in prefixes(model).values():
        p.start_measuring()


def snapshot(model: Any, domain_meter: DomainGateMeter | None = None) -> dict[str, Any]:
    """The current statistics of every gate in the model, JSON-ready; with prefixes, the share of attention on them
    since :func:`reset` (``prefix_activation``: attention module → share), which stops being measured."""
    out: dict[str, Any] = {"layers": {}}
    for site, ctl in controllers(model).items():
        out["layers"][site] = ctl.stop_measuring()
    activation = {path: p.stop_measuring() for path, p in prefixes(model).items()}
    if any(v is not None for v in activation.values()):
        out["prefix_activation"] = activation
    if domain_meter is not None:
        from pelt_cli.heads import domain_adapter

        adapter = domain_adapter(model)
        stats = domain_meter.stats()
        out["domain"] = {
            "gate": stats,
            "scale": float(adapter.scale.detach().float()),
            "healthy": HEALTHY[0] <= stats["mean"] <= HEALTHY[1] if stats["count"] else None,
        }
    return out


def merge_history(previous: dict[str, Any] | None, current: dict[str, Any], epoch: int) -> dict[str, Any]:
    """Current statistics plus the per-epoch history of the means and of the histograms (kept across epochs and
    resumes)."""
    history = dict((previous or {}).get("history", {}))
    histograms = dict((previous or {}).get("histograms", {}))
    entry: dict[str, Any] = {}
    hists: dict[str, Any] = {}
    for site, mods in current.get("layers", {}).items():
        entry[site] = {m: s["mean"] for m, s in mods.items()}
        hists[site] = {m: s["hist"] for m, s in mods.items() if "hist" in s}
    if "domain" in current:
        entry["domain"] = {"gate": current["domain"]["gate"]["mean"], "scale": current["domain"]["scale"]}
        hists["domain"] = {"gate": current["domain"]["gate"]["hist"]}
    history[str(epoch)] = entry
    histograms[str(epoch)] = hists
    kept = {k: v for k, v in current.items() if k not in DIAGNOSTIC_KEYS}
    return {**kept, "epoch": epoch, "history": history, "histograms": histograms}


def entropy(means: list[float]) -> float:
    """Shannon entropy (nats) of the means normalised to a distribution: 0 (one module takes all) to ln k (even).

    Softmax gates' means already sum to 1; sigmoid gates' are normalised by their sum. NaN when no mean is > 0.
    """
    finite = [m for m in means if m == m and m > 0]
    total = sum(finite)
    if not total:
        return math.nan
    return -sum(m / total * math.log(m / total) for m in finite) + 0.0


def layer_entropy(layers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Gate entropy per gate site from ``{site: {module: stats with "mean" (or a bare mean)}}``."""
    return {site: entropy([_mean(s) for s in mods.values()]) for site, mods in layers.items()}


def _mean(s: Any) -> float:
    return float(s["mean"] if isinstance(s, dict) else s)


def eval_diagnostics(snap: dict[str, Any]) -> dict[str, Any]:
    """What an eval row of ``metrics.jsonl`` carries from a snapshot: ``gate_entropy`` per site and the mean
    ``prefix_activation`` over the prefixed attention modules (each only when there is one)."""
    out: dict[str, Any] = {}
    if snap.get("layers"):
        out["gate_entropy"] = layer_entropy(snap["layers"])
    shares = [v for v in (snap.get("prefix_activation") or {}).values() if v is not None]
    if shares:
        out["prefix_activation"] = sum(shares) / len(shares)
    return out


def read(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run's gate statistics, or None when it has none."""
    from pelt_cli.errors import CheckpointError
    from pelt_cli.io.guard import load_json

    p = Path(run_dir) / GATES_FILE
    if not p.exists():
        return None
    return load_json(p, GATES_FILE, CheckpointError)


def rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows ``{site, layer, module, mean, std, min, max, count}`` for tables; when ``pelt train`` measured
    AutoPELT's contribution (``contribution``), each row also has the unit's relative ``contribution`` and whether
    ``--auto-prune`` left it ``off`` (None for a unit it did not measure)."""
    from pelt_cli.sites import layer_of

    out = []
    ent = layer_entropy(doc.get("layers", {}))
    for site, mods in doc.get("layers", {}).items():
        for module, s in mods.items():
            row = {"site": site, "layer": layer_of(site), "module": module, **s, "entropy": ent[site]}
            out.append({**row, **contribution_of(doc, ("layers", site, module))})
    if "domain" in doc:
        row = {"site": "domain", "layer": None, "module": "domain.gate", **doc["domain"]["gate"]}
        out.append({**row, **contribution_of(doc, ("domain", "gate"))})
    return out


def contribution_of(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """``{contribution, off}`` of the unit at ``path`` from ``gates.json``'s ``contribution`` (its ``relative``
    value); ``{}`` when the run has no recorded contribution."""
    node: Any = doc.get("contribution")
    if not node:
        return {}
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    node = node if isinstance(node, dict) else {}
    return {"contribution": node.get("relative"), "off": node.get("off")}


def history_rows(doc: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(epochs, rows)``: per gated module (and the domain gate), its mean gate after each epoch (key: the epoch),
    from ``gates.json``'s ``history``; with ``entropy`` rows per site after the module rows."""
    history = doc.get("history") or {}
    epochs = sorted(history, key=int)
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def put(site: str, module: str, epoch: str, value: float) -> None:
        rows.setdefault((site, module), {"site": site, "module": module})[epoch] = value

    for e in epochs:
        for site, mods in history[e].items():
            if site == "domain":
                put("domain", "domain.gate", e, mods["gate"])
                continue
            for module, mean in mods.items():
                put(site, module, e, mean)
            put(site, "entropy", e, layer_entropy({site: mods})[site])
    return epochs, list(rows.values())


def hints(doc: dict[str, Any]) -> list[str]:
    """The guide's remedies that apply to a run's gates: a module whose mean gate stayed below 0.05 in every epoch
    (at every site it is at), a domain gate outside the healthy band 0.3–0.7."""
    out = []
    for module, sites in _always_suppressed(doc).items():
        out.append(
            f"{module}: mean gate < {SUPPRESSED} in every epoch at {len(sites)} site(s) ({_sites_text(sites)}); "
            "the module is always suppressed: check its placement, the learning rate and the sparsity λ"
        )
    d = (doc.get("domain") or {}).get("gate") or {}
    mean = d.get("mean")
    if isinstance(mean, float) and mean == mean and not HEALTHY[0] <= mean <= HEALTHY[1]:
        where, remedy = (
            ("below", "raise the adapter's scale to 0.5 if the loss does not move")
            if mean < HEALTHY[0]
            else ("above", "lower the adapter's scale to 0.05 if the source domain degrades")
        )
        out.append(f"domain gate mean {mean:.3f} is {where} the healthy band {HEALTHY[0]}–{HEALTHY[1]}: {remedy}")
    return out


def _always_suppressed(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Gated module → the sites where its mean gate was below :data:`SUPPRESSED` in every recorded epoch (the
    current means when there is no history)."""
    history = list((doc.get("history") or {}).values()) or [
        {site: {m: _mean(s) for m, s in mods.items()} for site, mods in doc.get("layers", {}).items()}
    ]
    out: dict[str, list[str]] = {}
    for site, mods in doc.get("layers", {}).items():
        for module in mods:
            seen = [h[site][module] for h in history if module in h.get(site, {})]
            if seen and all(m < SUPPRESSED for m in seen):
                out.setdefault(module, []).append(site)
    return out


def _sites_text(sites: list[str]) -> str:
    from pelt_cli.sites import layer_of

    layers = [layer_of(s) for s in sites]
    if all(x is not None for x in layers):
        return "layer " + ", ".join(str(x) for x in layers)
    return ", ".join(sites[:3]) + (f" and {len(sites) - 3} more" if len(sites) > 3 else "")


def heatmap(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a layers × modules heatmap of the mean gates as a PNG (needs matplotlib, the ``plot`` extra).

    Raises:
        PeltError: matplotlib is not installed (exit 1: the environment lacks an extra; one line naming it).
        UsageError: the run has no per-layer gates.
    """
    from pelt_cli.errors import PeltError, UsageError
    from pelt_cli.io.atomic import atomic_file

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PeltError(f"--png needs matplotlib, which is not installed: {PLOT_EXTRA}") from None
    sites = list(doc.get("layers", {}))
    modules = sorted({m for mods in doc.get("layers", {}).values() for m in mods})
    if not sites:
        raise UsageError("no per-layer gates to plot (a domain adapter's gate is reported by the table)")
    grid = [[doc["layers"][s].get(m, {}).get("mean", math.nan) for m in modules] for s in sites]
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(modules), 1 + 0.35 * len(sites)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(modules)), modules)
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    fig.colorbar(im, ax=ax, label="mean gate")
    ax.set_title(f"gates after epoch {doc.get('epoch', '?')}")
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
