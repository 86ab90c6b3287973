"""``pelt report RUN``: one self-contained HTML page about a run, with its charts as inline SVG.

Read from the run directory only (no torch, no model): ``run.json`` (base, recipe, insertions, training summary,
prune history), ``metrics.jsonl`` (training rows every N steps, an eval row per epoch, partial eval rows within an
epoch), ``gates.json`` (mean gates, their per-epoch history and histograms) and the adapter's header. Sections:

1. loss and metric curves, gradient norms and the learning rate;
2. gates: the layers × modules heatmap of the mean gates, their per-epoch history, each layer's gate entropy (and
   the prefix activation), per-epoch histograms of the gate values, and the guide's remedy hints;
3. pruning: every gated unit's mean gate and the decision taken (or, before any prune, what the default rule
   would remove), and the inserted parameters after each prune against the budget as inserted;
4. the inserted-parameter table: per insertion its method, site, role, layer and parameters.

A section without data says so in one line. The page has no script and references nothing outside itself (charts
from :mod:`pelt_cli.svg`, styles inline), so it opens offline and can be mailed or archived as one file.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pelt_cli import __version__, svg
from pelt_cli import gates as gatestats
from pelt_cli.errors import CheckpointError
from pelt_cli.svg import Bar, Panel, Series, esc, fmt

METRICS_FILE = "metrics.jsonl"
TRAIN_KIND = "train"  # metrics.jsonl training rows (pelt_cli.diagnostics, which imports torch)
NOT_METRICS = {"epoch", "step", "seconds", "eval_loss", "partial", "kind", "prefix_activation"}
DEFAULT_THRESHOLD = 0.05  # pelt prune's default θ (shown before any prune)
CHARTS = (
    "chart-loss",
    "chart-metrics",
    "chart-grad-norm",
    "chart-gate-heatmap",
    "chart-gate-history",
    "chart-gate-entropy",
    "chart-gate-histograms",
    "chart-prune",
    "chart-budget",
)
KEEP, PRUNED = "#4e79a7", "#e15759"
CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:0;background:#fff}
main{max-width:1180px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:18px;margin:30px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.sub{color:#666;margin:0 0 12px}
nav a{margin-right:14px;color:#2a5db0;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}tr.total td{font-weight:600;border-top:1px solid #999}
.empty{color:#777;font-style:italic}.hint{color:#8a4b00}svg.chart{max-width:100%;height:auto;display:block;margin:6px 0}
figure{margin:10px 0 18px}figcaption{color:#555;font-size:12.5px}code{background:#f3f3f3;padding:0 3px}
"""


@dataclass
class RunData:
    """What the report reads from a run directory."""

    dir: Path
    meta: dict[str, Any]
    params: dict[str, Any]
    rows: list[dict[str, Any]]
    gates: dict[str, Any] | None


