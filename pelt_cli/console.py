"""The only module that imports rich: tables, and error rendering. Data goes to stdout, everything else to stderr."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

FORMATS = ("table", "json", "jsonl", "tsv")


def default_format() -> str:
    """``table`` on a terminal, ``tsv`` when stdout is a pipe or a file (no colour, no truncation)."""
    return "table" if sys.stdout.isatty() else "tsv"


def human_count(n: int) -> str:
    """``22713216`` → ``22.7M``."""
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """``90852864`` → ``86.6 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@contextlib.contextmanager
def closed_pipe_ok() -> Iterator[None]:
    """Treat a reader that closes stdout early (``pelt … | head``) as success: stop writing, exit 0 quietly."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _reraise_broken_pipe() -> None:
    raise BrokenPipeError  # rich's default exits 1; a closed pipe is success (see closed_pipe_ok)


def _stdout_console() -> Any:
    from rich.console import Console

    con = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    con.on_broken_pipe = _reraise_broken_pipe
    return con


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    """Print ``error: message`` (and an optional hint) on stderr, one line each."""
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def info(message: str) -> None:
    """A log line on stderr."""
    print(message, file=sys.stderr)


def write_json(doc: Any) -> None:
    """Pretty JSON on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


# --- inspect

TENSOR_COLUMNS = ["name", "role", "layer", "block", "dtype", "shape", "params", "bytes", "shard"]
MODULE_COLUMNS = ["name", "tensors", "roles", "dtypes", "params", "bytes"]


def _cell(row: dict[str, Any], col: str) -> str:
    v = row.get(col)
    if col == "shape":
        return "x".join(map(str, v)) if v is not None else "-"
    if col in ("roles", "dtypes"):
        return ",".join(v) or "-"
    if col == "shard" and v is None and row.get("tied_to"):
        return f"tied→{row['tied_to']}"
    return "-" if v is None else str(v)


def emit_inspect(report: dict[str, Any], fmt: str, summary: bool) -> None:
    """Print an inspect report in ``fmt`` (table, json, jsonl or tsv)."""
    rows_key = "modules" if "modules" in report else "tensors"
    rows = report[rows_key]
    if fmt == "json":
        doc = dict(report)
        if summary:
            doc.pop(rows_key)
        write_json(doc)
    elif fmt == "jsonl":
        if summary:
            for section, groups in report["summary"].items():
                for key, agg in groups.items():
                    sys.stdout.write(json.dumps({"section": section, "key": key, **agg}) + "\n")
        else:
            for r in rows:
                sys.stdout.write(json.dumps(r) + "\n")
    elif fmt == "tsv":
        _emit_tsv(report, rows_key, rows, summary)
    else:
        _emit_table(report, rows_key, rows, summary)


def _emit_tsv(report: dict[str, Any], rows_key: str, rows: list[dict[str, Any]], summary: bool) -> None:
    out = sys.stdout
    if summary:
        out.write("section\tkey\ttensors\tparams\tbytes\n")
        out.write(f"total\tall\t{report['total_tensors']}\t{report['total_params']}\t{report['total_bytes']}\n")
        for section, groups in report["summary"].items():
            for key, agg in groups.items():
                out.write(f"{section.removeprefix('by_')}\t{key}\t{agg['tensors']}\t{agg['params']}\t{agg['bytes']}\n")
        return
    cols = MODULE_COLUMNS if rows_key == "modules" else TENSOR_COLUMNS
    out.write("\t".join(cols) + "\n")
    for r in rows:
        out.write("\t".join(_cell(r, c) for c in cols) + "\n")


