"""The only module that imports rich: messages, tables, progress. Data goes to stdout, everything else to stderr.

Every command that prints data goes through :func:`emit_rows` (table, json, jsonl or tsv). Messages go through
:func:`error`, :func:`warning`, :func:`info` and :func:`detail`, which honour the verbosity ``pelt -q`` / ``-v`` set
with :func:`set_verbosity`: errors and warnings always print, info lines and progress need 1 (the default), detail
needs 2 (``-v``); 3 (``-vv``) also lets transformers log.

A reader that closes stdout early (``pelt … | head``) is handled once, in :func:`pelt_cli.cli.main`; a rich console
on stdout re-raises the ``BrokenPipeError`` so that it gets there.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL


def set_verbosity(level: int) -> None:
    """Set how much goes to stderr (0 quiet … 3); also exported as ``PELT_VERBOSITY`` for the library."""
    global _level
    _level = level
    os.environ["PELT_VERBOSITY"] = str(level)


def verbosity() -> int:
    """The level set by :func:`set_verbosity` (default 1)."""
    return _level


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


def one_of(choices: Iterable[str]) -> str:
    """``["a", "b", "c"]`` → ``a, b or c``."""
    items = list(choices)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


# --- messages on stderr


def error(*messages: str, hint: str | None = None) -> None:
    """Print ``error: message`` for each message (and an optional hint) on stderr, one line each, always."""
    for message in messages:
        print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def warning(message: str) -> None:
    """``warning: message`` on stderr; printed even with ``pelt -q``."""
    print(f"warning: {message}", file=sys.stderr)


def info(message: str) -> None:
    """A log line on stderr, unless ``pelt -q``."""
    if _level >= NORMAL:
        print(message, file=sys.stderr)


def detail(message: str) -> None:
    """A log line on stderr only with ``pelt -v``."""
    if _level >= VERBOSE:
        print(message, file=sys.stderr)


def write_json(doc: Any) -> None:
    """Pretty JSON on stdout."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _reraise_broken_pipe() -> None:
    raise BrokenPipeError  # rich's default exits 1; a closed pipe is success (pelt_cli.cli.main)


def _stdout_console() -> Any:
    from rich.console import Console

    con = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    con.on_broken_pipe = _reraise_broken_pipe
    return con


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


# --- rows: the one output path for data


