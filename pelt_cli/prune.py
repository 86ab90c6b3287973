"""``pelt prune``: remove the gated modules whose learned gate says they are idle, reversibly.

A *unit* is one gated module in one layer — UniPELT's ``lora``, ``prefix`` or ``adapter`` behind its gate — or a
domain adapter (its per-timestep gate). Its score (``by``) is either its mean gate on the eval set (``gate``, the
default) or its AutoPELT contribution (``contribution``): the windowed mean gate × gradient norm ``pelt train``
measured (:mod:`pelt_cli.autopelt`), relative to the largest unit's, in [0, 1]; both are in ``gates.json``. Rules:
``threshold`` prunes every unit with a score < θ (θ = 0.05 by default); ``keep_top_k`` keeps the K highest, over all
units or ``per`` method or per layer.

Pruning rewrites the run's recipe so that rebuilding the run gives the pruned model, and every other command
(``load_run``, train, merge, export) needs nothing special: a UniPELT entry is split by layer groups, and the
pruned modules of a group go into its ``params.pruned``. Their gate controllers keep all their outputs, so the
remaining modules see exactly the gates they saw before: the model's output changes only through the modules
removed. Their tensors move from ``adapter.safetensors`` to ``pruned.safetensors`` and the original recipe stays in
``run.json``, so :func:`restore_run` brings everything back bit for bit. The training state (``train/``: optimizer
moments of the removed parameters) is dropped; train the pruned run again without ``--resume``.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli import methods
from pelt_cli.errors import CheckpointError, PeltError, PruneRefused, UsageError
from pelt_cli.io.atomic import claim, guard_output
from pelt_cli.recipe import Recipe
from pelt_cli.run import GATES_FILE, PRUNED_FILE, RECIPE_FILE, STATE_DIR, Run, expected_state, now

DEFAULT_THRESHOLD = 0.05
BY = ("gate", "contribution")  # what prune ranks units by
STAGE_DIR = ".pelt-pruned"  # where prune_units(staged=...) builds the pruned run inside the new generation


@dataclass
class Unit:
    """One gated module in one layer (or a domain adapter) with its mean gate and what prune decided."""

    entry: int
    module: str  # lora, prefix, adapter or domain
    site: str  # the gate's site (UniPELT: the layer's query projection); the adapter's site for domain
    disk_site: str
    block: str | None
    layer: int | None
    mean: float
    std: float
    params: int
    decision: str = "keep"  # keep | prune | pruned (by an earlier prune)
    tensors: list[str] = field(default_factory=list)
    gate: Any = field(default=None, repr=False)  # the methods' GateUnit
    contribution: float = math.nan  # AutoPELT's windowed mean gate × gradient norm (autopelt), if recorded
    relative: float = math.nan  # the contribution relative to the largest unit's, in [0, 1]


@dataclass
class PruneReport:
    """What ``pelt prune`` did (or, with ``dry_run``, would do)."""

    run: str
    out: str | None
    rule: dict[str, Any]
    units: list[Unit]
    pruned_params: int
    params_before: int
    params_after: int
    dry_run: bool = False
    evaluation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        d = asdict(self)
        for u in d["units"]:
            u.pop("tensors")
            u.pop("gate")
        return d


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan


def _stats(doc: dict, path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, dict) else None


def units_of(run: Run, doc: dict | None) -> list[Unit]:
    """Every gated unit of a run with its gate statistics (units pruned earlier included, marked ``pruned``).

    Raises:
        PruneRefused: nothing gated, or no gate statistics for a unit.
    """
    gate_units = run.gate_units()
    if not gate_units:
        kinds = sorted({e.method for e in run.recipe.inserts})
        raise PruneRefused(
            f"{run.dir}: nothing gated to prune (methods: {', '.join(kinds)})",
            hint="pelt prune removes gated modules (UniPELT's, domain adapters) by their learned gates",
        )
    if doc is None:
        raise PruneRefused(
            f"{run.dir}: no gate statistics ({GATES_FILE}); prune decides by the learned gates",
            hint=f"train the run first: pelt train {run.dir} --data FILE",
        )
    rows, out = run.insertions, []
    for u in gate_units:
        gate = rows[u.row]
        s = _stats(doc, u.stats) or {}  # none: a NaN mean, which decide() refuses (never evaluated)
        c = _stats(doc, ("contribution", *u.stats)) or {}
        out.append(
            Unit(
                u.entry,
                u.module,
                gate.site,
                gate.disk_site,
                gate.block,
                gate.layer,
                _num(s.get("mean")),
                _num(s.get("std")),
                sum(rows[i].new_params for i in u.members),
                "pruned" if u.pruned else "keep",
                [m for i in u.members for m in rows[i].modules],
                u,
                _num(c.get("value")),
                _num(c.get("relative")),
            )
        )
    return out


def score(u: Unit, by: str = "gate") -> float:
    """What a rule compares: the mean gate (``gate``) or the relative AutoPELT contribution (``contribution``)."""
    return u.relative if by == "contribution" else u.mean


def decide(
    units: list[Unit], threshold: float | None, keep_top_k: int | None, per: str | None, by: str = "gate"
) -> None:
    """Mark units ``prune`` by a threshold on their :func:`score`, or keep the top K (overall, per method or per
    layer)."""
    live = [u for u in units if u.decision != "pruned"]
    unknown = [u for u in live if math.isnan(score(u, by))]
    if unknown:
        what = "gate mean" if by == "gate" else "recorded contribution"
        raise PruneRefused(
            f"no {what} for {unknown[0].module} at {unknown[0].disk_site} (never evaluated or measured)",
            hint="train the run with an eval set so that pelt train records every gate and contribution",
        )
    if keep_top_k is None:
        theta = DEFAULT_THRESHOLD if threshold is None else threshold
        for u in live:
            u.decision = "prune" if score(u, by) < theta else "keep"
        return
    groups: dict[Any, list[Unit]] = {}
    for u in live:
        key = u.module if per == "method" else (u.block, u.layer, u.site) if per == "layer" else None
        groups.setdefault(key, []).append(u)
    for members in groups.values():
        ranked = sorted(members, key=lambda u: -score(u, by))
        for i, u in enumerate(ranked):
            u.decision = "keep" if i < keep_top_k else "prune"


def pruned_recipe(run: Run, units: list[Unit]) -> dict[str, Any]:
    """The recipe that rebuilds the run without the units marked ``prune`` (see the module docstring)."""
    recipe = run.recipe.to_dict()
    inserts = []
    for e, entry in enumerate(recipe["inserts"]):
        mine = [(u.gate, u.decision) for u in units if u.entry == e]
        if not any(d == "prune" for _, d in mine):
            inserts.append(entry)
            continue
        fn = methods.hook(methods.get(entry["method"]), "pruned_entries")
        if fn is None:
            raise PeltError(f"internal: {entry['method']} has gated units but no pruned_entries hook")
        inserts += fn(entry, mine, run.insertions)
    return {**recipe, "inserts": inserts}


def _target(run_dir: Path, out: str | Path | None, force: bool) -> Path:
    """Where the prune goes (``run_dir`` itself by default), checked and locked until the new run is committed."""
    if out is None or Path(out).resolve() == run_dir.resolve():
        claim(run_dir)  # in place: a second writer of the run is refused from here to the commit
        return run_dir
    target = guard_output(out, force, [run_dir])
    claim(target)
    return target


def _check_rule(threshold: float | None, keep_top_k: int | None, per: str | None, by: str = "gate") -> dict[str, Any]:
    """The rule as the report records it; raises UsageError for a bad combination or value."""
    if by not in BY:
        raise UsageError(f"--by {by!r}: expected {' or '.join(BY)}")
    if threshold is not None and keep_top_k is not None:
        raise UsageError("--threshold and --keep-top-k exclude each other; pass one")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        what = "a gate value" if by == "gate" else "a relative contribution"
        raise UsageError(f"--threshold {threshold}: expected {what} in [0, 1]")
    if keep_top_k is not None and keep_top_k < 0:
        raise UsageError(f"--keep-top-k {keep_top_k}: expected 0 or more")
    if per not in (None, "method", "layer"):
        raise UsageError(f"--per {per!r}: expected method or layer")
    if per is not None and keep_top_k is None:
        raise UsageError("--per applies to --keep-top-k only")
    extra = {"by": by} if by != "gate" else {}
    if keep_top_k is not None:
        return {"keep_top_k": keep_top_k, "per": per or "all", **extra}
    return {"threshold": DEFAULT_THRESHOLD if threshold is None else threshold, **extra}


def _rebuilt(run: Run, recipe_doc: dict[str, Any]) -> tuple[Run, dict[str, tuple]]:
    """The run with another recipe (validated on its base's skeleton) and the tensors that recipe expects."""
    recipe = Recipe.from_dict(recipe_doc, run.where)
    model, rows = run.skeleton(recipe=recipe)
    return run.with_recipe(recipe, rows), expected_state(model)


def _split_tensors(run: Run, units: list[Unit], want: dict[str, tuple]) -> tuple[dict, dict]:
    """The adapter tensors the pruned run keeps, and those that move to ``pruned.safetensors``."""
    adapter = run.read_adapter()
    moved = {n: t for n, t in adapter.items() if n not in want}
    kept = {n: t for n, t in adapter.items() if n in want}
    claimed = {t for u in units if u.decision == "prune" for t in u.tensors}
    for g in {u.gate.row for u in units} - {i for u in units for i in u.gate.members}:  # gate-only rows
        if all(u.decision != "keep" for u in units if u.gate.row == g):  # a gate whose modules all go goes too
            claimed.update(run.insertions[g].modules)
    stray = [n for n in moved if not any(n.startswith(m + ".") for m in claimed)]
    if stray or {n: tuple(t.shape) for n, t in kept.items()} != want:
        raise PeltError(f"internal: pruning {run.dir} would move tensors of kept modules ({stray[:3]}) or miss some")
    return kept, {**run.read_extra(PRUNED_FILE), **moved}


def _history(run: Run, rule: dict, gone: list[Unit]) -> dict[str, Any]:
    """``run.json``'s ``pruning``: the original recipe and size, and one entry per prune."""
    old = run.meta.pruning or {}
    history = list(old.get("history", []))
    history.append(
        {
            "time": now(),
            "rule": rule,
            "pruned": [
                {
                    "module": u.module,
                    "site": u.disk_site,
                    "layer": u.layer,
                    "block": u.block,
                    "mean": u.mean,
                    "params": u.params,
                }
                for u in gone
            ],
        }
    )
    return {
        "original_recipe": old.get("original_recipe", run.meta.recipe),
        "original_new_params": old.get("original_new_params", run.meta.new_params),
        "history": history,
    }


def prune_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    threshold: float | None = None,
    keep_top_k: int | None = None,
    per: str | None = None,
    dry_run: bool = False,
    data: str | None = None,
    batch_size: int = 32,
    force: bool = False,
    by: str = "gate",
) -> PruneReport:
    """Prune a trained run in place (``out=None``) or into a new run directory.

    Args:
        run_dir: a run with gate statistics (``pelt train`` writes them).
        out: the pruned run (default: replace ``run_dir`` atomically).
        threshold: prune units whose mean gate is below θ (default 0.05 when ``keep_top_k`` is not given).
        keep_top_k: keep the K units with the highest mean gate instead (``per``: None, ``method`` or ``layer``).
        per: group ``keep_top_k`` by ``method`` or ``layer`` (default: over all units).
        dry_run: decide and report, write nothing.
        data: evaluate before and after on this data (a file or a built-in dataset's eval split).
        batch_size: evaluation batch size.
        force: replace an existing ``out``.
        by: rank and threshold units by their mean ``gate`` or their relative ``contribution`` (AutoPELT).

    Raises:
        PruneRefused: no gates, no statistics (no recorded contribution with ``by="contribution"``), or a rule that
            would leave no module at all.
    """
    rule = _check_rule(threshold, keep_top_k, per, by)
    run = Run.open(run_dir)
    doc = run.gates()
    units = units_of(run, doc)
    if by == "contribution" and not (doc or {}).get("contribution"):
        raise PruneRefused(
            f"{run.dir}: no recorded contribution in {GATES_FILE} (pelt train measures it); "
            "train the run again or prune --by gate"
        )
    decide(units, threshold, keep_top_k, per, by)
    target = None if dry_run else _target(run.dir, out, force)
    return _prune(run, units, rule, target, dry_run, data, batch_size, force)