def load(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run's files for the report.

    Raises:
        CheckpointError: not a run directory, or an unreadable ``run.json``, ``metrics.jsonl`` or ``gates.json``.
    """
    from pelt_cli.apply import run_report
    from pelt_cli.run import read_run

    d = Path(run_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a run directory (it does not exist or is a file)")
    meta = read_run(d)
    try:
        doc = gatestats.read(d)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / gatestats.GATES_FILE}: not valid JSON ({e})") from None
    return RunData(d, meta, run_report(d), read_metrics(d / METRICS_FILE), doc)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (none when the file is absent).

    Raises:
        CheckpointError: a line that is not a JSON object, named by ``file:line``.
    """
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise CheckpointError(f"{path}:{i}: expected a JSON object per line")
        rows.append(row)
    return rows


def render(run_dir: str | os.PathLike[str]) -> str:
    """The report of a run as one HTML document (a string)."""
    data = load(run_dir)
    body = [_header(data), _curves(data), _gates(data), _pruning(data), _param_table(data)]
    title = f"pelt report: {data.dir.name}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f"<body><main>{''.join(body)}<p class='sub'>Written by pelt {esc(__version__)} on "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; one file: no script, nothing fetched.</p>"
        "</main></body></html>\n"
    )


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the report of ``run_dir`` to ``out`` atomically (its folder made if missing); returns ``out``.

    Raises:
        UsageError: ``out`` is a directory.
    """
    from pelt_cli.errors import UsageError
    from pelt_cli.io.atomic import write_text_atomic

    out = Path(out)
    if out.is_dir():
        raise UsageError(f"-o {out}: is a directory; expected an HTML file path, e.g. {out / 'report.html'}")
    page = render(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, page)
    return out


# ------------------------------------------------------------------------------------------------ helpers


def _empty(message: str) -> str:
    return f'<p class="empty">{esc(message)}</p>'


def _figure(chart: str, caption: str) -> str:
    return f"<figure>{chart}<figcaption>{caption}</figcaption></figure>"


def _table(head: list[str], rows: list[list[Any]], numeric: set[int], total: list[Any] | None = None) -> str:
    """An HTML table; ``numeric`` columns right-aligned; an optional bold total row."""

    def cells(r: list[Any], tag: str) -> str:
        return "".join(
            f"<{tag}{' class=n' if i in numeric else ''}>{esc(fmt(v) if isinstance(v, (int, float)) else v)}</{tag}>"
            for i, v in enumerate(r)
        )

    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    foot = f'<tr class="total">{cells(total, "td")}</tr>' if total else ""
    return f"<table><thead><tr>{cells(head, 'th')}</tr></thead><tbody>{body}{foot}</tbody></table>"


def site_labels(sites: list[str]) -> dict[str, str]:
    """Short labels for gate sites: ``layer N`` when the layer numbers tell them apart, else the sites without
    their common leading and trailing dotted parts."""
    from pelt_cli.sites import layer_of

    layers = [layer_of(s) for s in sites]
    if None not in layers and len(set(layers)) == len(sites):
        return {s: f"layer {n}" for s, n in zip(sites, layers, strict=True)}
    parts = [s.split(".") for s in sites]
    lead = 0
    while len(sites) > 1 and all(len(p) > lead + 1 for p in parts) and len({p[lead] for p in parts}) == 1:
        lead += 1
    tail = 0
    while len(sites) > 1 and all(len(p) > lead + tail + 1 for p in parts) and len({p[-1 - tail] for p in parts}) == 1:
        tail += 1
    return {s: ".".join(p[lead : len(p) - tail]) for s, p in zip(sites, parts, strict=True)}


def _is_train(row: dict[str, Any]) -> bool:
    return row.get("kind") == TRAIN_KIND


def _evals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "kind" not in r and ("eval_loss" in r or "epoch" in r)]


def _x(row: dict[str, Any]) -> float:
    return row.get("step", row.get("epoch", math.nan))


# ------------------------------------------------------------------------------------------------ sections


def _header(data: RunData) -> str:
    meta, p = data.meta, data.params
    base = meta.get("base", {})
    training = meta.get("training") or {}
    result = training.get("result") or {}
    facts = [
        ["run", str(data.dir)],
        ["recipe", p.get("recipe") or "–"],
        ["base", f"{base.get('path')} ({base.get('family') or '?'}, {base.get('model_class') or '?'})"],
        ["base parameters", base.get("params", 0)],
        ["inserted parameters", f"{p['new_params']:,} ({p['percent_of_base']:.3g}% of the base)"],
    ]
    if training:
        facts += [
            ["task", training.get("task") or "–"],
            ["data", f"{training.get('data')} ({fmt(training.get('train_rows'))} rows)"],
            ["eval", f"{training.get('eval') or 'held out'} ({fmt(training.get('eval_rows'))} rows)"],
            ["trainable when trained (with the head)", training.get("trainable", "–")],
            ["result", ", ".join(f"{k} {fmt(v) if isinstance(v, float) else v}" for k, v in result.items()) or "–"],
        ]
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (("curves", "curves"), ("gates", "gates"), ("pruning", "pruning"), ("parameters", "parameters"))
    )
    return (
        f"<h1>pelt report: {esc(data.dir.name)}</h1><p class='sub'>{esc(p.get('recipe') or '')} on "
        f"{esc(base.get('model_class') or base.get('path'))}</p><nav>{nav}</nav><table>"
        + "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v) if isinstance(v, int) else v)}</td></tr>" for k, v in facts)
        + "</table>"
        + _settings(training.get("config") or {})
    )


def _settings(config: dict[str, Any]) -> str:
    """The training settings ``run.json`` records, folded away (a ``<details>`` element: no script needed)."""
    if not config:
        return ""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in config.items())
    return f"<details><summary>training settings ({len(config)})</summary><table>{rows}</table></details>"


def _curves(data: RunData) -> str:
    out = ['<h2 id="curves">Loss and metrics</h2>']
    if not data.rows:
        return out[0] + _empty(f"No training recorded: {METRICS_FILE} is absent (pelt train writes it).")
    out.append(_figure(svg.line_panels("chart-loss", "loss", [_loss_panel(data.rows)], "optimizer step"), _LOSS_CAP))
    panels = _metric_panels(_evals(data.rows))
    if panels:
        out.append(_figure(svg.line_panels("chart-metrics", "eval metrics", panels, "optimizer step"), _METRIC_CAP))
    else:
        out.append(_empty("No eval metrics recorded."))
    train = [r for r in data.rows if _is_train(r)]
    if train:
        chart = svg.line_panels("chart-grad-norm", "gradient norms and learning rate", _grad_panels(train), "step")
        out.append(_figure(chart, "Gradient L2 norm before clipping (log scale) and the learning rate, logged steps."))
    else:
        out.append(_empty("No training rows (pelt train --log-every N writes them; 0 turns them off)."))
    return "".join(out)


_LOSS_CAP = (
    "Training loss: the mean over the steps since the previous training row. Eval loss: filled dots at epoch "
    "ends, open dots for evaluations within an epoch (<code>--eval-every</code>)."
)
_METRIC_CAP = "Eval metrics after each epoch (filled) and within epochs (open)."


def _loss_panel(rows: list[dict[str, Any]]) -> Panel:
    train = [(_x(r), r.get("loss")) for r in rows if _is_train(r)]
    evals = _evals(rows)
    full = [(_x(r), r.get("eval_loss")) for r in evals if not r.get("partial")]
    part = [(_x(r), r.get("eval_loss")) for r in evals if r.get("partial")]
    series = [
        Series("training loss", train, svg.color(0)),
        Series("eval loss", [(_x(r), r.get("eval_loss")) for r in evals], svg.color(1)),
        Series("at an epoch's end", full, svg.color(1), markers=True, line=False),
        Series("within an epoch", part, svg.color(1), markers=True, hollow=True, line=False),
    ]
    return Panel("loss", [s for s in series if s.points])


def _metric_panels(evals: list[dict[str, Any]]) -> list[Panel]:
    """Metrics in [0, 1] (accuracy, F1, cosine) on one panel with a fixed axis; the others (perplexity, feature
    MSE) on a second, fitted."""
    names = list(dict.fromkeys(k for r in evals for k, v in r.items() if k not in NOT_METRICS and svg.finite(v)))
    bounded, other = [], []
    for i, name in enumerate(names):
        full = [(_x(r), r[name]) for r in evals if name in r and not r.get("partial")]
        part = [(_x(r), r[name]) for r in evals if name in r and r.get("partial")]
        group = bounded if all(0 <= v <= 1 for _, v in full + part) else other
        group.append(Series(name, [(_x(r), r[name]) for r in evals if name in r], svg.color(i)))
        group.append(Series(f"{name} at an epoch's end", full, svg.color(i), markers=True, line=False))
        if part:
            group.append(Series(f"{name} within an epoch", part, svg.color(i), markers=True, hollow=True, line=False))
    panels = [Panel("metrics in [0, 1]", bounded, y_range=(0.0, 1.0))] if bounded else []
    return panels + ([Panel("other metrics", other)] if other else [])


def _grad_panels(train: list[dict[str, Any]]) -> list[Panel]:
    key = "grad_norm_method" if any("grad_norm_method" in r for r in train) else "grad_norm"
    names = list(dict.fromkeys(k for r in train for k in (r.get(key) or {})))
    series = [
        Series(f"‖g‖ {n}", [(_x(r), r[key][n]) for r in train if n in (r.get(key) or {})], svg.color(i))
        for i, n in enumerate(names)
    ]
    lr = Series("learning rate", [(_x(r), r.get("lr")) for r in train], "#555", dashed=True)
    per = "method" if key == "grad_norm_method" else "optimizer group"
    return [Panel(f"gradient norm per {per}", series, log_y=True), Panel("learning rate", [lr])]


def _gates(data: RunData) -> str:
    doc = data.gates
    out = ['<h2 id="gates">Gates</h2>']
    if not doc:
        return out[0] + _empty("No gate statistics: this run has no gated modules (unipelt, domain) or is untrained.")
    sites = list(doc.get("layers", {}))
    labels = site_labels(sites)
    modules = list(dict.fromkeys(m for mods in doc.get("layers", {}).values() for m in mods))
    count = next((s.get("count") for mods in doc.get("layers", {}).values() for s in mods.values()), None)
    if sites:
        grid = [[doc["layers"][s].get(m, {}).get("mean") for m in modules] for s in sites]
        title = f"mean gate per layer and module after epoch {doc.get('epoch', '?')}"
        chart = svg.heatmap("chart-gate-heatmap", title, [labels[s] for s in sites], modules, grid)
        cap = f"Mean gate over {fmt(count)} eval sequences after epoch {doc.get('epoch', '?')} (the kept epoch)."
        out.append(_figure(chart, cap))
    else:
        out.append(_empty("No per-layer gates (UniPELT) in this run: no heatmap."))
    if "domain" in doc:
        d = doc["domain"]
        out.append(
            f"<p>Domain adapter: mean gate {fmt(d['gate'].get('mean'))} (std {fmt(d['gate'].get('std'))}), scale "
            f"{fmt(d.get('scale'))}; healthy band 0.3–0.7: {esc({True: 'yes', False: 'no'}.get(d.get('healthy'), '–'))}"
            "</p>"
        )
    out += [_gate_history(doc, labels, modules), _gate_entropy(doc, data.rows, labels)]
    out.append(_gate_histograms(doc, labels, modules))
    hints = gatestats.hints(doc)
    out.append("".join(f'<p class="hint">hint: {esc(h)}</p>' for h in hints) or _empty("No remedy hints apply."))
    return "".join(out)


def _layer_colors(sites: list[str]) -> dict[str, str]:
    if len(sites) <= len(svg.PALETTE):
        return {s: svg.color(i) for i, s in enumerate(sites)}
    return {s: svg.viridis(i / max(len(sites) - 1, 1) * 0.9) for i, s in enumerate(sites)}


def _gate_history(doc: dict[str, Any], labels: dict[str, str], modules: list[str]) -> str:
    history = doc.get("history") or {}
    epochs = sorted(history, key=int)
    if not epochs:
        return _empty("No per-epoch gate history recorded.")
    colors = _layer_colors(list(labels))
    panels = []
    for m in modules:
        series = [
            Series(labels[s], [(int(e), history[e][s][m]) for e in epochs if m in history[e].get(s, {})], colors[s])
            for s in labels
        ]
        panels.append(Panel(f"{m} gate", series, y_range=(0.0, 1.0), x_integer=True))
    if any("domain" in history[e] for e in epochs):
        dom = [(int(e), history[e]["domain"]) for e in epochs if "domain" in history[e]]
        panels.append(
            Panel(
                "domain adapter",
                [
                    Series("domain gate", [(e, d["gate"]) for e, d in dom], svg.color(0), markers=True),
                    Series("domain scale", [(e, d["scale"]) for e, d in dom], svg.color(1), dashed=True),
                ],
                y_range=(0.0, 1.0),
                x_integer=True,
            )
        )
    chart = svg.line_panels("chart-gate-history", "mean gate per epoch", panels, "epoch")
    return _figure(chart, f"Mean gate after each of {len(epochs)} epoch(s), one line per layer.")


def _gate_entropy(doc: dict[str, Any], rows: list[dict[str, Any]], labels: dict[str, str]) -> str:
    history = doc.get("history") or {}
    epochs = sorted(history, key=int)
    colors = _layer_colors(list(labels))
    per_epoch = {e: gatestats.layer_entropy({s: v for s, v in history[e].items() if s != "domain"}) for e in epochs}
    series = [
        Series(labels[s], [(int(e), per_epoch[e][s]) for e in epochs if s in per_epoch[e]], colors[s]) for s in labels
    ]
    k = max((len(m) for m in doc.get("layers", {}).values()), default=1)
    if epochs and k > 1:
        even = [(int(epochs[0]), math.log(k)), (int(epochs[-1]), math.log(k))]
        series.append(Series(f"ln {k}: even gates", even, "#999", dashed=True))
    top = (math.log(k) or 1.0) * 1.08
    panels = [Panel(f"gate entropy per layer (0 … ln {k} = {math.log(k):.3g})", series, (0.0, top), x_integer=True)]
    evals = [r for r in _evals(rows) if svg.finite(r.get("prefix_activation")) and not r.get("partial")]
    if evals:
        act = Series("prefix activation", [(r["epoch"], r["prefix_activation"]) for r in evals], "#555", markers=True)
        panels.append(Panel("prefix activation", [act], (0.0, 1.0), x_integer=True))
    if not any(p.points for p in panels):
        return _empty("No gate entropy: no per-layer gate history recorded.")
    chart = svg.line_panels("chart-gate-entropy", "gate entropy per layer", panels, "epoch")
    cap = "Entropy of each layer's mean gates normalised to sum 1 (0: one module takes all; ln k: even)" + (
        "; prefix activation: the share of attention on the prefix positions." if evals else "."
    )
    return _figure(chart, cap)


def _gate_histograms(doc: dict[str, Any], labels: dict[str, str], modules: list[str]) -> str:
    hist = doc.get("histograms") or {}
    epochs = sorted(hist, key=int)
    if not epochs:
        return _empty("No gate histograms recorded (runs trained before pelt recorded them have only the means).")
    rows, cols = [labels[s] for s in labels], list(modules)
    cells: dict[tuple[int, int], list[tuple[str, list[int]]]] = {}
    for e in epochs:
        for i, s in enumerate(labels):
            for j, m in enumerate(modules):
                counts = (hist[e].get(s) or {}).get(m)
                if counts:
                    cells.setdefault((i, j), []).append((f"epoch {e}", counts))
    if any((hist[e].get("domain") or {}).get("gate") for e in epochs):
        rows.append("domain adapter")
        cols = cols or ["gate"]
        for e in epochs:
            counts = (hist[e].get("domain") or {}).get("gate")
            if counts:
                cells.setdefault((len(rows) - 1, 0), []).append((f"epoch {e}", counts))
    chart = svg.histograms("chart-gate-histograms", "gate value histograms per epoch", rows, cols, cells)
    return _figure(
        chart,
        f"Distribution of each gate's values over the eval set (per sequence; per timestep for a domain adapter) "
        f"in 10 bins on [0, 1], after each of {len(epochs)} epoch(s); the last epoch is filled.",
    )


# ------------------------------------------------------------------------------------------------ pruning


@dataclass
class UnitBar:
    """A gated unit in the prune chart: its site, module, mean gate, parameters and the prune that removed it."""

    site: str
    layer: int | None
    module: str
    mean: float
    params: int | None = None
    pruned_by: int | None = None  # 1-based prune number


def _units(data: RunData) -> list[UnitBar]:
    """Every gated unit of the run with its mean gate (gates.json) and, if a prune removed it, which one."""
    from pelt_cli.sites import layer_of

    doc = data.gates or {}
    units = [
        UnitBar(s, layer_of(s), m, st.get("mean", math.nan))
        for s, mods in doc.get("layers", {}).items()
        for m, st in mods.items()
    ]
    if "domain" in doc:
        units.append(UnitBar("domain", None, "domain", doc["domain"]["gate"].get("mean", math.nan)))
    for k, event in enumerate(((data.meta.get("pruning") or {}).get("history") or []), 1):
        for p in event.get("pruned", []):
            hit = next((u for u in units if _same_unit(u, p) and u.pruned_by is None), None)
            if hit is None:
                hit = UnitBar(p.get("site", "?"), p.get("layer"), p.get("module", "?"), p.get("mean", math.nan))
                units.append(hit)
            hit.pruned_by, hit.params = k, p.get("params")
    for u in units:
        if u.params is None:
            u.params = _unit_params(data.params["insertions"], u)
    return units


def _same_unit(u: UnitBar, p: dict[str, Any]) -> bool:
    if u.module != p.get("module") and not (u.module == "domain" and p.get("module") == "domain"):
        return False
    if u.layer is not None and p.get("layer") is not None:
        return u.layer == p["layer"]
    return u.module == "domain" or u.site == p.get("site") or u.site.endswith("." + str(p.get("site")))


def _unit_params(insertions: list[dict[str, Any]], u: UnitBar) -> int:
    """The parameters of a kept unit: its method's insertions in its layer (the domain adapter's all)."""
    from pelt_cli.sites import layer_of

    if u.module == "domain":
        return sum(r["new_params"] for r in insertions if r["method"].startswith("domain"))
    return sum(
        r["new_params"]
        for r in insertions
        if r["method"].endswith("." + u.module) and (u.layer is None or layer_of(r["site"]) == u.layer)
    )


def _pruning(data: RunData) -> str:
    out = ['<h2 id="pruning">Pruning</h2>']
    pruning = data.meta.get("pruning") or {}
    events = pruning.get("history") or []
    units = _units(data)
    if not units:
        return out[0] + _empty("Nothing gated to prune in this run (pelt prune works on unipelt and domain modules).")
    out += [_prune_chart(data, units, events), _autoprune(data)]
    if not events:
        out.append(_empty("No prune recorded for this run (pelt prune RUN --threshold θ writes one)."))
        return "".join(out)
    return "".join(out) + _budget(data, pruning, events)


def _budget(data: RunData, pruning: dict[str, Any], events: list[dict[str, Any]]) -> str:
    """The inserted parameters as inserted and after each prune, and the table of prunes."""
    out = []
    original = pruning.get("original_new_params", data.params["new_params"])
    base = data.meta.get("base", {}).get("params") or 0
    left, bars_, rows = original, [Bar("as inserted", original, "#9aa7b8", "inserted parameters")], []
    for k, e in enumerate(events, 1):
        removed = sum(p.get("params") or 0 for p in e.get("pruned", []))
        left -= removed
        rule = ", ".join(f"{a}={b}" for a, b in (e.get("rule") or {}).items())
        bars_.append(Bar(f"after prune {k}", left, KEEP, f"after prune {k} ({rule})"))
        what = ", ".join(f"{p.get('module')}@{p.get('layer', p.get('site'))}" for p in e.get("pruned", []))
        if k == len(events):  # exact: a layer left without modules loses its gate too, which no history counts
            removed, left = removed + left - data.params["new_params"], data.params["new_params"]
            bars_[-1].value = left
        rows.append([k, e.get("time", "–"), rule, what or "none", removed, left, f"{100 * left / original:.1f}%"])
    cap = (
        f"The parameter budget: {original:,} inserted parameters"
        + (f" ({100 * original / base:.3g}% of the {base:,}-parameter base)" if base else "")
        + f", and what is left after each prune; now {data.params['new_params']:,}."
    )
    chart = svg.bars("chart-budget", "inserted parameters after each prune", bars_, "parameters", values=True)
    out.append(_figure(chart, cap))
    head = ["prune", "time", "rule", "removed (module@layer)", "params removed", "params left", "of the budget"]
    out.append(_table(head, rows, {0, 4, 5, 6}))
    return "".join(out)


def _prune_chart(data: RunData, units: list[UnitBar], events: list[dict[str, Any]]) -> str:
    rule = (events[-1].get("rule") or {}) if events else {"threshold": DEFAULT_THRESHOLD}
    theta = rule.get("threshold")
    labels = site_labels(list(dict.fromkeys(u.site for u in units if u.site != "domain")))
    items = []
    for u in units:
        where = "domain" if u.site == "domain" else labels.get(u.site, u.site)
        would = not events and svg.finite(u.mean) and u.mean < DEFAULT_THRESHOLD
        gone = u.pruned_by is not None or would
        state = f"pruned by prune {u.pruned_by}" if u.pruned_by else ("would be pruned" if would else "kept")
        tip = f"{where} {u.module}: {state}, {fmt(u.params)} parameters, mean gate"
        items.append(Bar(f"{where} {u.module}".replace("layer ", "L"), u.mean, PRUNED if gone else KEEP, tip))
    legend = [("kept", KEEP), ("pruned" if events else f"below θ = {DEFAULT_THRESHOLD}", PRUNED)]
    line = (theta, f"θ = {theta}") if isinstance(theta, (int, float)) else None
    chart = svg.bars(
        "chart-prune", "mean gate and prune decision per unit", items, "mean gate", (0.0, 1.0), line, legend
    )
    if events:
        rules = "; ".join(", ".join(f"{a}={b}" for a, b in (e.get("rule") or {}).items()) for e in events)
        cap = f"Each gated unit's mean eval gate and the decision of {len(events)} prune(s) ({esc(rules)})."
    else:
        cap = (
            "Each gated unit's mean eval gate; red: what "
            f"<code>pelt prune --threshold {DEFAULT_THRESHOLD}</code> would remove (no prune recorded yet)."
        )
    return _figure(chart, cap)


def _autoprune(data: RunData) -> str:
    """AutoPELT during training: each unit's relative contribution (gate × gradient norm over the window, as a share
    of the strongest unit's) and the units switched off and back on (``"kind": "autoprune"`` rows)."""
    con = (data.gates or {}).get("contribution") or {}
    units = [(f"{s}/{m}", v) for s, mods in (con.get("layers") or {}).items() for m, v in mods.items()]
    units += [("domain", con["domain"])] if isinstance(con.get("domain"), dict) else []
    out = []
    if units:
        labels = site_labels(list(dict.fromkeys(k.rsplit("/", 1)[0] for k, _ in units if k != "domain")))
        items = []
        for k, v in units:
            site, _, module = k.rpartition("/")
            name = f"{labels.get(site, site)} {module}".replace("layer ", "L") if site else k
            color = PRUNED if v.get("off") else KEEP
            items.append(Bar(name, v.get("relative", math.nan), color, f"{k}: {'off' if v.get('off') else 'live'}"))
        theta = con.get("auto_prune")
        line = (theta, f"θ = {theta}") if isinstance(theta, (int, float)) else None
        legend = [("live", KEEP), ("switched off", PRUNED)]
        title = "relative contribution per unit"
        chart = svg.bars("chart-contribution", title, items, "relative contribution", (0.0, 1.0), line, legend)
        cap = (
            f"AutoPELT: each unit's mean gate × gradient norm over the last {fmt(con.get('window'))} steps, as a share "
            f"of the strongest unit's, after epoch {fmt(con.get('epoch'))}."
        )
        out.append(_figure(chart, cap))
    rows = [r for r in data.rows if r.get("kind") == "autoprune"]
    if rows:
        table = [
            [
                r.get("step"),
                r.get("epoch"),
                ", ".join(r.get("pruned") or []) or "–",
                ", ".join(r.get("reactivated") or []) or "–",
                len(r.get("off") or []),
            ]
            for r in rows
            if r.get("pruned") or r.get("reactivated")
        ]
        out.append(f"<h3>Switched during training (--auto-prune {esc(rows[0].get('threshold'))})</h3>")
        head = ["step", "epoch", "switched off", "back on", "units off after"]
        out.append(_table(head, table, {0, 1, 4}) if table else _empty(f"{len(rows)} decisions, none switched a unit."))
    return "".join(out)