def text(value: Any) -> str:
    """A cell as tsv shows it: ``-`` for None, floats with 4 decimals, anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _grouped(value: int) -> str:
    return f"{value:,}"


@dataclass(frozen=True)
class Column:
    """One column of :func:`emit_rows`.

    Attributes:
        key: the row's key.
        cell: the cell text from the whole row (default: :func:`text` of ``row[key]``).
        table: the cell text in a table, where it differs from tsv's.
        header: the table's header (default: ``key``).
        right: right-aligned in a table.
        in_tsv: shown in tsv (False: table only).
        in_table: shown in a table (False: tsv only).
    """

    key: str
    cell: Callable[[dict[str, Any]], str] | None = None
    table: Callable[[dict[str, Any]], str] | None = None
    header: str | None = None
    right: bool = False
    in_tsv: bool = True
    in_table: bool = True

    def tsv_text(self, row: dict[str, Any]) -> str:
        """The cell in tsv."""
        return self.cell(row) if self.cell else text(row.get(self.key))

    def table_text(self, row: dict[str, Any]) -> str:
        """The cell in a table."""
        return self.table(row) if self.table else self.tsv_text(row)


def number(key: str, table: Callable[[int], str] = _grouped) -> Column:
    """A right-aligned count: raw in tsv, ``22,713,216`` (or ``table(value)``) in a table."""
    return Column(key, table=lambda r: table(r[key]), right=True)


def emit_rows(
    rows: list[dict[str, Any]],
    columns: list[Column],
    fmt: str,
    *,
    doc: Any = None,
    title: str = "",
    footer: str | None = None,
    style: Callable[[dict[str, Any]], str | None] | None = None,
) -> None:
    """Print rows on stdout as a table, json, jsonl or tsv: the one output path of every command that prints data.

    Args:
        rows: one dict per row; jsonl writes each one whole.
        columns: what tsv (with a header line) and the table show.
        fmt: ``table``, ``json``, ``jsonl`` or ``tsv``.
        doc: what json writes (default: the rows).
        title: the table's title.
        footer: a closing line: under the table, or on stderr after tsv (json and jsonl carry it in ``doc``).
        style: a row's rich style in the table.
    """
    if fmt == "json":
        write_json(rows if doc is None else doc)
    elif fmt == "jsonl":
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "tsv":
        shown = [c for c in columns if c.in_tsv]
        sys.stdout.write("\t".join(c.key for c in shown) + "\n")
        for r in rows:
            sys.stdout.write("\t".join(c.tsv_text(r) for c in shown) + "\n")
        if footer:
            info(footer)
    else:
        _emit_table(rows, [c for c in columns if c.in_table], title, footer, style)


def _emit_table(
    rows: list[dict[str, Any]],
    columns: list[Column],
    title: str,
    footer: str | None,
    style: Callable[[dict[str, Any]], str | None] | None,
) -> None:
    from rich.table import Table

    t = Table(title=title or None, title_justify="left")
    for c in columns:
        t.add_column(c.header or c.key, justify="right" if c.right else "left", overflow="fold")
    for r in rows:
        t.add_row(*[c.table_text(r) for c in columns], style=style(r) if style else None)
    con = _stdout_console()
    con.print(t)
    if footer:
        con.print(footer)


# --- inspect


def _shape(r: dict[str, Any]) -> str:
    return "x".join(map(str, r["shape"])) if r.get("shape") is not None else "-"


def _joined(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: ",".join(r[key]) or "-"


def _shard(r: dict[str, Any]) -> str:
    return f"tied→{r['tied_to']}" if r.get("shard") is None and r.get("tied_to") else text(r.get("shard"))


TENSOR_COLUMNS = [
    Column("name"),
    Column("role"),
    Column("how"),  # table (a family's role table) or inferred (from names and shapes)
    Column("layer", right=True),
    Column("block"),
    Column("dtype"),
    Column("shape", _shape),
    number("params"),
    number("bytes", human_bytes),
    Column("shard", _shard),
]
MODULE_COLUMNS = [
    Column("name"),
    Column("tensors", right=True),
    Column("roles", _joined("roles")),
    Column("dtypes", _joined("dtypes")),
    number("params"),
    number("bytes", human_bytes),
]


def emit_inspect(report: dict[str, Any], fmt: str, summary: bool) -> None:
    """Print an inspect report: its tensors (or modules, with ``--depth``), or with ``summary`` its totals."""
    rows_key = "modules" if "modules" in report else "tensors"
    if summary:
        _emit_summary(report, fmt, {k: v for k, v in report.items() if k != rows_key})
        return
    rows = report[rows_key]
    emit_rows(
        rows, MODULE_COLUMNS if rows_key == "modules" else TENSOR_COLUMNS, fmt, doc=report, title=_inspect_title(report)
    )
    if fmt == "table":
        sel = report["selected"]
        info(
            f"{len(rows)} row(s); selected {sel['params']:,} of {report['total_params']:,} params "
            f"({human_bytes(sel['bytes'])})"
        )


def _inspect_title(report: dict[str, Any]) -> str:
    return (
        f"{report['path']}  ·  {report['family'] or 'unknown family'}  ·  "
        f"{human_count(report['total_params'])} params  ·  {human_bytes(report['total_bytes'])}  ·  "
        f"{len(report['files'])} file(s)"
    )


def _section(r: dict[str, Any]) -> str:
    return r["section"].removeprefix("by_")


SUMMARY_COLUMNS = [Column("section", _section), Column("key"), Column("tensors"), Column("params"), Column("bytes")]


def _emit_summary(report: dict[str, Any], fmt: str, doc: dict[str, Any]) -> None:
    """The totals: a ``total`` row, then one row per dtype, role, block and layer (a table per section)."""
    sections = report["summary"]
    if fmt != "table":
        total = {
            "section": "total",
            "key": "all",
            "tensors": report["total_tensors"],
            "params": report["total_params"],
            "bytes": report["total_bytes"],
        }
        rows = [total] + [
            {"section": s, "key": k, **agg} for s, groups in sections.items() for k, agg in groups.items()
        ]
        emit_rows(rows, SUMMARY_COLUMNS, fmt, doc=doc)
        return
    _stdout_console().print(_inspect_title(report))
    selected = max(report["selected"]["params"], 1)
    percent = Column("percent", lambda r: f"{100 * r['params'] / selected:.2f}", header="% params", right=True)
    for section, groups in sections.items():
        name = section.removeprefix("by_")
        cols = [
            Column("key", header=name),
            Column("tensors", right=True),
            number("params"),
            number("bytes", human_bytes),
            percent,
        ]
        emit_rows([{"key": k, **agg} for k, agg in groups.items()], cols, fmt, title=name)


# --- apply plans and runs

PLAN_COLUMNS = [
    Column("site", lambda r: text(r["disk_site"])),
    Column("role"),
    Column("layer", right=True),
    Column("block"),
    Column("method"),
    number("new_params"),
]
PLAN_FOOTER = (
    "{new_params:,} new parameters = {percent_of_base:.3f}% of {base_params:,} ({recipe} on {family} {model_class})"
)


def emit_plan(plan: dict[str, Any], fmt: str) -> None:
    """Print an apply plan: one row per insertion and the totals (json: the whole plan)."""
    footer = PLAN_FOOTER.format_map({**plan, "family": plan["family"] or "unknown family"})
    emit_rows(
        plan["insertions"], PLAN_COLUMNS, fmt, doc=plan, title=f"plan: {plan['recipe']} → {plan['base']}", footer=footer
    )


RUN_COLUMNS = [
    Column("name"),
    Column("method"),
    Column("site"),
    Column("role"),
    Column("dtype"),
    Column("shape", _shape),
    number("params"),
    Column("trainable"),
]
RUN_FOOTER = (
    "{new_params:,} inserted parameters ({percent_of_base:.3f}% of the base {base[path]}), all trainable; base frozen"
)


def emit_run(report: dict[str, Any], fmt: str) -> None:
    """Print ``pelt inspect RUN``: the inserted tensors, their sites and trainability."""
    title = f"run {report['run']} · recipe {report['recipe']}"
    emit_rows(report["tensors"], RUN_COLUMNS, fmt, doc=report, title=title, footer=RUN_FOOTER.format_map(report))


# --- recipes


def emit_recipes(recipes: dict[str, str], fmt: str) -> None:
    """``pelt recipes ls``: each bundled recipe's name and description."""
    rows = [{"name": name, "description": desc} for name, desc in recipes.items()]
    emit_rows(rows, [Column("name"), Column("description")], fmt, title="bundled recipes")