def prune_units(
    run_dir: str | Path, select: Any, rule: dict[str, Any], gates: dict | None = None, staged: str | None = None
) -> PruneReport:
    """Prune, in place, the units whose statistics path (``GateUnit.stats``) ``select`` accepts: AutoPELT's end of
    training (:func:`pelt_cli.autopelt.finish`), recorded in ``run.json``'s pruning history under ``rule``.

    Args:
        run_dir: the run.
        select: ``stats → bool``: the units to prune.
        rule: what the pruning history records.
        gates: the run's ``gates.json`` document (default: read from ``run_dir``).
        staged: ``run_dir`` is a new generation not yet committed (the final training checkpoint's) that will be
            committed as the run at this path: it is rewritten where it lies, its commit is the caller's (one unit
            with the checkpoint); the new generation stays whole until then, whatever the rewrite leaves.
    """
    run = Run.open(run_dir)
    units = units_of(run, run.gates() if gates is None else gates)
    for u in units:
        if u.decision == "keep" and select(u.gate.stats):
            u.decision = "prune"
    if staged is None:
        return _prune(run, units, rule, run.dir)
    if not any(u.decision == "prune" for u in units):
        return _prune(run, units, rule, None, dry_run=True)
    stage = run.dir / STAGE_DIR  # hidden: a kill leaves it inside the uncommitted generation, removed with it
    report = _prune(run, units, rule, stage, force=True)
    for p in list(run.dir.iterdir()):  # the pruned run becomes the new generation
        if p != stage:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in stage.iterdir():
        p.rename(run.dir / p.name)
    stage.rmdir()
    recipe = run.dir / RECIPE_FILE
    recipe.write_text(f"# rewritten by pelt prune ({rule}) from {staged}\n" + recipe.read_text().split("\n", 1)[1])
    report.out = staged
    return report


