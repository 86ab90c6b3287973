"""``pelt merge``: fold a run's modules into its base checkpoint, one tensor at a time.

The output is an ordinary Hugging Face checkpoint directory (plain ``from_pretrained`` loads it, no pelt import):

* planned from the base's headers: the same tensor names and shapes, the base dtype unless ``dtype`` is given, the
  base's shard layout (file names, tensor → shard assignment, index) unless ``max_shard_size`` re-shards;
* streamed: each base tensor is read through the header index, folded in fp32 if a module acts on it, cast back,
  written through :class:`~pelt_cli.io.writer.ShardedWriter` and freed; untouched tensors are copied as raw bytes.
  Peak memory is one tensor plus the (small) adapter;
* atomic: written into ``.OUT.pelt-tmp-PID`` and renamed when complete; temporary directories left by killed
  merges (dead PIDs) are removed by the next merge to the same path;
* light where it can be: a run of plain LoRA branches on ``Linear`` projections is planned from ``run.json`` and the
  headers and folded in numpy (:mod:`pelt_cli.merge_fast`, :mod:`pelt_cli.fold`): no torch, no transformers, no
  ``meta`` model, the same bytes (bit-identical to peft's ``merge_and_unload``).

Exact folds: LoRA, IA³ (output and input scales). UniPELT's gated LoRA only with ``freeze_gates="mean"`` (the gate
fixed at its mean from ``gates.json``: approximate). Prefix, adapter, domain modules and task heads cannot be folded;
with ``keep_unmerged`` they go to a run in ``OUT/pelt-rest/`` whose base is OUT (one rename commits both).
A module on a tied weight (``lm_head`` tied to the embeddings) unties it: the folded copy is written as its own
tensor and ``tie_word_embeddings: false`` goes into config.json.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli import methods
from pelt_cli.errors import CheckpointError, MergeRefused, PeltError, UsageError
from pelt_cli.io.atomic import claim, clean_stale_temps, guard_output
from pelt_cli.io.checkpoint import Checkpoint
from pelt_cli.io.fingerprint import fingerprint, structure_fingerprint, tensor_digest
from pelt_cli.io.header import INDEX_NAME, TensorInfo, TensorSpec
from pelt_cli.io.reader import prefetch
from pelt_cli.io.writer import ShardedWriter
from pelt_cli.merge_fast import light_merge
from pelt_cli.methods import FoldOp
from pelt_cli.recipe import Recipe
from pelt_cli.run import (
    GATES_FILE,
    RUN_FILE,
    Base,
    BaseRef,
    PlanRow,
    Run,
    RunMeta,
    check_state,
    expected_state,
    inserted_model,
)
from pelt_cli.stream import OutputPlan, layout, side_files, stream_tensors

REST_DIR = "pelt-rest"
DTYPE_CODES = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "fp64": "F64",
}
HEAD_REF = {"method": "head", "site": "pelt_head", "disk_site": "pelt_head"}
CONFIG_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass
class MergeReport:
    """What a merge wrote."""

    out: str
    tensors_written: int = 0
    tensors_folded: int = 0
    bytes_written: int = 0
    shards: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int | None = None
    folded: list[dict] = field(default_factory=list)
    unmerged: list[dict] = field(default_factory=list)
    approximate: bool = False
    untied: list[str] = field(default_factory=list)
    rest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        return asdict(self)


@dataclass
class MergePlan:
    """Which insertion rows fold (with the frozen gate mean of gated ones) and which stay unmerged."""

    fold: list[int]
    rest: list[int]
    means: dict[int, float]
    head: dict[str, Any] | None
    gate_rows: dict[int, set[int]]


# ---------------------------------------------------------------------------------------------------- planning


def _dtype_code(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_CODES:
        raise UsageError(f"dtype {dtype!r}: expected one of float32, float16, bfloat16, float64")
    return DTYPE_CODES[name]


def _ref(row: PlanRow) -> dict:
    return {"method": row.method, "site": row.site, "disk_site": row.disk_site}


def _gates(run: Run) -> tuple[dict[int, Any], dict[int, set[int]]]:
    """Gated row → its unit; and each gate-only row (a UniPELT controller) → the rows it gates."""
    unit_of, gate_rows = {}, {}
    units = run.gate_units()
    members = {i for u in units for i in u.members}
    for u in units:
        unit_of.update({i: u for i in u.members if i != u.row})
        if u.row not in members:
            gate_rows.setdefault(u.row, set()).update(u.members)
    return unit_of, gate_rows


def _classify(
    run: Run, unit_of: dict[int, Any], gate_rows: dict[int, set[int]], freeze_gates: str | None, keep: bool
) -> tuple[list[int], list[int]]:
    """Rows to fold and rows to keep unmerged, by each method's ``foldable`` hook."""
    fold, rest, gated = [], [], []
    for i, row in enumerate(run.insertions):
        if i in gate_rows:
            continue
        fn = methods.hook(methods.of_row(row.method), "foldable")
        kind = fn(row) if fn is not None else None
        if kind == "exact" or (kind == "gated" and freeze_gates == "mean" and i in unit_of):
            fold.append(i)
        elif kind == "gated" and not keep:
            gated.append(row)
        else:
            rest.append(i)
    if gated:
        raise MergeRefused(
            f"{len(gated)} gated module(s) (e.g. {gated[0].method} at {gated[0].disk_site}) are scaled by a gate "
            "computed from each input (G = mean σ(W h)); no fixed weight reproduces that, so they cannot be folded "
            "exactly",
            hint="pass --freeze-gates mean (freeze_gates='mean') to fold with each gate fixed at its mean from "
            "gates.json (approximate), or --keep-unmerged to keep them as a run on top of the merged base",
            modules=[_ref(g) for g in gated],
        )
    done = set(fold)
    rest += [g for g, members in gate_rows.items() if not members or not members <= done]
    return fold, sorted(rest)