# --- training progress and gate tables


def _progress_bar(title: str, status: str, **options: Any) -> Any:
    """A started rich progress bar on stderr: bold ``title``, the bar, done/total, ``status`` and the time left.

    Args:
        title: the bar's name, shown in bold.
        status: the text column after the count (a rich format string, e.g. ``{task.fields[status]}``).
        **options: further ``rich.progress.Progress`` options (``transient``, ``redirect_stdout``, …).

    Returns:
        The started ``rich.progress.Progress``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"[bold]{title}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(status),
        TimeRemainingColumn(),
        console=_stderr_console(),
        **options,
    )
    bar.start()
    return bar


class TrainProgress:
    """Renders ``pelt train`` events on stderr: a rich progress bar on a terminal, plain lines otherwise.

    Silent with ``quiet`` or ``pelt -q``.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet or _level < NORMAL
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None
        self.last_plain = 0.0

    def __call__(self, e: dict[str, Any]) -> None:
        """Handle one event from :func:`pelt_cli.train.train_run`."""
        if self.quiet:
            return
        kind = e["kind"]
        if kind == "start":
            self._start(e)
        elif kind == "step":
            self._step(e)
        elif kind == "eval":
            self._eval(e)
        elif kind == "end":
            self.close()
            info(f"best {e['metric']} {e['best']:.4f} at epoch {e['best_epoch']}")

    def _start(self, e: dict[str, Any]) -> None:
        bal = e.get("balance")
        extra = ""
        if bal:
            counts = ", ".join(f"{k} {v}" for k, v in bal["counts"].items())
            extra = f"; classes: {counts} (imbalance {bal['imbalance']:.2f}×)"
        info(
            f"{e['task']}: {e['train_rows']} train / {e['eval_rows']} eval rows{extra}; "
            f"training {e['trainable']:,} of {e['total']:,} parameters ({100 * e['trainable'] / e['total']:.3f}%)"
        )
        if self.tty:
            self.bar = _progress_bar("train", "{task.fields[status]}", transient=False)
            self.task = self.bar.add_task("train", total=e["total_steps"], status="")

    def _step(self, e: dict[str, Any]) -> None:
        status = f"epoch {e['epoch']} loss {e['loss']:.4f} lr {e['lr']:.2e} {e['rate']:.1f} it/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=e["step"], status=status)
        else:
            import time

            if time.time() - self.last_plain > 10 or e["step"] == e["total_steps"]:
                self.last_plain = time.time()
                info(f"step {e['step']}/{e['total_steps']} {status}")

    def _eval(self, e: dict[str, Any]) -> None:
        skip = {"kind", "gates", "epoch", "step", "seconds", "partial"}
        values = " ".join(f"{k} {v:.4f}" for k, v in e.items() if k not in skip and isinstance(v, float))
        if e.get("partial"):
            line = f"step {e['step']} (epoch {e['epoch']}): {values}"
        else:
            line = f"epoch {e['epoch']}: {values} ({e['seconds']:.0f} s)"
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            info(line)

    def close(self) -> None:
        """Stop the progress bar."""
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


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