def _prune(
    run: Run,
    units: list[Unit],
    rule: dict[str, Any],
    target: Path | None,
    dry_run: bool = False,
    data: str | None = None,
    batch_size: int = 32,
    force: bool = False,
) -> PruneReport:
    """Write the run without the units decided ``prune`` to ``target`` (nothing with ``dry_run``)."""
    gone = [u for u in units if u.decision == "prune"]
    before = run.meta.new_params
    report = PruneReport(
        str(run.dir),
        None if dry_run else str(target),
        rule,
        units,
        sum(u.params for u in gone),
        before,
        before - sum(u.params for u in gone),
        dry_run,
    )
    new_recipe = pruned_recipe(run, units)
    if not new_recipe["inserts"]:
        raise PruneRefused(
            f"{run.dir}: the rule {rule} prunes every module; nothing would remain",
            hint="lower --threshold or raise --keep-top-k",
        )
    if dry_run or (not gone and target == run.dir):
        return report  # nothing to prune in place: the run stays as it is (training state included)
    pruned, want = _rebuilt(run, new_recipe)
    kept, moved = _split_tensors(run, units, want)
    pruned.meta.pruning = _history(run, rule, gone)
    report.params_after = pruned.meta.new_params
    _write(run, pruned, target, kept, moved, force, data, batch_size, report)
    return report


