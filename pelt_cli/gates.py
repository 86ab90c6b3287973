"""Gate statistics: UniPELT's per-layer gates and the domain adapter's per-timestep gate.

``gates.json`` in a run holds, for the last evaluation, per gate site (the query projection a UniPELT controller
sits on) and per gated module, the mean, std, min and max of the gate over the eval set, plus the history of the
means per epoch; for a domain adapter, its gate statistics, its ``scale`` and whether the mean gate is in the
healthy band (0.3–0.7, the brief's rule of thumb).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

GATES_FILE = "gates.json"
HEALTHY = (0.3, 0.7)


class DomainGateMeter:
    """Accumulates a domain adapter's per-timestep gate over many forwards (its ``last_gate`` after each)."""

    def __init__(self) -> None:
        self.n, self.total, self.sq = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf

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

    def stats(self) -> dict[str, float]:
        """mean, std, min, max and count of the gate values seen."""
        if not self.n:
            return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "count": 0}
        mean = self.total / self.n
        return {
            "mean": mean,
            "std": max(self.sq / self.n - mean * mean, 0.0) ** 0.5,
            "min": self.lo,
            "max": self.hi,
            "count": self.n,
        }


def controllers(model: Any) -> dict[str, Any]:
    """UniPELT gate controllers by gate site (the run's own module paths, also inside a task model)."""
    from pelt_cli.methods.unipelt import gate_controllers
    from pelt_cli.surgery import run_root

    return gate_controllers(run_root(model))


def reset(model: Any) -> None:
    """Clear every controller's running statistics (before an evaluation)."""
    for ctl in controllers(model).values():
        ctl.reset_stats()


def snapshot(model: Any, domain_meter: DomainGateMeter | None = None) -> dict[str, Any]:
    """The current statistics of every gate in the model, JSON-ready."""
    out: dict[str, Any] = {"layers": {}}
    for site, ctl in controllers(model).items():
        out["layers"][site] = ctl.stats()
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
    """Current statistics plus the per-epoch history of the means (kept across epochs and resumes)."""
    history = dict((previous or {}).get("history", {}))
    entry: dict[str, Any] = {}
    for site, mods in current.get("layers", {}).items():
        entry[site] = {m: s["mean"] for m, s in mods.items()}
    if "domain" in current:
        entry["domain"] = {"gate": current["domain"]["gate"]["mean"], "scale": current["domain"]["scale"]}
    history[str(epoch)] = entry
    return {**current, "epoch": epoch, "history": history}


def read(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run's gate statistics, or None when it has none."""
    p = Path(run_dir) / GATES_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))


def rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows ``{site, layer, module, mean, std, min, max, count}`` for tables."""
    from pelt_cli.sites import layer_of

    out = []
    for site, mods in doc.get("layers", {}).items():
        for module, s in mods.items():
            out.append({"site": site, "layer": layer_of(site), "module": module, **s})
    if "domain" in doc:
        out.append({"site": "domain", "layer": None, "module": "domain.gate", **doc["domain"]["gate"]})
    return out


def heatmap(doc: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a layers × modules heatmap of the mean gates as a PNG (needs matplotlib, an optional extra)."""
    from pelt_cli.errors import UsageError
    from pelt_cli.io.atomic import atomic_file

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--png needs matplotlib (the plot extra)", hint="pip install 'pelt[plot]'") from None
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
