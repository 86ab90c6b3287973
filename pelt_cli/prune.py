"""``pelt prune``: remove the gated modules whose learned gate says they are idle, reversibly.

A *unit* is one gated module in one layer — UniPELT's ``lora``, ``prefix`` or ``adapter`` behind its gate — or a
domain adapter (its per-timestep gate). Its score is the mean gate on the eval set that ``pelt train`` recorded in
``gates.json``. Rules: ``threshold`` prunes every unit with mean < θ (the brief's AutoPELT rule, θ = 0.05);
``keep_top_k`` keeps the K highest, over all units or ``per`` method or per layer.

Pruning rewrites the run's recipe so that rebuilding the run gives the pruned model, and every other command
(``load_run``, train, merge, export) needs nothing special: a UniPELT entry is split by layer groups, and the
pruned modules of a group go into its ``params.pruned``. Their gate controllers keep all their outputs, so the
remaining modules see exactly the gates they saw before: the model's output changes only through the modules
removed. Their tensors move from ``adapter.safetensors`` to ``pruned.safetensors`` and the original recipe stays in
``run.json``, so :func:`restore_run` brings everything back bit for bit. The training state (``train/``: optimizer
moments of the removed parameters) is dropped; train the pruned run again without ``--resume``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli.apply import ADAPTER_FILE, RECIPE_FILE, RUN_FILE, atomic_dir, read_run
from pelt_cli.checkpoint import open_checkpoint, save_file
from pelt_cli.errors import CheckpointError, OutputExistsError, PeltError, UsageError

PRUNED_FILE = "pruned.safetensors"
GATES_FILE = "gates.json"
STATE_DIR = "train"
DEFAULT_THRESHOLD = 0.05
GATED = ("lora", "prefix", "adapter")


class PruneRefused(PeltError):
    """A run that cannot be pruned (no gate statistics, nothing gated) or a rule that would remove everything."""

    exit_code = 2


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
        d = asdict(self)
        for u in d["units"]:
            u.pop("tensors")
        return d


def _gate_groups(insertions: list[dict]) -> list[tuple[int, list[int]]]:
    """UniPELT insertions in run order: each ``unipelt.gate`` followed by the modules it gates."""
    groups: list[tuple[int, list[int]]] = []
    for i, ins in enumerate(insertions):
        if ins["method"] == "unipelt.gate":
            groups.append((i, []))
        elif ins["method"].startswith("unipelt.") and groups and insertions[groups[-1][0]]["entry"] == ins["entry"]:
            groups[-1][1].append(i)
    return groups


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) else math.nan


def units_of(meta: dict, doc: dict | None, run_dir: Path) -> list[Unit]:
    """Every gated unit of a run with its gate statistics (units pruned earlier included, marked ``pruned``)."""
    insertions = meta["insertions"]
    entries = meta["recipe"]["inserts"]
    has_gates = any(e["method"] in ("unipelt", "domain") for e in entries)
    if not has_gates:
        methods = sorted({e["method"] for e in entries})
        raise PruneRefused(f"{run_dir}: nothing gated to prune (methods: {', '.join(methods)})",
                           hint="pelt prune removes UniPELT modules and domain adapters by their learned gates")
    if doc is None:
        raise PruneRefused(f"{run_dir}: no gate statistics ({GATES_FILE}); prune decides by the learned gates",
                           hint=f"train the run first: pelt train {run_dir} --data FILE")
    out: list[Unit] = []
    layers = doc.get("layers", {})
    for g, members in _gate_groups(insertions):
        gate = insertions[g]
        stats = layers.get(gate["site"])
        if stats is None:
            raise PruneRefused(f"{run_dir}/{GATES_FILE}: no statistics for the gate at {gate['disk_site']}",
                               hint=f"train (or re-train) the run: pelt train {run_dir} --data FILE")
        params = meta["recipe"]["inserts"][gate["entry"]]["params"]
        for name in params["modules"]:
            s = stats.get(name, {})
            mine = [insertions[i] for i in members if insertions[i]["method"] == f"unipelt.{name}"]
            done = name in params.get("pruned", [])
            out.append(Unit(gate["entry"], name, gate["site"], gate["disk_site"], gate.get("block"), gate.get("layer"),
                            _num(s.get("mean")), _num(s.get("std")), sum(i["new_params"] for i in mine),
                            "pruned" if done else "keep", [m for i in mine for m in i["modules"]]))
    for e, entry in enumerate(entries):
        if entry["method"] != "domain":
            continue
        mine = [i for i in insertions if i["entry"] == e]
        s = (doc.get("domain") or {}).get("gate", {})
        first = mine[0] if mine else {"site": "?", "disk_site": "?"}
        out.append(Unit(e, "domain", first["site"], first["disk_site"], first.get("block"), first.get("layer"),
                        _num(s.get("mean")), _num(s.get("std")), sum(i["new_params"] for i in mine), "keep",
                        [m for i in mine for m in i["modules"]]))
    return out


def decide(units: list[Unit], threshold: float | None, keep_top_k: int | None, per: str | None) -> None:
    """Mark units ``prune`` by a threshold on the mean gate, or keep the top K (overall, per method or per layer)."""
    live = [u for u in units if u.decision != "pruned"]
    unknown = [u for u in live if math.isnan(u.mean)]
    if unknown:
        raise PruneRefused(f"no gate mean for {unknown[0].module} at {unknown[0].disk_site} (never evaluated)",
                           hint="train the run with an eval set so that pelt train records every gate")
    if keep_top_k is None:
        for u in live:
            u.decision = "prune" if u.mean < (DEFAULT_THRESHOLD if threshold is None else threshold) else "keep"
        return
    groups: dict[Any, list[Unit]] = {}
    for u in live:
        key = u.module if per == "method" else (u.block, u.layer, u.site) if per == "layer" else None
        groups.setdefault(key, []).append(u)
    for members in groups.values():
        ranked = sorted(members, key=lambda u: -u.mean)
        for i, u in enumerate(ranked):
            u.decision = "keep" if i < keep_top_k else "prune"


def pruned_recipe(recipe: dict, units: list[Unit]) -> dict:
    """The recipe that rebuilds the run without the units marked ``prune`` (see the module docstring)."""
    by_entry: dict[int, list[Unit]] = {}
    for u in units:
        by_entry.setdefault(u.entry, []).append(u)
    inserts = []
    for e, entry in enumerate(recipe["inserts"]):
        mine = by_entry.get(e, [])
        if not any(u.decision == "prune" for u in mine):
            inserts.append(entry)
            continue
        if entry["method"] == "domain":
            continue  # the whole domain adapter goes
        modules = entry["params"]["modules"]
        gates: dict[str, list[Unit]] = {}
        for u in mine:
            gates.setdefault(u.site, []).append(u)
        groups: dict[tuple, list[int]] = {}
        for us in gates.values():
            gone = {u.module for u in us if u.decision != "keep"}
            if gone >= set(modules):
                continue  # every module of this layer is pruned: its gate goes too
            if us[0].layer is None:
                raise PruneRefused(f"{us[0].disk_site}: not in a numbered layer, so it cannot be pruned on its own")
            key = (us[0].block, tuple(m for m in modules if m in gone))
            groups.setdefault(key, []).append(us[0].layer)
        for (block, gone), layer_ids in groups.items():
            new = copy.deepcopy(entry)
            new["layers"] = sorted(layer_ids)
            if block:
                new["blocks"] = [block]
            new["params"]["pruned"] = list(gone)
            inserts.append(new)
    return {**recipe, "inserts": inserts}


def _read_all(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    from pelt_cli.checkpoint import TensorReader

    ck = open_checkpoint(path)
    with TensorReader(ck) as r:
        return {n: r.read(n) for n in ck.tensors}


def _rebuild(meta: dict, recipe_doc: dict, where: str) -> tuple[Any, list[dict], dict[str, tuple]]:
    """Validate a recipe against the run's base (on ``meta``): the recipe, insertion rows and expected tensors."""
    import yaml

    from pelt_cli.merge import expected_state, meta_model
    from pelt_cli.recipe import loads

    recipe = loads(yaml.safe_dump(recipe_doc, sort_keys=False), where)
    base = open_checkpoint(meta["base"]["path"])
    model, _, rows = meta_model(base.directory, recipe, meta.get("head"))
    return recipe, [asdict(r) for r in rows], expected_state(model)