def _refuse_rest(rows: list[PlanRow], rest: list[int], head: bool) -> None:
    mods = [_ref(rows[i]) for i in rest] + ([HEAD_REF] if head else [])
    by: dict[str, list[str]] = {}
    for m in mods:
        by.setdefault(m["method"], []).append(m["disk_site"])
    parts = [f"{k} ×{len(v)} ({', '.join(v[:3])}{', …' if len(v) > 3 else ''})" for k, v in by.items()]
    raise MergeRefused(
        f"{len(mods)} module(s) cannot be folded into the weights: {'; '.join(parts)}",
        hint=f"pass --keep-unmerged to also write them as a run on top of the merged model (OUT/{REST_DIR})",
        modules=mods,
    )


def _check_order(rows: list[PlanRow], plan: MergePlan) -> None:
    """An unmerged module hooked on a layer *before* a folded one would see the un-folded output: refuse."""
    for i in plan.fold:
        for j in plan.rest:
            if j < i and rows[j].site == rows[i].site and j not in plan.gate_rows:
                raise MergeRefused(
                    f"{rows[j].method} at {rows[j].disk_site} runs before {rows[i].method} on the "
                    "same layer; folding the latter would change what the former sees",
                    hint="put the foldable module first in the recipe",
                )


def _gate_means(run: Run, fold: list[int], unit_of: dict[int, Any], doc: dict | None) -> dict[int, float]:
    """The frozen gate (its mean in ``gates.json``) of each gated row that folds."""
    gated = [i for i in fold if i in unit_of]
    if not gated:
        return {}
    doc = run.gates() or {} if doc is None else doc
    means = {}
    for i in gated:
        node: Any = doc
        for key in unit_of[i].stats:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        mean = node.get("mean") if isinstance(node, dict) else None
        if not isinstance(mean, (int, float)) or mean != mean:
            raise MergeRefused(
                f"{run.path(GATES_FILE)}: no mean gate for {run.insertions[i].disk_site} "
                f"({'/'.join(unit_of[i].stats)}); freeze_gates='mean' needs the gate statistics that "
                "pelt train records",
                hint="train (or evaluate) the run first",
            )
        means[i] = float(mean)
    return means


def plan_merge(run: Run, freeze_gates: str | None, keep: bool, gate_stats: dict | None) -> MergePlan:
    """Decide what folds and what stays unmerged, before any tensor is read.

    Raises:
        MergeRefused: gated modules without ``freeze_gates``, unfoldable modules without ``keep``, a bad order, or
            missing gate statistics.
    """
    if freeze_gates not in (None, "mean"):
        raise UsageError(f"freeze_gates {freeze_gates!r}: expected 'mean'")
    unit_of, gate_rows = _gates(run)
    fold, rest = _classify(run, unit_of, gate_rows, freeze_gates, keep)
    head = run.head if run.has_head_weights() else None
    if (rest or _own_head(head)) and not keep:
        _refuse_rest(run.insertions, rest, bool(_own_head(head)))
    plan = MergePlan(fold, rest, {}, head, gate_rows)
    _check_order(run.insertions, plan)
    plan.means = _gate_means(run, fold, unit_of, gate_stats)
    return plan