def _emit_table(report: dict[str, Any], rows_key: str, rows: list[dict[str, Any]], summary: bool) -> None:
    from rich.table import Table

    con = _stdout_console()
    fam = report["family"] or "unknown family"
    title = (f"{report['path']}  ·  {fam}  ·  {human_count(report['total_params'])} params  ·  "
             f"{human_bytes(report['total_bytes'])}  ·  {len(report['files'])} file(s)")
    if summary:
        con.print(title)
        for section, groups in report["summary"].items():
            t = Table(title=section.removeprefix("by_"), title_justify="left")
            for c in (section.removeprefix("by_"), "tensors", "params", "bytes", "% params"):
                t.add_column(c, justify="left" if c == section.removeprefix("by_") else "right")
            total = max(report["selected"]["params"], 1)
            for key, agg in groups.items():
                t.add_row(key, str(agg["tensors"]), f"{agg['params']:,}", human_bytes(agg["bytes"]),
                          f"{100 * agg['params'] / total:.2f}")
            con.print(t)
        return
    cols = MODULE_COLUMNS if rows_key == "modules" else TENSOR_COLUMNS
    t = Table(title=title, title_justify="left")
    for c in cols:
        t.add_column(c, justify="right" if c in ("params", "bytes", "layer", "tensors") else "left",
                     overflow="fold")
    for r in rows:
        cells = [_cell(r, c) for c in cols]
        if "params" in cols:
            cells[cols.index("params")] = f"{r['params']:,}"
        if "bytes" in cols:
            cells[cols.index("bytes")] = human_bytes(r["bytes"])
        t.add_row(*cells)
    con.print(t)
    sel = report["selected"]
    _stderr_console().print(
        f"{len(rows)} row(s); selected {sel['params']:,} of {report['total_params']:,} params "
        f"({human_bytes(sel['bytes'])})"
    )


# --- apply plans and runs

PLAN_COLUMNS = ["site", "role", "layer", "block", "method", "new_params"]


def emit_plan(plan: dict[str, Any], fmt: str) -> None:
    """Print an apply plan: one row per insertion, then the totals (table/tsv) or the whole plan (json/jsonl)."""
    rows = plan["insertions"]
    if fmt == "json":
        write_json(plan)
        return
    if fmt == "jsonl":
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    shown = [{**r, "site": r["disk_site"]} for r in rows]
    footer = (f"{plan['new_params']:,} new parameters = {plan['percent_of_base']:.3f}% of {plan['base_params']:,} "
              f"({plan['recipe']} on {plan['family'] or 'unknown family'} {plan['model_class']})")
    if fmt == "tsv":
        sys.stdout.write("\t".join(PLAN_COLUMNS) + "\n")
        for r in shown:
            sys.stdout.write("\t".join("-" if r[c] is None else str(r[c]) for c in PLAN_COLUMNS) + "\n")
        info(footer)
        return
    from rich.table import Table

    t = Table(title=f"plan: {plan['recipe']} → {plan['base']}", title_justify="left")
    for c in PLAN_COLUMNS:
        t.add_column(c, justify="right" if c in ("layer", "new_params") else "left", overflow="fold")
    for r in shown:
        t.add_row(*[f"{r[c]:,}" if c == "new_params" else ("-" if r[c] is None else str(r[c])) for c in PLAN_COLUMNS])
    con = _stdout_console()
    con.print(t)
    con.print(footer)


RUN_COLUMNS = ["name", "method", "site", "role", "dtype", "shape", "params", "trainable"]


def emit_run(report: dict[str, Any], fmt: str) -> None:
    """Print ``pelt inspect RUN``: the inserted tensors, their sites and trainability."""
    rows = report["tensors"]
    if fmt == "json":
        write_json(report)
        return
    if fmt == "jsonl":
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    footer = (f"{report['new_params']:,} inserted parameters ({report['percent_of_base']:.3f}% of the base "
              f"{report['base']['path']}), all trainable; base frozen")
    if fmt == "tsv":
        sys.stdout.write("\t".join(RUN_COLUMNS) + "\n")
        for r in rows:
            sys.stdout.write("\t".join(_cell(r, c) for c in RUN_COLUMNS) + "\n")
        info(footer)
        return
    from rich.table import Table

    t = Table(title=f"run {report['run']} · recipe {report['recipe']}", title_justify="left")
    for c in RUN_COLUMNS:
        t.add_column(c, justify="right" if c == "params" else "left", overflow="fold")
    for r in rows:
        t.add_row(*[f"{r[c]:,}" if c == "params" else _cell(r, c) for c in RUN_COLUMNS])
    con = _stdout_console()
    con.print(t)
    con.print(footer)


# --- training progress and gate tables