def _short_site(short: dict[str, str]) -> Column:
    return Column("site", table=lambda r: short.get(r["site"], r["site"]))


def emit_gates(
    doc: dict[str, Any],
    rows: list[dict[str, Any]],
    fmt: str,
    width: int = 20,
    history: tuple[list[str], list[dict[str, Any]]] | None = None,
    hints: list[str] | None = None,
) -> None:
    """Print gate statistics: a table with one bar per gate and the layer's gate entropy, the per-epoch history of
    the means and the guide's remedy hints; or json (the whole ``doc`` with ``entropy`` and ``hints``), jsonl or tsv
    rows (the hints on stderr)."""
    short, suffix = short_sites([r["site"] for r in rows if r["site"] != "domain"])
    count = next((r.get("count") for r in rows if r.get("count")), None)
    title = f"gates after epoch {doc.get('epoch', '?')}" + (f" over {count:,} eval sequences" if count else "")

    def bar(r: dict[str, Any]) -> str:
        mean = r.get("mean")
        blocks = "█" * round(width * mean) if isinstance(mean, float) and mean == mean else ""  # NaN: no bar
        return f"{blocks:<{width}}|"

    con = doc.get("contribution")
    contribution = [  # AutoPELT's relative contribution per unit, and what --auto-prune left off
        Column("contribution", right=True),
        Column("off", lambda r: "off" if r.get("off") else "-"),
    ]
    cols = [
        _short_site(short),
        Column("layer", in_table=False),
        Column("module"),
        *[Column(k, right=True) for k in ("mean", "std", "min", "max")],
        *(contribution if con else []),
        Column("entropy", right=True),
        Column("mean gate", bar, in_tsv=False),
    ]
    if con:
        title += f"; contribution: relative to the strongest unit, {con.get('window', '?')}-step window"
    entropy = {r["site"]: r["entropy"] for r in rows if r.get("entropy") is not None}
    full = {**doc, **({"entropy": entropy} if entropy else {}), "hints": list(hints or [])}
    emit_rows(
        rows, cols, fmt, doc=full, title=title + (f"; sites *{suffix}" if suffix else ""), footer=_domain_line(doc)
    )
    if fmt == "table" and history and len(history[0]) > 1:
        epochs, hrows = history
        hcols = [_short_site(short), Column("module"), *[Column(e, header=f"epoch {e}", right=True) for e in epochs]]
        _emit_table(hrows, hcols, "mean gate per epoch", None, None)
    if fmt != "json":  # json carries them in the doc
        for h in hints or []:
            if fmt == "table":
                _stdout_console().print(f"hint: {h}", markup=False)
            else:
                info(f"hint: {h}")


def _domain_line(doc: dict[str, Any]) -> str | None:
    if "domain" not in doc:
        return None
    d = doc["domain"]
    state = {True: "healthy (0.3–0.7)", False: "outside the healthy band 0.3–0.7", None: "no data"}[d["healthy"]]
    return f"domain adapter: mean gate {text(d['gate']['mean'])} — {state}; scale {d['scale']:.4f}"