def _own_head(head: dict | None) -> dict | None:
    """pelt's own head (it stays unmerged); None for none or a transformers task head (it merges)."""
    from pelt_cli.heads import is_task_head

    return None if head is None or is_task_head(head) else head


def _plan_ops(model: Any, run: Run, plan: MergePlan, adapter: dict) -> tuple[dict[str, list[FoldOp]], list[dict]]:
    """Memory tensor name → folds, in hook order; and the report's folded list."""
    ops: dict[str, list[FoldOp]] = {}
    folded = []
    for i in plan.fold:
        row = run.insertions[i]
        mine = methods.of_row(row.method).fold(model, row, adapter, plan.means.get(i))
        for name, lst in mine.items():
            ops.setdefault(name, []).extend(lst)
        entry = {**_ref(row), "tensors": sorted(mine)}
        if i in plan.means:
            entry["gate"] = plan.means[i]
        folded.append(entry)
    return ops, folded


def _untie_config(config: dict) -> dict:
    new = copy.deepcopy(config)
    new["tie_word_embeddings"] = False
    for key, value in new.items():
        if isinstance(value, dict) and ("tie_word_embeddings" in value or key == "text_config"):
            value["tie_word_embeddings"] = False
    return new


def _ties(km: Any, ops: dict, config: dict) -> tuple[dict, dict[str, str], dict[str, str], list[str]]:
    """Untie what a fold touches. Returns (config, target memory → disk name, target → source disk, untied)."""
    from pelt_cli.keymap import key_map, skeleton

    need = sorted(t for t, s in km.tied.items() if t in ops or s in ops)
    if not need:
        return config, {}, {}, []
    new = _untie_config(config)
    with tempfile.TemporaryDirectory(prefix="pelt-untie-") as d:
        (Path(d) / "config.json").write_text(json.dumps(new), encoding="utf-8")
        km2 = key_map(skeleton(d))
    still = [t for t in need if t in km2.tied]
    if still:
        raise MergeRefused(
            f"cannot untie {', '.join(still)}: the model class ties it whatever "
            "tie_word_embeddings says, so a module on it cannot be folded"
        )
    lost = [t for t in km.tied if t not in km2.tied]
    names = {t: km2.to_disk[t] for t in lost}
    return new, names, {t: km.disk_name(km.tied[t]) for t in lost}, sorted(names.values())


def _disk_ops(km: Any, ops: dict, tie_names: dict) -> dict[str, list[FoldOp]]:
    out = {}
    for mem, lst in ops.items():
        if mem in tie_names:
            out[tie_names[mem]] = lst
        elif mem in km.to_disk:
            out[km.to_disk[mem]] = lst
        elif mem in km.converted:
            raise MergeRefused(
                f"{mem}: transformers fuses or splits this weight on load, so it has no single "
                "tensor on disk to fold into"
            )
        else:
            raise CheckpointError(f"{mem}: no on-disk tensor for this weight")
    return out


# ---------------------------------------------------------------------------------------------------- the merge


def _check_paths(run: Run, out: Path, base: str | Path | None, force: bool) -> None:
    """Not ``-``, not an input, not inside or around one, not existing without ``force``; locked until the commit."""
    guard_output(out, force, [run.dir, base or run.meta.base.path])
    claim(out)


def _open_base(run: Run, base: str | Path | None, check: bool) -> tuple[Base, bool]:
    """The run's base, checked now when that is cheap; True when it must be hashed while it streams."""
    b = run.base(base, check=False)
    if not check:
        return b, False
    b.check(run.meta.base, content=False)  # other tensor names, dtypes or shapes: refused before any read
    if b.cached_fingerprint() is None:
        return b, True
    b.check(run.meta.base)
    return b, False