def _write_run(run_dir: Path, out: Path, meta: dict, recipe: Any, adapter: dict, pruned: dict, force: bool) -> None:
    """A copy of the run with a new recipe, adapter and pruned tensors; the training state is dropped."""
    from pelt_cli.recipe import dump

    with atomic_dir(out, force) as tmp:
        for p in run_dir.iterdir():
            if p.name in (ADAPTER_FILE, PRUNED_FILE, RUN_FILE, RECIPE_FILE, STATE_DIR) or p.name.startswith("."):
                continue
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        save_file(adapter, tmp / ADAPTER_FILE)
        if pruned:
            save_file(pruned, tmp / PRUNED_FILE)
        (tmp / RECIPE_FILE).write_text(f"# rewritten by pelt prune from {run_dir}\n" + dump(recipe), encoding="utf-8")
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _target(run_dir: Path, out: str | Path | None, force: bool) -> Path:
    if out is None:
        return run_dir
    target = Path(out)
    if target.resolve() == run_dir.resolve():
        return run_dir
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists", hint="choose another -o path or pass --force")
    return target


def prune_run(run_dir: str | Path, out: str | Path | None = None, *, threshold: float | None = None,
              keep_top_k: int | None = None, per: str | None = None, dry_run: bool = False,
              data: str | None = None, batch_size: int = 32, force: bool = False) -> PruneReport:
    """Prune a trained run in place (``out=None``) or into a new run directory.

    Args:
        run_dir: a run with gate statistics (``pelt train`` writes them).
        out: the pruned run (default: replace ``run_dir`` atomically).
        threshold: prune units whose mean gate is below θ (default 0.05 when ``keep_top_k`` is not given).
        keep_top_k: keep the K units with the highest mean gate instead (``per``: None, ``method`` or ``layer``).
        dry_run: decide and report, write nothing.
        data: evaluate before and after on this data (a file or a built-in dataset's eval split).

    Raises:
        PruneRefused: no gates, no statistics, or a rule that would leave no module at all.
    """
    run_dir = Path(run_dir)
    if threshold is not None and keep_top_k is not None:
        raise UsageError("--threshold and --keep-top-k exclude each other; pass one")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold}: expected a gate value in [0, 1]")
    if keep_top_k is not None and keep_top_k < 0:
        raise UsageError(f"--keep-top-k {keep_top_k}: expected 0 or more")
    if per not in (None, "method", "layer"):
        raise UsageError(f"--per {per!r}: expected method or layer")
    if per is not None and keep_top_k is None:
        raise UsageError("--per applies to --keep-top-k only")
    meta = read_run(run_dir)
    doc = json.loads((run_dir / GATES_FILE).read_text(encoding="utf-8")) if (run_dir / GATES_FILE).is_file() else None
    units = units_of(meta, doc, run_dir)
    decide(units, threshold, keep_top_k, per)
    rule = ({"keep_top_k": keep_top_k, "per": per or "all"} if keep_top_k is not None
            else {"threshold": DEFAULT_THRESHOLD if threshold is None else threshold})
    new_units = [u for u in units if u.decision == "prune"]
    before = int(meta["new_params"])
    gone = sum(u.params for u in new_units)
    report = PruneReport(str(run_dir), None if dry_run else str(_target(run_dir, out, force)), rule, units, gone,
                         before, before - gone, dry_run)
    if not pruned_recipe(meta["recipe"], units)["inserts"]:
        raise PruneRefused(f"{run_dir}: the rule {rule} prunes every module; nothing would remain",
                           hint="lower --threshold or raise --keep-top-k")
    if dry_run:
        return report
    target = _target(run_dir, out, force)
    if not new_units and target == run_dir:
        return report  # nothing to prune: the run stays as it is (training state included)
    doc_recipe = pruned_recipe(meta["recipe"], units)
    recipe, rows, want = _rebuild(meta, doc_recipe, str(run_dir / RUN_FILE))
    adapter = _read_all(run_dir / ADAPTER_FILE)
    moved = {n: t for n, t in adapter.items() if n not in want}
    kept = {n: t for n, t in adapter.items() if n in want}
    claimed = {t for u in new_units for t in u.tensors}
    for ins in meta["insertions"]:  # a gate whose modules are all pruned goes with them
        if ins["method"] == "unipelt.gate" and all(u.decision != "keep" for u in units if u.site == ins["site"]):
            claimed.update(ins["modules"])
    stray = [n for n in moved if not any(n.startswith(m + ".") for m in claimed)]
    if stray or {n: tuple(t.shape) for n, t in kept.items()} != want:
        raise PeltError(f"internal: pruning {run_dir} would move tensors of kept modules ({stray[:3]}) or miss some")
    new_meta = {**meta, "recipe": recipe.to_dict(), "insertions": rows,
                "new_params": sum(r["new_params"] for r in rows)}
    history = list(meta.get("pruning", {}).get("history", []))
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rule": rule,
                    "pruned": [{"module": u.module, "site": u.disk_site, "layer": u.layer, "block": u.block,
                                "mean": u.mean, "params": u.params} for u in new_units]})
    new_meta["pruning"] = {"original_recipe": meta.get("pruning", {}).get("original_recipe", meta["recipe"]),
                           "original_new_params": meta.get("pruning", {}).get("original_new_params", before),
                           "history": history}
    report.params_after = new_meta["new_params"]
    pruned = {**_read_all(run_dir / PRUNED_FILE), **moved}
    if data is not None:
        report.evaluation = {"before": evaluate_run(run_dir, data, batch_size)}
    _write_run(run_dir, target, new_meta, recipe, kept, pruned, force=True if target == run_dir else force)
    if data is not None:
        report.evaluation["after"] = evaluate_run(target, data, batch_size)
    return report