# ------------------------------------------------------------------------------------------------ parameters


def _param_table(data: RunData) -> str:
    out = ['<h2 id="parameters">Inserted parameters</h2>']
    ins = data.params["insertions"]
    if not ins:
        return out[0] + _empty("No insertions recorded in run.json.")
    total = data.params["new_params"]
    rows = [
        [
            r["method"],
            r["disk_site"],
            r["role"],
            "–" if r["layer"] is None else r["layer"],
            r["new_params"],
            f"{100 * r['new_params'] / max(total, 1):.1f}%",
        ]
        for r in ins
    ]
    by_method: dict[str, int] = {}
    for r in ins:
        by_method[r["method"]] = by_method.get(r["method"], 0) + r["new_params"]
    summary = [[m, n, f"{100 * n / max(total, 1):.1f}%"] for m, n in by_method.items()]
    head = sum(t["params"] for t in data.params["tensors"] if t["method"] is None)  # the task head's tensors
    out.append("<h3>Per method</h3>" + _table(["method", "params", "share"], summary, {1, 2}, ["total", total, "100%"]))
    if head:
        out.append(f"<p>Plus the task head saved in the run (trained with them): {head:,} parameters.</p>")
    out.append("<h3>Per insertion</h3>")
    out.append(
        _table(
            ["method", "site", "role", "layer", "params", "share"],
            rows,
            {3, 4, 5},
            ["total", "", "", "", total, "100%"],
        )
    )
    return "".join(out)