def _plan_output(b: Base, km: Any, ops: dict, out_dtype: str | None, max_shard_size: int | None) -> OutputPlan:
    config, tie_names, tie_src, untied = _ties(km, ops, b.config)
    if out_dtype:
        config = {**config, "dtype": CONFIG_DTYPE[out_dtype]}
        if "torch_dtype" in config:
            config["torch_dtype"] = CONFIG_DTYPE[out_dtype]
    disk_ops = _disk_ops(km, ops, tie_names)
    extra = {tie_names[t]: tie_src[t] for t in tie_names}
    shards, names, source = layout(b.ckpt, extra, out_dtype, max_shard_size)
    missing = sorted(n for n in disk_ops if n not in source)
    if missing:
        raise CheckpointError(f"{b.root}: tensor(s) {missing[:3]} to fold into are not in the checkpoint")
    return OutputPlan(config, shards, names, source, disk_ops, untied)


def merge_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: Any = None,
    max_shard_size: int | None = None,
    freeze_gates: str | None = None,
    keep_unmerged: bool = False,
    force: bool = False,
    base: str | os.PathLike[str] | None = None,
    check_fingerprint: bool = True,
    gate_stats: dict | None = None,
) -> MergeReport:
    """Fold a run's modules into its base and write a plain Hugging Face checkpoint directory, streaming.

    Args:
        run_dir: the run directory (``run.json`` + ``adapter.safetensors``).
        out_dir: the merged checkpoint directory to create.
        dtype: output dtype of floating tensors (``bfloat16``, ``float16``, ``float32``); default: the base's.
        max_shard_size: re-shard to at most this many bytes per file; default: keep the base's shard layout.
        freeze_gates: ``"mean"`` folds gated modules (UniPELT's LoRA) with each gate at its mean (approximate).
        keep_unmerged: write what cannot be folded as a run in ``out_dir/pelt-rest`` on top of the merged model.
        force: replace an existing ``out_dir``.
        base: another location of the run's base (default: the path recorded in ``run.json``).
        check_fingerprint: refuse a base whose content differs from the one the run was made on.
        gate_stats: gate statistics to take the means from (``gates.json`` layout, e.g. measured on other data);
            default: the run's ``gates.json``.

    Returns:
        What was written.

    Raises:
        MergeRefused: modules that cannot be folded (without ``keep_unmerged``), gated modules without
            ``freeze_gates``, or a tie that cannot be undone.
        CheckpointError: a wrong base, or a run that does not match its recipe.
    """
    t0 = time.monotonic()
    out, out_dtype = Path(out_dir), _dtype_code(dtype)
    light = light_merge(run_dir, base, out_dtype, max_shard_size) if freeze_gates in (None, "mean") else None
    run = light.run if light else Run.open(run_dir)  # light: plain LoRA, planned with no model and no torch
    _check_paths(run, out, base, force)
    if light:
        plan = MergePlan(list(range(len(run.insertions))), [], {}, None, {})
    else:
        plan = plan_merge(run, freeze_gates, keep_unmerged, gate_stats)
    clean_stale_temps(out)
    b, hash_inline = _open_base(run, base, check_fingerprint)
    prefetch(b.ckpt)  # a cold base starts loading while the plan is made
    o, folded, rest, own = (
        (light.output(), light.folded, None, None) if light else _model_output(run, b, plan, out_dtype, max_shard_size)
    )
    unmerged = [_ref(run.insertions[i]) for i in plan.rest] + ([HEAD_REF] if own else [])
    report = MergeReport(
        str(out), folded=folded, approximate=bool(plan.means), untied=o.untied, shards=len(o.shards), unmerged=unmerged
    )
    _write(run, b, o, out, force, report, hash_inline, rest, max_shard_size)
    report.rest = str(out / REST_DIR) if rest is not None else None
    report.seconds = round(time.monotonic() - t0, 3)
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def _model_output(
    run: Run, b: Base, plan: MergePlan, out_dtype: str | None, max_shard_size: int | None
) -> tuple[OutputPlan, list[dict], dict | None, dict | None]:
    """The full path's plan, on the model's ``meta`` skeleton: output plan, folded list, unmerged rest, own head."""
    from pelt_cli.surgery import run_root

    model, rows = run.skeleton(b, head=plan.head)
    run.check_rows(rows, b)
    adapter = run.read_adapter(model)
    ops, folded = _plan_ops(run_root(model), run, plan, adapter)
    o = _output(b, plan, ops, adapter, out_dtype, max_shard_size)
    own = _own_head(plan.head)
    rest = _plan_rest(run, o.config, plan, adapter) if (plan.rest or own) else None
    return o, folded, rest, own