def restore_run(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False) -> PruneReport:
    """Bring back every module a prune removed (weights from ``pruned.safetensors``), bit for bit."""
    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    pruning = meta.get("pruning")
    if not pruning:
        raise PruneRefused(f"{run_dir}: nothing to restore (the run was never pruned)")
    if not (run_dir / PRUNED_FILE).is_file():
        raise CheckpointError(f"{run_dir}/{PRUNED_FILE}: missing; the pruned weights are not in this run",
                              hint="restore from the run that was pruned (bundles carry only the kept modules)")
    target = _target(run_dir, out, force)
    recipe, rows, want = _rebuild(meta, pruning["original_recipe"], str(run_dir / RUN_FILE))
    adapter = {**_read_all(run_dir / ADAPTER_FILE), **_read_all(run_dir / PRUNED_FILE)}
    if {n: tuple(t.shape) for n, t in adapter.items()} != want:
        bad = sorted(set(want) ^ set(adapter))[:3]
        raise CheckpointError(f"{run_dir}: adapter + pruned tensors do not rebuild the original recipe (e.g. {bad})")
    new_meta = {k: v for k, v in meta.items() if k != "pruning"}
    new_meta.update({"recipe": recipe.to_dict(), "insertions": rows,
                     "new_params": sum(r["new_params"] for r in rows)})
    back = [Unit(-1, h["module"], h["site"], h["site"], h["block"], h["layer"], h["mean"], math.nan, h["params"],
                 "restore") for entry in pruning["history"] for h in entry["pruned"]]
    _write_run(run_dir, target, new_meta, recipe, adapter, {}, force=True if target == run_dir else force)
    return PruneReport(str(run_dir), str(target), {"restore": True}, back, -sum(u.params for u in back),
                       int(meta["new_params"]), new_meta["new_params"])