def _write(
    run: Run,
    new: Run,
    target: Path,
    adapter: dict,
    pruned: dict,
    force: bool,
    data: str | None,
    batch_size: int,
    report: PruneReport,
) -> None:
    """Write the new run (evaluating before and after on ``data``); the training state is dropped."""
    from pelt_cli.evaluate import evaluate_run

    if data is not None:
        report.evaluation = {"before": evaluate_run(run.dir, data, batch_size)}
    _rewrite(run, new, target, adapter, force, pruned)
    if data is not None:
        report.evaluation["after"] = evaluate_run(target, data, batch_size)


def _rewrite(run: Run, new: Run, target: Path, adapter: dict, force: bool, pruned: dict | None = None) -> None:
    """Write ``new`` (a prune or restore of ``run``) to ``target``: ``adapter`` as its tensors, ``pruned`` (if any) as
    its pruned weights, and the run's other files, less its training state; rewriting ``run`` in place needs no
    ``force``."""
    new.write(
        target,
        adapter,
        force=True if target == run.dir else force,
        copy_from=run.dir,
        skip=(PRUNED_FILE, STATE_DIR),
        tensor_files=None if pruned is None else {PRUNED_FILE: pruned},
        note=f"rewritten by pelt prune from {run.dir}",
    )


def restore_run(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False) -> PruneReport:
    """Bring back every module a prune removed (weights from ``pruned.safetensors``), bit for bit."""
    run = Run.open(run_dir)
    pruning = run.meta.pruning
    if not pruning:
        raise PruneRefused(f"{run.dir}: nothing to restore (the run was never pruned)")
    if not run.path(PRUNED_FILE).is_file():
        raise CheckpointError(
            f"{run.path(PRUNED_FILE)}: missing; the pruned weights are not in this run",
            hint="restore from the run that was pruned (bundles carry only the kept modules)",
        )
    target = _target(run.dir, out, force)
    restored, want = _rebuilt(run, pruning["original_recipe"])
    adapter = {**run.read_adapter(), **run.read_extra(PRUNED_FILE)}
    if {n: tuple(t.shape) for n, t in adapter.items()} != want:
        bad = sorted(set(want) ^ set(adapter))[:3]
        raise CheckpointError(f"{run.dir}: adapter + pruned tensors do not rebuild the original recipe (e.g. {bad})")
    restored.meta.pruning = None
    back = [
        Unit(-1, h["module"], h["site"], h["site"], h["block"], h["layer"], h["mean"], math.nan, h["params"], "restore")
        for entry in pruning["history"]
        for h in entry["pruned"]
    ]
    _rewrite(run, restored, target, adapter, force)
    return PruneReport(
        str(run.dir),
        str(target),
        {"restore": True},
        back,
        -sum(u.params for u in back),
        run.meta.new_params,
        restored.meta.new_params,
    )