def _output(
    b: Base, plan: MergePlan, ops: dict, adapter: dict, out_dtype: str | None, max_shard_size: int | None
) -> OutputPlan:
    """The output's plan: the base's own checkpoint, or with a transformers task head the task model's."""
    if plan.head and not _own_head(plan.head):
        from pelt_cli.merge_head import task_output

        return task_output(b, plan.head, _disk_ops(b.key_map(), ops, {}), adapter, out_dtype, max_shard_size)
    return _plan_output(b, b.key_map(), ops, out_dtype, max_shard_size)


def _write(
    run: Run,
    b: Base,
    o: OutputPlan,
    out: Path,
    force: bool,
    report: MergeReport,
    hash_inline: bool,
    rest: dict | None,
    max_shard_size: int | None,
) -> None:
    """Stream every tensor into the output, check the base's content if it was not known, commit atomically.

    A fingerprint cached for these exact files (pelt apply computed it) was checked before; otherwise each tensor is
    hashed as it streams by and the result is checked before the commit.
    """
    ckpt, specs = b.ckpt, o.specs
    src_digests: dict[str, str] = {}
    digests: dict[str, str] = {}
    streamed = o.streamed
    need = {
        o.source[s.name] for s in streamed if o.disk_ops.get(s.name) or s.dtype != ckpt.tensors[o.source[s.name]].dtype
    }
    writer = ShardedWriter(out, specs, None, metadata=ckpt.metadata, overwrite=force, layout=(o.shards, o.names))
    with writer as w:
        stream_tensors(
            ckpt,
            streamed,
            o.source,
            o.disk_ops,
            need,
            w,
            report,
            src_digests if hash_inline else None,
            digests if rest is not None else None,
        )
        _write_added(w, o, report, digests if rest is not None else None)
        if hash_inline:
            _check_streamed(ckpt, run.meta.base, src_digests, b.root)
        for p in _side_files(run, ckpt.directory):
            w.copy_file(p)
        if o.config == ckpt.config:
            w.copy_file(ckpt.directory / "config.json")
        else:  # untied or re-typed
            w.write_text("config.json", json.dumps(o.config, indent=2, sort_keys=True) + "\n")
        if ckpt.sharded and len(o.shards) == 1 and not max_shard_size:  # the base had an index: keep one
            weight_map = {s.name: o.names[0] for s in specs}
            index = {"metadata": {"total_size": report.bytes_written}, "weight_map": weight_map}
            w.write_text(INDEX_NAME, json.dumps(index, indent=2) + "\n")
        if rest is not None:
            _write_rest(w.tmp_dir / REST_DIR, out, run, rest, specs, digests)


def _write_added(w: ShardedWriter, o: OutputPlan, report: MergeReport, digests: dict[str, str] | None) -> None:
    """Write the output tensors that come from the run, not the base (a task head), in their planned dtype."""
    import hashlib

    from pelt_cli.io.header import torch_dtype
    from pelt_cli.io.writer import tensor_bytes

    specs = {s.name: s for s in o.specs}
    for name, t in o.added.items():
        data = tensor_bytes(t.to(torch_dtype(specs[name].dtype)).contiguous())
        w.write_bytes(name, data)
        if digests is not None:
            digests[name] = hashlib.blake2b(data, digest_size=16).hexdigest()
        report.tensors_written += 1
        report.bytes_written += specs[name].nbytes


def _side_files(run: Run, base_dir: Path) -> list[Path]:
    """The base's side files (tokenizer, processor, generation config), and the tokenizer the run was trained with
    where it came from elsewhere (``pelt train --tokenizer``): its files win."""
    files = {p.name: p for p in side_files(base_dir)}
    tok = run.meta.extra.get("tokenizer")
    if tok and Path(tok).is_dir() and Path(tok).resolve() != base_dir.resolve():
        files.update({p.name: p for p in side_files(Path(tok))})
    return [files[n] for n in sorted(files)]


def _check_streamed(ckpt: Checkpoint, want: BaseRef, src_digests: dict[str, str], where: Path) -> None:
    got = fingerprint(
        ckpt, {**{n: tensor_digest(i) for n, i in ckpt.tensors.items() if n not in src_digests}, **src_digests}
    )
    if got != want.fingerprint:
        raise CheckpointError(
            f"{where}: not the base this run was made on (its fingerprint {got} differs "
            f"from {want.fingerprint}); nothing was written",
            hint="pass the right base (--base), or override the check if you are sure",
        )