def evaluate_run(run_dir: str | Path, data: str, batch_size: int = 32) -> dict[str, Any]:
    """The run's eval metrics on ``data`` (a file, or a built-in dataset's eval split) and the eval wall time."""
    return measure_run(run_dir, data, batch_size)[0]


def measure_run(run_dir: str | Path, data: str, batch_size: int = 32) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, gate statistics)`` of a run on ``data``; the statistics in ``gates.json`` layout."""
    import torch

    from pelt_cli import heads
    from pelt_cli.apply import load_run
    from pelt_cli.data import Batcher, load_data, resolve_data
    from pelt_cli.train import TrainConfig, _data_inputs, evaluate

    model, meta = load_run(run_dir)
    head = meta.get("head") or {}
    task = head.get("task") or (meta.get("training") or {}).get("task")
    path, builtin_eval = resolve_data(data)
    td = load_data(builtin_eval or path, task=task, labels=head.get("labels"))
    if td.task in heads.CLASSIFICATION and not head:
        raise UsageError(f"{run_dir}: no trained task head to evaluate {td.task} with",
                         hint="pelt train the run first")
    cfg = TrainConfig(batch_size=batch_size)
    tok, fe = _data_inputs(meta, td.task, None)
    batcher = Batcher(td, tokenizer=tok, feature_extractor=fe, max_length=cfg.max_length)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    metrics, snap = evaluate(model, batcher, cfg, td.task, torch.device("cpu"), head.get("labels"))
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    metrics["rows"] = len(td.rows)
    return metrics, snap