class TrainProgress:
    """Renders ``pelt train`` events on stderr: a rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None
        self.last_plain = 0.0

    def __call__(self, e: dict[str, Any]) -> None:
        """Handle one event from :func:`pelt_cli.train.train_run`."""
        kind = e["kind"]
        if kind == "start":
            self._start(e)
        elif kind == "step":
            self._step(e)
        elif kind == "eval":
            self._eval(e)
        elif kind == "end":
            self.close()
            if not self.quiet:
                info(f"best {e['metric']} {e['best']:.4f} at epoch {e['best_epoch']}")

    def _start(self, e: dict[str, Any]) -> None:
        if self.quiet:
            return
        bal = e.get("balance")
        extra = ""
        if bal:
            counts = ", ".join(f"{k} {v}" for k, v in bal["counts"].items())
            extra = f"; classes: {counts} (imbalance {bal['imbalance']:.2f}×)"
        info(f"{e['task']}: {e['train_rows']} train / {e['eval_rows']} eval rows{extra}; "
             f"training {e['trainable']:,} of {e['total']:,} parameters ({100 * e['trainable'] / e['total']:.3f}%)")
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                                console=_stderr_console(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task("train", total=e["total_steps"], status="")

    def _step(self, e: dict[str, Any]) -> None:
        if self.quiet:
            return
        status = f"epoch {e['epoch']} loss {e['loss']:.4f} lr {e['lr']:.2e} {e['rate']:.1f} it/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=e["step"], status=status)
        else:
            import time

            if time.time() - self.last_plain > 10 or e["step"] == e["total_steps"]:
                self.last_plain = time.time()
                info(f"step {e['step']}/{e['total_steps']} {status}")

    def _eval(self, e: dict[str, Any]) -> None:
        if self.quiet:
            return
        skip = {"kind", "gates", "epoch", "step", "seconds", "partial"}
        text = " ".join(f"{k} {v:.4f}" for k, v in e.items() if k not in skip and isinstance(v, float))
        if e.get("partial"):
            line = f"step {e['step']} (epoch {e['epoch']}): {text}"
        else:
            line = f"epoch {e['epoch']}: {text} ({e['seconds']:.0f} s)"
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            info(line)

    def close(self) -> None:
        """Stop the progress bar."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


GATE_COLUMNS = ["site", "layer", "module", "mean", "std", "min", "max"]


def emit_gates(doc: dict[str, Any], rows: list[dict[str, Any]], fmt: str, width: int = 20) -> None:
    """Print gate statistics: a table plus one bar per gate (table), or json/jsonl/tsv rows."""
    if fmt == "json":
        write_json(doc)
        return
    if fmt == "jsonl":
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    if fmt == "tsv":
        sys.stdout.write("\t".join(GATE_COLUMNS) + "\n")
        for r in rows:
            sys.stdout.write("\t".join(_num(r.get(c)) for c in GATE_COLUMNS) + "\n")
        return
    from rich.table import Table

    short, suffix = short_sites([r["site"] for r in rows if r["site"] != "domain"])
    count = next((r.get("count") for r in rows if r.get("count")), None)
    title = f"gates after epoch {doc.get('epoch', '?')}" + (f" over {count:,} eval sequences" if count else "")
    t = Table(title=title + (f"; sites *{suffix}" if suffix else ""), title_justify="left")
    cols = ["site", "module", "mean", "std", "min", "max"]
    for c in cols + ["mean gate"]:
        t.add_column(c, justify="left" if c in ("site", "module", "mean gate") else "right")
    for r in rows:
        mean = r.get("mean")
        bar = "█" * round(width * mean) if isinstance(mean, float) and mean == mean else ""
        t.add_row(short.get(r["site"], r["site"]), *[_num(r.get(c)) for c in cols[1:]], f"{bar:<{width}}|")
    con = _stdout_console()
    con.print(t)
    if "domain" in doc:
        d = doc["domain"]
        state = {True: "healthy (0.3–0.7)", False: "outside the healthy band 0.3–0.7", None: "no data"}[d["healthy"]]
        con.print(f"domain adapter: mean gate {_num(d['gate']['mean'])} — {state}; scale {d['scale']:.4f}")


def short_sites(sites: list[str]) -> tuple[dict[str, str], str]:
    """Sites without their common dotted suffix (``encoder.layer.3.attention.self.query`` → ``encoder.layer.3``)."""
    parts = [s.split(".") for s in dict.fromkeys(sites)]
    if len(parts) < 2:
        return {}, ""
    n = 0
    while all(len(p) > n + 1 for p in parts) and len({p[-1 - n] for p in parts}) == 1:
        n += 1
    if not n:
        return {}, ""
    return {".".join(p): ".".join(p[:-n]) for p in parts}, "." + ".".join(parts[0][-n:])