def _rest_recipe(run: Run, plan: MergePlan) -> tuple[Recipe, list[Any]]:
    """The recipe of what stays unmerged, and the methods' tensor cuts for partly folded entries."""
    rows, keep, rdict = run.insertions, set(plan.rest), run.recipe.to_dict()
    entries, cuts = [], []
    for e in run.recipe.inserts:
        idx = [i for i, r in enumerate(rows) if r.entry == e.index]
        kept = [i for i in idx if i in keep]
        if not kept:
            continue
        entry = rdict["inserts"][e.index]
        if len(kept) < len(idx):
            fn = methods.hook(methods.get(e.method), "unfolded_entry")
            if fn is None:
                raise PeltError(f"internal: entry {e.index} ({e.method}) is only partly folded")
            entry, cut = fn(entry, {rows[i].method.split(".", 1)[-1] for i in idx if i not in keep})
            cuts.append(cut)
        entries.append(entry)
    if not entries:
        raise MergeRefused(
            "only the task head (pelt_head) is left unmerged, and a run needs at least one inserted module",
            hint="export the run instead (pelt export)",
        )
    return Recipe.from_dict({**rdict, "inserts": entries}, "<unmerged rest>"), cuts


def _plan_rest(run: Run, config: dict, plan: MergePlan, adapter: dict) -> dict[str, Any]:
    """The run of what stays unmerged: a reduced recipe, its insertions and tensors (checked on a skeleton)."""
    from pelt_cli.keymap import skeleton
    from pelt_cli.surgery import freeze_base

    recipe, cuts = _rest_recipe(run, plan)
    with tempfile.TemporaryDirectory(prefix="pelt-rest-") as d:
        (Path(d) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        model = skeleton(d)
    own = _own_head(plan.head)
    rows = inserted_model(model, recipe, own)
    root = "" if own or not plan.head else plan.head.get("root") or ""  # the output is the task model
    prefix = root + "." if root else ""
    if [r.key for r in rows] != [(prefix + run.insertions[i].site, run.insertions[i].method) for i in plan.rest]:
        raise PeltError("internal: the reduced recipe does not insert exactly the unmerged modules")
    tensors = {}
    for name in expected_state(model):
        t = adapter[name.removeprefix(prefix)]
        for cut in cuts:
            t = cut(name, t)
        tensors[name] = t
    check_state(tensors, model, "<unmerged rest>")
    trainable, _ = freeze_base(model)
    return {
        "recipe": recipe,
        "rows": rows,
        "tensors": tensors,
        "new_params": trainable,
        "head": own,
        "prefix": prefix,
        "model_class": type(model).__name__,
        "folded": [run.insertions[i] for i in plan.fold],
    }


def _write_rest(d: Path, out: Path, run: Run, rest: dict, specs: list[TensorSpec], digests: dict[str, str]) -> None:
    """The unmerged rest as a run whose base is the merged output (its fingerprint from the streamed digests)."""
    ck = Checkpoint(
        root=out, files=[], tensors={s.name: TensorInfo(s.name, s.dtype, s.shape, Path(), 0, s.nbytes) for s in specs}
    )
    ref = BaseRef(
        str(out.resolve()),
        fingerprint(ck, digests),
        structure_fingerprint(ck),
        run.meta.base.family,
        rest["model_class"],
        ck.total_params,
    )
    meta = RunMeta(
        base=ref,
        recipe=rest["recipe"].to_dict(),
        insertions=rest["rows"],
        new_params=rest["new_params"],
        head=rest["head"],
        extra={"merged_from": str(run.dir.resolve())},
    )
    doc = run.gates()
    files = {}
    if doc is not None:
        files[GATES_FILE] = json.dumps(_rest_gates(doc, run, rest["folded"], rest["prefix"]), indent=2) + "\n"
    Run(None, meta, rest["recipe"]).write(d, rest["tensors"], note=f"unmerged rest of {run.dir}", files=files)


def _rest_gates(doc: dict, run: Run, folded: list[PlanRow], prefix: str) -> dict:
    """gates.json without the statistics of the units that were folded (and without emptied layers), in every
    section that has them by site (the statistics, ``history``, ``histograms``, ``best``, and AutoPELT's
    ``contribution`` with its history, best epoch and ``off`` lists); sites under ``prefix`` when the rest run's base
    is a task model built around the run's. Contributions keep their recorded values (relative to the strongest unit
    of the run as trained)."""
    doc = json.loads(json.dumps(doc))
    gone = {u.stats for u in run.gate_units() if u.members and all(run.insertions[i] in folded for i in u.members)}
    sites = {p[1:] for p in gone if p[0] == "layers" and len(p) == 3}  # (site, module) of the folded UniPELT units
    domain = ("domain", "gate") in gone

    def trim(by_site: Any) -> Any:  # {site: {module: x}} (a "domain" entry as it is, unless folded)
        if not isinstance(by_site, dict):
            return by_site
        out = {}
        for site, mods in by_site.items():
            if site == "domain":
                if not domain:
                    out[site] = mods
                continue
            kept = {m: v for m, v in mods.items() if (site, m) not in sites} if isinstance(mods, dict) else mods
            if kept:
                out[prefix + site] = kept
        return out

    def labels(xs: Any) -> Any:  # AutoPELT's unit labels, SITE/MODULE or domain
        if not isinstance(xs, list):
            return xs
        split = [(x.rpartition("/")[0], x.rpartition("/")[2]) for x in xs]
        keep = [(s, m) for s, m in split if ((s, m) not in sites if s else not domain)]
        return [f"{prefix}{s}/{m}" if s else m for s, m in keep]

    def section(d: Any) -> None:  # a document with layers / domain, history, histograms, best, off
        if not isinstance(d, dict):
            return
        if "layers" in d:
            d["layers"] = trim(d["layers"])
        if domain:
            d.pop("domain", None)
        for key in ("history", "histograms"):
            if isinstance(d.get(key), dict):
                d[key] = {e: trim(v) for e, v in d[key].items()}
        if isinstance(d.get("best"), dict):
            section(d["best"])
        if "off" in d:
            d["off"] = labels(d["off"])

    section(doc)
    section(doc.get("contribution"))
    return doc


# ---------------------------------------------------------------------------------------------------- verify


def sample_inputs_for(config: Any, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, Any]:
    """Simple model inputs built from a transformers config: token ids, Whisper features or ViT pixels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)

    def ids() -> Any:
        avoid = {
            v
            for k, v in vars(config).items()
            if isinstance(v, int)
            and k.endswith(("_token_index", "_token_id"))
            and k not in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
        }
        x = torch.randint(0, int(vocab), (batch, seq), generator=g)
        for a in avoid:
            x[x == a] = (a + 1) % int(vocab) if (a + 1) % int(vocab) not in avoid else 0
        return x

    if getattr(config, "num_mel_bins", None) and getattr(config, "is_encoder_decoder", False):
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        return {
            "input_features": torch.randn(batch, config.num_mel_bins, frames, generator=g),
            "decoder_input_ids": ids(),
        }
    if vocab is None and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=g)}
    x = ids()
    out = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if getattr(config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = x
    return out


def _main_output(out: Any) -> Any:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise PeltError(f"{type(out).__name__} has neither logits nor last_hidden_state to compare")


def verify_merge(
    run_dir: str | os.PathLike[str], merged_dir: str | os.PathLike[str], samples: int | dict[str, Any] = 2
) -> float:
    """Max |Δ| between the run (base + modules) and the merged checkpoint (plus its rest run, if any).

    Args:
        run_dir: the run that was merged.
        merged_dir: the merge's output.
        samples: a batch size for :func:`sample_inputs_for`, or ready model inputs.
    """
    import torch

    from pelt_cli.run import load_base, load_run

    ref, _ = load_run(run_dir)
    merged_dir = Path(merged_dir)
    if (merged_dir / REST_DIR / RUN_FILE).is_file():
        model, _ = load_run(merged_dir / REST_DIR)
    else:
        model = load_base(merged_dir)
    inputs = samples if isinstance(samples, dict) else sample_inputs_for(ref.config, batch=int(samples))
    ref.eval()
    model.eval()
    with torch.no_grad():
        a, b = _main_output(ref(**inputs)), _main_output(model(**inputs))
    return (a.float() - b.float()).abs().max().item()