PRUNE_STYLE = {"prune": "bold red", "pruned": "dim", "restore": "green"}


def emit_prune(report: dict[str, Any], fmt: str) -> None:
    """``pelt prune --dry-run``: every gated module, its score (the mean gate, or with ``--by contribution`` the
    relative contribution) and the decision."""
    rows = [{**u, "site": u["disk_site"]} for u in report["units"]]
    short, suffix = short_sites([r["site"] for r in rows])
    rule = ", ".join(f"{k}={v}" for k, v in report["rule"].items())
    by = "relative" if report["rule"].get("by") == "contribution" else "mean"
    cols = [
        _short_site(short),
        Column("layer", right=True),
        Column("module"),
        Column(by, right=True),
        number("params"),
        Column("decision"),
    ]
    emit_rows(
        rows,
        cols,
        fmt,
        doc=report,
        title=f"prune ({rule})" + (f"; sites *{suffix}" if suffix else ""),
        footer=prune_summary(report),
        style=lambda r: PRUNE_STYLE.get(r["decision"]),
    )


def prune_summary(report: dict[str, Any]) -> str:
    """One line: how many modules and parameters a prune removes."""
    n = sum(u["decision"] == "prune" for u in report["units"])
    live = sum(u["decision"] != "pruned" for u in report["units"])
    before, gone = report["params_before"], report["pruned_params"]
    verb = "would prune" if report["dry_run"] else "pruned"
    return (
        f"{verb} {n} of {live} gated modules: {gone:,} of {before:,} inserted parameters "
        f"({100 * gone / max(before, 1):.1f}%)"
    )


def evaluation_change(ev: dict[str, Any]) -> str:
    """``accuracy 0.9120 → 0.9050 (-0.70 points); eval 5.21 s → 4.80 s (-7.9%)`` for prune --data."""
    a, b = ev["before"], ev["after"]
    parts = []
    for k in ("accuracy", "f1", "perplexity", "feature_mse", "eval_loss"):
        if k in a and k in b:
            d = b[k] - a[k]
            parts.append(
                f"{k} {a[k]:.4f} → {b[k]:.4f} ({d * 100:+.2f} points)"
                if k in ("accuracy", "f1")
                else f"{k} {a[k]:.4f} → {b[k]:.4f}"
            )
    if a.get("seconds") and b.get("seconds") is not None:
        parts.append(
            f"eval time on {a['rows']:,} rows {a['seconds']:.2f} s → {b['seconds']:.2f} s "
            f"({100 * (b['seconds'] / a['seconds'] - 1):+.1f}%)"
        )
    return "; ".join(parts)


def merge_summary(rep: dict[str, Any]) -> str:
    """One line about what ``pelt merge`` wrote."""
    rss = f", peak RSS {human_bytes(rep['peak_rss_bytes'])}" if rep.get("peak_rss_bytes") else ""
    line = (
        f"merged {rep['out']}: {rep['tensors_written']:,} tensors ({rep['tensors_folded']:,} folded) in "
        f"{rep['shards']} shard(s), {human_bytes(rep['bytes_written'])} in {rep['seconds']:.1f} s{rss}"
    )
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
    return f"bundle {where}: {len(stored):,} tensors, {human_bytes(nbytes)}" + (
        f"; {len(rows) - len(stored)} taken from the base by checksum" if len(rows) > len(stored) else ""
    )


CHECK_STYLES = {"fail": "red", "warn": "yellow", "skip": "dim"}


def emit_checks(report: dict[str, Any], fmt: str) -> None:
    """``pelt verify``: one row per check (check, status, detail); json writes the whole report."""
    failed = sum(c["status"] == "fail" for c in report["checks"])
    footer = f"{report['kind']} {report['path']}: " + (f"{failed} check(s) failed" if failed else "every check passed")
    emit_rows(
        report["checks"],
        [Column("check"), Column("status"), Column("detail")],
        fmt,
        doc=report,
        title=f"verify {report['kind']} {report['path']}",
        footer=footer,
        style=lambda r: CHECK_STYLES.get(r["status"]),
    )


# --- predict and eval


def write_jsonl(rows: Iterable[dict[str, Any]]) -> None:
    """Each row as one JSON line on stdout, written as it comes (``pelt predict``)."""
    for r in rows:
        sys.stdout.write(json.dumps(r) + "\n")