PRUNE_COLUMNS = ["site", "layer", "module", "mean", "params", "decision"]


def emit_prune(report: dict[str, Any], fmt: str) -> None:
    """``pelt prune --dry-run``: every gated module, its mean gate and the decision."""
    rows = [{**u, "site": u["disk_site"]} for u in report["units"]]
    if fmt == "json":
        write_json(report)
        return
    if fmt == "jsonl":
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
        return
    if fmt == "tsv":
        sys.stdout.write("\t".join(PRUNE_COLUMNS) + "\n")
        for r in rows:
            sys.stdout.write("\t".join(_num(r.get(c)) for c in PRUNE_COLUMNS) + "\n")
        return
    from rich.table import Table

    short, suffix = short_sites([r["site"] for r in rows])
    rule = ", ".join(f"{k}={v}" for k, v in report["rule"].items())
    t = Table(title=f"prune ({rule})" + (f"; sites *{suffix}" if suffix else ""), title_justify="left")
    for c in PRUNE_COLUMNS:
        t.add_column(c, justify="right" if c in ("layer", "mean", "params") else "left")
    style = {"prune": "bold red", "pruned": "dim", "restore": "green"}
    for r in rows:
        cells = [short.get(r["site"], r["site"]), _num(r["layer"]), r["module"], _num(r["mean"]),
                 f"{r['params']:,}", r["decision"]]
        t.add_row(*cells, style=style.get(r["decision"]))
    con = _stdout_console()
    con.print(t)
    con.print(prune_summary(report))


def prune_summary(report: dict[str, Any]) -> str:
    """One line: how many modules and parameters a prune removes."""
    n = sum(u["decision"] == "prune" for u in report["units"])
    live = sum(u["decision"] != "pruned" for u in report["units"])
    before, gone = report["params_before"], report["pruned_params"]
    verb = "would prune" if report["dry_run"] else "pruned"
    return (f"{verb} {n} of {live} gated modules: {gone:,} of {before:,} inserted parameters "
            f"({100 * gone / max(before, 1):.1f}%)")


def evaluation_change(ev: dict[str, Any]) -> str:
    """``accuracy 0.9120 → 0.9050 (-0.70 points); eval 5.21 s → 4.80 s (-7.9%)`` for prune --data."""
    a, b = ev["before"], ev["after"]
    parts = []
    for k in ("accuracy", "f1", "perplexity", "feature_mse", "eval_loss"):
        if k in a and k in b:
            d = b[k] - a[k]
            parts.append(f"{k} {a[k]:.4f} → {b[k]:.4f} ({d * 100:+.2f} points)" if k in ("accuracy", "f1")
                         else f"{k} {a[k]:.4f} → {b[k]:.4f}")
    if a.get("seconds") and b.get("seconds") is not None:
        parts.append(f"eval time on {a['rows']:,} rows {a['seconds']:.2f} s → {b['seconds']:.2f} s "
                     f"({100 * (b['seconds'] / a['seconds'] - 1):+.1f}%)")
    return "; ".join(parts)


def merge_summary(rep: dict[str, Any]) -> str:
    """One line about what ``pelt merge`` wrote."""
    rss = f", peak RSS {human_bytes(rep['peak_rss_bytes'])}" if rep.get("peak_rss_bytes") else ""
    line = (f"merged {rep['out']}: {rep['tensors_written']:,} tensors ({rep['tensors_folded']:,} folded) in "
            f"{rep['shards']} shard(s), {human_bytes(rep['bytes_written'])} in {rep['seconds']:.1f} s{rss}")
    if rep.get("untied"):
        line += f"; untied {', '.join(rep['untied'])}"
    if rep.get("rest"):
        line += f"; {len(rep['unmerged'])} unfoldable module(s) kept as a run in {rep['rest']}"
    return line


def bundle_summary(manifest: dict[str, Any], out: str) -> str:
    """One line about a bundle: tensors stored, bytes, tensors taken from the base."""
    rows = manifest.get("tensors", [])
    stored = [t for t in rows if t.get("stored", "bundle") == "bundle"]
    nbytes = sum(int(t.get("nbytes", 0)) for t in stored)
    where = "stdout (tar)" if out == "-" else out
    return (f"bundle {where}: {len(stored):,} tensors, {human_bytes(nbytes)}"
            + (f"; {len(rows) - len(stored)} taken from the base by checksum" if len(rows) > len(stored) else ""))


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