class RowProgress:
    """A progress bar on stderr for ``pelt predict`` and ``pelt eval``, shown for inputs longer than a few batches,
    on a terminal and without ``pelt -q``; called with (rows just done, total rows) after each batch."""

    LONG = 4  # batches: shorter inputs get no bar

    def __init__(self, label: str, batch_size: int) -> None:
        self.label, self.batch_size = label, batch_size
        self.bar: Any = None
        self.task: Any = None
        self.off = _level < NORMAL or not sys.stderr.isatty()

    def __enter__(self) -> RowProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __call__(self, done: int, total: int) -> None:
        """Advance by ``done`` rows of ``total``."""
        if self.bar is None and not self.off:
            if total <= self.LONG * self.batch_size:
                self.off = True
                return
            # stdout carries the rows
            self.bar = _progress_bar(self.label, "rows", transient=True, redirect_stdout=False, redirect_stderr=False)
            self.task = self.bar.add_task(self.label, total=total)
        if self.bar is not None:
            self.bar.advance(self.task, done)


CLASS_COLUMNS = [Column("label"), *[Column(k, right=True) for k in ("precision", "recall", "f1")], number("support")]


def _emit_ablation(doc: dict[str, Any], fmt: str) -> None:
    """The no-gate ablation of ``pelt eval --ablate-gates``: each metric gated, with gates held at 1, and the change;
    a table on stdout after the report, a line on stderr in the other formats (their stdout is the report)."""
    ab = doc["ablation"]
    rows = [{"metric": k, "gated": doc[k], "gates at 1": ab[k], "change": ab["delta"][k]} for k in ab["delta"]]
    if fmt == "table":
        cols = [Column("metric"), *[Column(k, right=True) for k in ("gated", "gates at 1", "change")]]
        emit_rows(rows, cols, fmt, title=f"no-gate ablation ({ab['controllers']} gated layers held at 1)")
        return
    info("no-gate ablation: " + " · ".join(f"{r['metric']} {r['gated']:.4f} → {r['gates at 1']:.4f}" for r in rows))


def emit_eval(doc: dict[str, Any], fmt: str) -> None:
    """``pelt eval``: json the whole report; a classifier's per-class rows in jsonl/tsv (the metrics on stderr after
    tsv), and in a table the metrics, the per-class table and the confusion matrix; a causal LM's loss row. Then the
    no-gate ablation where it was asked for (in json it is the report's ``ablation``)."""
    _emit_report(doc, fmt)
    if "ablation" in doc and fmt != "json":
        _emit_ablation(doc, fmt)


def _emit_report(doc: dict[str, Any], fmt: str) -> None:
    title = f"eval {doc['source']} on {doc['data']} ({doc['task']}, {doc['rows']:,} rows)"
    if doc["task"] in ("causal-lm", "speech-to-text"):
        cols = [number("rows"), number("tokens"), Column("loss", right=True), Column("perplexity", right=True)]
        emit_rows([doc], cols, fmt, doc=doc, title=title)
        return
    names = {"accuracy": "accuracy", "macro_f1": "macro-F1", "loss": "loss"}
    if fmt != "table":
        footer = " · ".join(f"{name} {doc[k]:.4f}" for k, name in names.items()) + f" · {doc['rows']:,} rows"
        emit_rows(doc["per_class"], CLASS_COLUMNS, fmt, doc=doc, footer=footer)
        return
    _stdout_console().print(title)
    metrics = [{"metric": name, "value": doc[k]} for k, name in names.items()]
    emit_rows(metrics, [Column("metric"), Column("value", right=True)], fmt)
    emit_rows(doc["per_class"], CLASS_COLUMNS, fmt, title="per class")
    labels, matrix = doc["confusion"]["labels"], doc["confusion"]["matrix"]
    cols = [
        Column("true", header="true \\ predicted"),
        *[Column(f"p{j}", header=lab, right=True) for j, lab in enumerate(labels)],
    ]
    rows = [{"true": lab, **{f"p{j}": n for j, n in enumerate(row)}} for lab, row in zip(labels, matrix, strict=True)]
    emit_rows(rows, cols, fmt, title="confusion matrix")
