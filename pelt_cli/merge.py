"""``pelt merge``: fold a run's modules into its base checkpoint, one tensor at a time.

The output is an ordinary Hugging Face checkpoint directory (plain ``from_pretrained`` loads it, no pelt import):

* planned from the base's headers: the same tensor names and shapes, the base dtype unless ``dtype`` is given, the
  base's shard layout (file names, tensor → shard assignment, index) unless ``max_shard_size`` re-shards;
* streamed: each base tensor is read through the header index, folded in fp32 if a module acts on it, cast back,
  written through :class:`~pelt_cli.checkpoint.ShardedWriter` and freed; untouched tensors are copied as raw bytes.
  Peak memory is one tensor plus the (small) adapter;
* atomic: written into ``.OUT.pelt-tmp-PID`` and renamed when complete; temporary directories left by killed
  merges (dead PIDs) are removed by the next merge to the same path.

Exact folds: LoRA, IA³ (output and input scales). UniPELT's gated LoRA only with ``freeze_gates="mean"`` (the gate
fixed at its mean from ``gates.json``: approximate). Prefix, adapter, domain modules and task heads cannot be folded;
with ``keep_unmerged`` they go to a run in ``OUT/pelt-rest/`` whose base is OUT (one rename commits both).
A module on a tied weight (``lm_head`` tied to the embeddings) unties it: the folded copy is written as its own
tensor and ``tie_word_embeddings: false`` goes into config.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli import __version__
from pelt_cli.apply import ADAPTER_FILE, RECIPE_FILE, RUN_FILE, RUN_FORMAT, insert_recipe, read_run
from pelt_cli.checkpoint import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    Checkpoint,
    ShardedWriter,
    TensorInfo,
    TensorReader,
    TensorSpec,
    cached_fingerprint,
    fingerprint,
    open_checkpoint,
    plan_shards,
    save_file,
    shard_names,
    structure_fingerprint,
    tensor_bytes,
    tensor_digest,
)
from pelt_cli.errors import CheckpointError, OutputExistsError, PeltError, UsageError

REST_DIR = "pelt-rest"
GATES_FILE = "gates.json"
FOLDABLE = ("lora", "ia3")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
DTYPE_CODES = {"float32": "F32", "fp32": "F32", "float": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
               "bfloat16": "BF16", "bf16": "BF16", "float64": "F64", "fp64": "F64"}
HEAD_REF = {"method": "head", "site": "pelt_head", "disk_site": "pelt_head"}
CONFIG_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class MergeRefused(PeltError):
    """A merge that would not give the run's model; ``modules`` lists what could not be folded."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, modules: list[dict] | None = None) -> None:
        super().__init__(message, hint)
        self.modules = list(modules or [])


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
class _Op:
    """One fold acting on one tensor: ``lora`` (add B·A), ``out``/``in`` (IA³ scale), ``bias`` (IA³ on a bias)."""

    kind: str
    transposed: bool = False
    l: Any = None  # noqa: E741
    a: Any = None
    b: Any = None
    scale: float = 1.0
    slices: list | None = None


def fold_tensor(t: Any, ops: list[_Op]) -> Any:
    """Apply folds to one tensor in fp32, in hook order (input scales last: pre-hooks run first). Returns fp32."""
    from pelt_cli.methods.ia3 import fold_input_scale, fold_output_scale

    w = t.float()  # fp32, ours alone (a copy, or the caller's workspace): in-place updates are safe
    for op in ops:
        if op.kind == "bias":
            w = w * op.l.float()  # (W x + b) ⊙ l → b' = l ⊙ b
        elif op.kind == "out":
            w = fold_output_scale(w, None, op.l, op.transposed)[0]  # W' = diag(l) W
        elif op.kind == "lora":
            w = _add_lora(w, op)  # W' = W + (α/r) B A
    for op in ops:
        if op.kind == "in":
            w = fold_input_scale(w, op.l, op.transposed)  # W' = W diag(l)
    return w


def _add_lora(w: Any, op: _Op) -> Any:
    """``W' = W + (α/r)·B A`` in place (``addmm_``: no (out, in) temporary); Conv1D (in, out): ``W' += (α/r)·Aᵀ Bᵀ``."""
    a, b = op.a.float(), op.b.float()
    rows = op.slices or [(0, w.shape[1] if op.transposed else w.shape[0])]
    offset = 0
    for start, end in rows:  # fused QKV: only the selected output rows (Conv1D: columns) change
        bs = b[offset:offset + end - start]
        if op.transposed:
            w[:, start:end].addmm_(a.t(), bs.t(), alpha=op.scale)
        else:
            w[start:end].addmm_(bs, a, alpha=op.scale)
        offset += end - start
    return w


class _Workspace:
    """Reused fp32 and output buffers for folding, so streaming a checkpoint does not fault in fresh pages per
    tensor: the source bytes are decoded into an fp32 buffer, folded in place, and cast into an output buffer."""

    def __init__(self) -> None:
        import torch

        self.f32 = torch.empty(0, dtype=torch.float32)
        self.out = bytearray(0)

    def fold(self, data: Any, info: TensorInfo, ops: list[_Op], spec: TensorSpec) -> memoryview:
        """The output bytes of one tensor: ``data`` (its stored bytes) folded by ``ops``, cast to ``spec.dtype``."""
        import torch

        from pelt_cli.checkpoint import torch_dtype

        n = info.numel
        if not n:
            return memoryview(b"")
        if self.f32.numel() < n:
            self.f32 = torch.empty(n, dtype=torch.float32)
        src = torch.frombuffer(data, dtype=torch_dtype(info.dtype), count=n).view(info.shape)
        w = self.f32[:n].view(info.shape)
        w.copy_(src)
        w = fold_tensor(w, ops)
        if spec.dtype == "F32" and w.is_contiguous():
            return tensor_bytes(w)
        if len(self.out) < spec.nbytes:
            self.out = bytearray(spec.nbytes)
        out = torch.frombuffer(self.out, dtype=torch_dtype(spec.dtype), count=n).view(info.shape)
        out.copy_(w)
        return memoryview(self.out)[: spec.nbytes]


def _stream(ckpt: Checkpoint, specs: list[TensorSpec], source: dict[str, str], disk_ops: dict[str, list[_Op]],
            need: set[str], w: ShardedWriter, report: MergeReport, src_digests: dict[str, str] | None,
            out_digests: dict[str, str] | None) -> None:
    """Write every output tensor, in a two-stage pipeline on two cores.

    A worker thread reads (and hashes, and folds) tensor i+1 into one of two buffer slots while this thread writes
    tensor i from the other (``pread``/``pwrite``, hashing and torch ops release the GIL). Untouched tensors (same
    dtype, no fold) are copied inside the kernel instead, and hashed in chunks when a digest is wanted, so the
    buffers are sized by the largest *folded* tensor.
    """
    from concurrent.futures import ThreadPoolExecutor

    size = max((ckpt.tensors[n].nbytes for n in need), default=0)
    slots = [(bytearray(size), _Workspace()) for _ in range(2)]

    def prepare(i: int, reader: TensorReader) -> tuple[Any, str | None, bool]:
        spec = specs[i]
        src = source[spec.name]
        if src not in need:  # copied by the kernel; hashed here in 16 MiB chunks if a digest is wanted
            wanted = src_digests is not None or out_digests is not None
            return None, tensor_digest(ckpt.tensors[src]) if wanted else None, False
        buf, work = slots[i % 2]
        data: Any = reader.read_bytes(src, into=buf)
        digest = hashlib.blake2b(data, digest_size=16).hexdigest() if src_digests is not None else None
        todo = disk_ops.get(spec.name)
        if todo or spec.dtype != ckpt.tensors[src].dtype:
            data = work.fold(data, ckpt.tensors[src], todo or [], spec)
        return data, digest, bool(todo)

    with ThreadPoolExecutor(1) as pool, TensorReader(ckpt) as ahead, TensorReader(ckpt) as here:
        pending = pool.submit(prepare, 0, ahead) if specs else None
        for i, spec in enumerate(specs):
            assert pending is not None
            data, digest, folded = pending.result()
            # slot (i+1) % 2 last held tensor i-1, already written: the worker may refill it now
            pending = pool.submit(prepare, i + 1, ahead) if i + 1 < len(specs) else None
            src = source[spec.name]
            if data is None:  # untouched: a kernel-side copy, like cp (output bytes = source bytes)
                w.copy_range(spec.name, *here.locate(src)[:2])
                if out_digests is not None:
                    out_digests[spec.name] = digest
            else:
                w.write_bytes(spec.name, data)
                if out_digests is not None:
                    out_digests[spec.name] = hashlib.blake2b(data, digest_size=16).hexdigest()
            if digest is not None and src_digests is not None:
                src_digests[src] = digest
            report.tensors_folded += folded
            report.tensors_written += 1
            report.bytes_written += spec.nbytes


# ---------------------------------------------------------------------------------------------------- planning

def _dtype_code(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_CODES:
        raise UsageError(f"dtype {dtype!r}: expected one of float32, float16, bfloat16, float64")
    return DTYPE_CODES[name]


def _ref(ins: dict) -> dict:
    return {"method": ins["method"], "site": ins["site"], "disk_site": ins["disk_site"]}


def _classify(insertions: list[dict], freeze_gates: str | None, keep: bool) -> tuple[list, list]:
    """Split insertions into ``fold`` [(index, ins, gate site or None)] and ``rest`` [index] (gates decided here)."""
    fold, rest, gated, gate_of, groups = [], [], [], {}, {}
    gate = None
    for i, ins in enumerate(insertions):
        m = ins["method"]
        if m == "unipelt.gate":
            gate = i
            groups[i] = []
            continue
        if m.startswith("unipelt.") and gate is not None:
            groups[gate].append(i)
            gate_of[i] = insertions[gate]["site"]
        if m in FOLDABLE:
            fold.append((i, ins, None))
        elif m == "unipelt.lora" and freeze_gates == "mean":
            fold.append((i, ins, gate_of.get(i, "(no gate before it)")))
        elif m == "unipelt.lora" and not keep:
            gated.append(ins)
        else:
            rest.append(i)
    if gated:
        raise MergeRefused(
            f"{len(gated)} UniPELT LoRA module(s) (e.g. {gated[0]['disk_site']}) are scaled by a gate computed from "
            "each input (G = mean σ(W h)); no fixed weight reproduces that, so they cannot be folded exactly",
            hint="pass --freeze-gates mean (freeze_gates='mean') to fold with each gate fixed at its mean from "
                 "gates.json (approximate), or --keep-unmerged to keep them as a run on top of the merged base",
            modules=[_ref(g) for g in gated])
    folded_idx = {i for i, _, _ in fold}
    rest += [g for g, members in groups.items() if not members or any(i not in folded_idx for i in members)]
    return fold, sorted(rest)


def _refuse_rest(insertions: list[dict], rest: list[int], head: bool) -> None:
    mods = [_ref(insertions[i]) for i in rest]
    if head:
        mods.append(HEAD_REF)
    by: dict[str, list[str]] = {}
    for m in mods:
        by.setdefault(m["method"], []).append(m["disk_site"])
    parts = [f"{k} ×{len(v)} ({', '.join(v[:3])}{', …' if len(v) > 3 else ''})" for k, v in by.items()]
    raise MergeRefused(f"{len(mods)} module(s) cannot be folded into the weights: {'; '.join(parts)}",
                       hint=f"pass --keep-unmerged to also write them as a run on top of the merged model "
                            f"(OUT/{REST_DIR})", modules=mods)


def _check_order(insertions: list[dict], fold: list, rest: list[int]) -> None:
    """An unmerged module hooked on a layer *before* a folded one would see the un-folded output: refuse."""
    for i, ins, _ in fold:
        for j in rest:
            other = insertions[j]
            if j < i and other["site"] == ins["site"] and other["method"] != "unipelt.gate":
                raise MergeRefused(f"{other['method']} at {other['disk_site']} runs before {ins['method']} on the "
                                   "same layer; folding the latter would change what the former sees",
                                   hint="put the foldable module first in the recipe")


def _gate_means(run_dir: Path, fold: list, doc: dict | None = None) -> dict[str, float]:
    sites = sorted({g for _, _, g in fold if g})
    if not sites:
        return {}
    p = run_dir / GATES_FILE
    if doc is None:
        doc = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    means = {}
    for s in sites:
        mean = doc.get("layers", {}).get(s, {}).get("lora", {}).get("mean")
        if not isinstance(mean, (int, float)) or mean != mean:
            raise MergeRefused(f"{p}: no mean LoRA gate for {s}; freeze_gates='mean' needs the gate statistics "
                               "that pelt train records", hint="train (or evaluate) the run first")
        means[s] = float(mean)
    return means


def _fingerprint_ok(ckpt: Checkpoint, meta: dict, where: Path) -> None:
    want = meta["base"]
    if structure_fingerprint(ckpt) != want.get("structure") or fingerprint(ckpt) != want.get("fingerprint"):
        raise CheckpointError(f"{where}: not the base this run was made on (its fingerprint differs from "
                              f"{want.get('fingerprint')})",
                              hint="pass the right base (--base), or override the check if you are sure")


def run_recipe(meta: dict, where: str) -> Any:
    """The validated recipe recorded in a run's ``run.json``."""
    import yaml

    from pelt_cli.recipe import loads

    return loads(yaml.safe_dump(meta["recipe"], sort_keys=False), where)


def meta_model(directory: str | os.PathLike[str], recipe: Any, head: dict | None) -> tuple[Any, Any, list]:
    """A skeleton on ``meta`` with the recipe (and head) inserted, plus its key map taken before insertion."""
    from pelt_cli.keymap import key_map, skeleton

    model = skeleton(directory)
    km = key_map(model)
    rows = insert_recipe(model, recipe) if recipe is not None and recipe.inserts else []
    if head:
        from pelt_cli.heads import attach_head

        attach_head(model, head)
    return model, km, rows


def expected_state(model: Any) -> dict[str, tuple]:
    """Name → shape of every inserted tensor (parameters and buffers) of a model, e.g. a ``meta`` skeleton."""
    from pelt_cli.surgery import inserted_state

    return {n: tuple(t.shape) for n, t in inserted_state(model).items()}


def read_adapter(run_dir: Path, model: Any) -> dict[str, Any]:
    """All tensors of a run's adapter file (small), checked against the inserted modules' names and shapes."""
    ck = open_checkpoint(run_dir / ADAPTER_FILE)
    with TensorReader(ck) as r:
        state = {n: r.read(n) for n in ck.tensors}
    want, got = expected_state(model), {n: tuple(t.shape) for n, t in state.items()}
    if want != got:
        bad = sorted(set(want) ^ set(got)) or [n for n in want if want[n] != got[n]]
        raise CheckpointError(f"{run_dir / ADAPTER_FILE}: does not match the run's recipe (e.g. {bad[:3]})")
    return state


def _plan_ops(model: Any, insertions: list[dict], fold: list, adapter: dict, means: dict) -> tuple[dict, list]:
    """Memory tensor name → folds, in hook order; and the report's folded list."""
    import torch

    from pelt_cli import surgery
    from pelt_cli.methods.ia3 import IA3Vector
    from pelt_cli.methods.lora import LoRA

    ops: dict[str, list[_Op]] = {}
    folded = []
    for _, ins, gate_site in fold:
        site = surgery.get_module(model, ins["site"])
        _, _, transposed = surgery.features(site)
        wname, bname = f"{ins['site']}.weight", f"{ins['site']}.bias"
        touched = [wname]
        for path in ins["modules"]:
            mod = surgery.get_module(model, path)
            if isinstance(mod, LoRA):
                scale = mod.scale * (means[gate_site] if gate_site else 1.0)
                ops.setdefault(wname, []).append(_Op("lora", transposed, a=adapter[f"{path}.A"],
                                                     b=adapter[f"{path}.B"], scale=scale, slices=mod.slices))
            elif isinstance(mod, IA3Vector):
                vec = torch.cat([torch.ones(mod.fixed), adapter[f"{path}.l"].float()])
                ops.setdefault(wname, []).append(_Op("in" if mod.side == "input" else "out", transposed, l=vec))
                if mod.side != "input" and getattr(site, "bias", None) is not None:
                    ops.setdefault(bname, []).append(_Op("bias", l=vec))
                    touched.append(bname)
            else:
                raise PeltError(f"internal: {path} is a {type(mod).__name__}, not a foldable module")
        entry = {**_ref(ins), "tensors": touched}
        if gate_site:
            entry["gate"] = means[gate_site]
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
        raise MergeRefused(f"cannot untie {', '.join(still)}: the model class ties it whatever "
                           "tie_word_embeddings says, so a module on it cannot be folded")
    lost = [t for t in km.tied if t not in km2.tied]
    names = {t: km2.to_disk[t] for t in lost}
    return new, names, {t: km.disk_name(km.tied[t]) for t in lost}, sorted(names.values())


def _disk_ops(km: Any, ops: dict, tie_names: dict) -> dict[str, list[_Op]]:
    out = {}
    for mem, lst in ops.items():
        if mem in tie_names:
            out[tie_names[mem]] = lst
        elif mem in km.to_disk:
            out[km.to_disk[mem]] = lst
        elif mem in km.converted:
            raise MergeRefused(f"{mem}: transformers fuses or splits this weight on load, so it has no single "
                               "tensor on disk to fold into")
        else:
            raise CheckpointError(f"{mem}: no on-disk tensor for this weight")
    return out


def _layout(ckpt: Checkpoint, extra: dict[str, str], out_dtype: str | None,
            max_shard_size: int | None) -> tuple[list[list[TensorSpec]], list[str], dict[str, str]]:
    """Output shards (specs in order) and file names; ``source`` maps each output tensor to its base tensor."""
    source: dict[str, str] = {}
    groups: list[list[TensorSpec]] = []
    for f in ckpt.files:
        group = []
        for info in sorted((t for t in ckpt.tensors.values() if t.file == f), key=lambda t: t.begin):
            for name in [info.name] + [t for t, s in extra.items() if s == info.name and t not in ckpt.tensors]:
                dt = out_dtype if out_dtype and info.dtype in FLOAT_DTYPES else info.dtype
                group.append(TensorSpec(name, dt, info.shape))
                source[name] = info.name
        if group:
            groups.append(group)
    if max_shard_size:
        shards = plan_shards([s for g in groups for s in g], max_shard_size)
        return shards, shard_names(len(shards)), source
    names = [SINGLE_NAME] if len(groups) == 1 and not ckpt.sharded else [f.name for f in ckpt.files
                                                                          if any(t.file == f for t in
                                                                                 ckpt.tensors.values())]
    return groups, names, source


def clean_stale_temps(out: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.OUT.pelt-tmp-PID`` / ``.OUT.pelt-old-PID`` left beside ``out`` by processes that no longer run."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        head = f".{out.name}."
        kind, _, pid = p.name[len(head):].rpartition("-")
        if not p.name.startswith(head) or kind not in ("pelt-tmp", "pelt-old") or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _side_files(directory: Path) -> list[Path]:
    """Everything beside the weights that a merged checkpoint needs: config, tokenizer, processor, generation."""
    keep = []
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name == "config.json":
            continue
        if p.suffix == ".safetensors" or p.name.endswith(".index.json") or p.suffix in PICKLE_SUFFIXES:
            continue
        keep.append(p)
    return keep


# ---------------------------------------------------------------------------------------------------- the merge

def merge_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: Any = None,
              max_shard_size: int | None = None, freeze_gates: str | None = None, keep_unmerged: bool = False,
              force: bool = False, base: str | os.PathLike[str] | None = None,
              check_fingerprint: bool = True, gate_stats: dict | None = None) -> MergeReport:
    """Fold a run's modules into its base and write a plain Hugging Face checkpoint directory, streaming.

    Args:
        run_dir: the run directory (``run.json`` + ``adapter.safetensors``).
        out_dir: the merged checkpoint directory to create.
        dtype: output dtype of floating tensors (``bfloat16``, ``float16``, ``float32``); default: the base's.
        max_shard_size: re-shard to at most this many bytes per file; default: keep the base's shard layout.
        freeze_gates: ``"mean"`` folds UniPELT's gated LoRA with each gate at its mean (approximate).
        keep_unmerged: write what cannot be folded as a run in ``out_dir/pelt-rest`` on top of the merged model.
        force: replace an existing ``out_dir``.
        base: another location of the run's base (default: the path recorded in ``run.json``).
        check_fingerprint: refuse a base whose content differs from the one the run was made on.
        gate_stats: gate statistics to take the means from (``gates.json`` layout, e.g. measured on other data);
            default: the run's ``gates.json``.

    Returns:
        What was written.

    Raises:
        MergeRefused: modules that cannot be folded (without ``keep_unmerged``), gated LoRA without
            ``freeze_gates``, or a tie that cannot be undone.
        CheckpointError: a wrong base, or a run that does not match its recipe.
    """
    from pelt_cli.checkpoint import read_header

    t0 = time.monotonic()
    run_dir, out = Path(run_dir), Path(out_dir)
    meta = read_run(run_dir)
    if freeze_gates not in (None, "mean"):
        raise UsageError(f"freeze_gates {freeze_gates!r}: expected 'mean'")
    out_dtype = _dtype_code(dtype)
    base_path = Path(base or meta["base"]["path"])
    for inp in (run_dir, base_path):
        if out.resolve() == inp.resolve() or out.resolve() in inp.resolve().parents:
            raise UsageError(f"{out}: the output would replace the input {inp}")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists", hint="choose another -o path or pass --force")
    insertions = meta["insertions"]
    has_head = any(n.startswith("pelt_head.") for n in read_header(run_dir / ADAPTER_FILE).tensors)
    head = meta.get("head") if has_head else None
    fold, rest = _classify(insertions, freeze_gates, keep_unmerged)
    if (rest or head) and not keep_unmerged:
        _refuse_rest(insertions, rest, bool(head))
    _check_order(insertions, fold, rest)
    means = _gate_means(run_dir, fold, gate_stats)
    clean_stale_temps(out)
    ckpt = open_checkpoint(base_path)
    fp_known = None
    if check_fingerprint:
        if structure_fingerprint(ckpt) != meta["base"].get("structure"):
            _fingerprint_ok(ckpt, meta, base_path)  # raises: other tensor names, dtypes or shapes
        fp_known = cached_fingerprint(ckpt)
        if fp_known is not None:
            _fingerprint_ok(ckpt, meta, base_path)
    recipe = run_recipe(meta, str(run_dir / RUN_FILE))
    model, km, rows = meta_model(ckpt.directory, recipe, head)
    if [(r.site, r.method) for r in rows] != [(i["site"], i["method"]) for i in insertions]:
        raise CheckpointError(f"{run_dir / RUN_FILE}: its insertions differ from what its recipe inserts on "
                              f"{base_path}")
    adapter = read_adapter(run_dir, model)
    ops, folded = _plan_ops(model, insertions, fold, adapter, means)
    config, tie_names, tie_src, untied = _ties(km, ops, ckpt.config or {})
    if out_dtype:
        config = {**config, "dtype": CONFIG_DTYPE[out_dtype]}
        if "torch_dtype" in config:
            config["torch_dtype"] = CONFIG_DTYPE[out_dtype]
    disk_ops = _disk_ops(km, ops, tie_names)
    shards, names, source = _layout(ckpt, {tie_names[t]: tie_src[t] for t in tie_names}, out_dtype,
                                    max_shard_size)
    missing = sorted(n for n in disk_ops if n not in source)
    if missing:
        raise CheckpointError(f"{base_path}: tensor(s) {missing[:3]} to fold into are not in the checkpoint")
    rest_plan = _plan_rest(config, recipe, insertions, rest, adapter, head) if (rest or head) else None
    unmerged = [_ref(insertions[i]) for i in rest] + ([HEAD_REF] if head else [])
    report = MergeReport(out=str(out), folded=folded, unmerged=unmerged,
                         approximate=bool(means), untied=untied, shards=len(shards))
    specs = [s for shard in shards for s in shard]
    writer = ShardedWriter(out, specs, None, metadata=ckpt.metadata, overwrite=force, layout=(shards, names))
    # The base must be the run's base. A fingerprint cached for these exact files (pelt apply computed it) is
    # checked now; otherwise each tensor is hashed as it streams by and the result is checked before the commit.
    hash_inline = check_fingerprint and fp_known is None
    src_digests: dict[str, str] = {}
    digests: dict[str, str] = {}
    need = {source[s.name] for s in specs if disk_ops.get(s.name) or s.dtype != ckpt.tensors[source[s.name]].dtype}
    with writer as w:
        _stream(ckpt, specs, source, disk_ops, need, w, report, src_digests if hash_inline else None,
                digests if rest_plan is not None else None)
        if hash_inline:
            got = fingerprint(ckpt, {**{n: tensor_digest(i) for n, i in ckpt.tensors.items() if n not in src_digests},
                                     **src_digests})
            if got != meta["base"].get("fingerprint"):
                raise CheckpointError(f"{base_path}: not the base this run was made on (its fingerprint {got} differs "
                                      f"from {meta['base'].get('fingerprint')}); nothing was written",
                                      hint="pass the right base (--base), or override the check if you are sure")
        for p in _side_files(ckpt.directory):
            w.copy_file(p)
        if config == ckpt.config:
            w.copy_file(ckpt.directory / "config.json")
        else:  # untied or re-typed
            w.write_text("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if ckpt.sharded and len(shards) == 1 and not max_shard_size:  # the base had an index: keep one
            index = {"metadata": {"total_size": report.bytes_written}, "weight_map": {s.name: names[0] for s in specs}}
            w.write_text(INDEX_NAME, json.dumps(index, indent=2) + "\n")
        if rest_plan is not None:
            _write_rest(w.tmp_dir / REST_DIR, out, run_dir, meta, rest_plan, specs, digests, head)
    report.rest = str(out / REST_DIR) if rest_plan is not None else None
    report.seconds = round(time.monotonic() - t0, 3)
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def _plan_rest(config: dict, recipe: Any, insertions: list[dict], rest: list[int], adapter: dict,
               head: dict | None) -> dict[str, Any]:
    """The run of what stays unmerged: a reduced recipe, its insertions and tensors (checked on a skeleton)."""
    import yaml

    from pelt_cli.recipe import loads
    from pelt_cli.surgery import freeze_base

    keep, rdict, cut = set(rest), recipe.to_dict(), {}
    entries = []
    for e in recipe.inserts:
        idx = [i for i, ins in enumerate(insertions) if ins["entry"] == e.index]
        kept = [i for i in idx if i in keep]
        if not kept:
            continue
        entry = copy.deepcopy(rdict["inserts"][e.index])
        if len(kept) < len(idx):  # a UniPELT entry whose LoRA was folded with frozen gates
            mods = entry["params"]["modules"]
            left = [m for m in mods if m != "lora"]
            if e.method != "unipelt" or not left:
                raise PeltError(f"internal: entry {e.index} ({e.method}) is only partly folded")
            if entry["params"]["gate"] == "softmax":
                raise MergeRefused("softmax gates share one normalisation across lora, prefix and adapter: after "
                                   "folding the LoRA, the remaining gates could not be reproduced",
                                   hint="merge without --freeze-gates and with --keep-unmerged (the gated LoRA "
                                        "then stays in the rest run, exactly)")
            entry["params"]["modules"] = left
            for i in kept:
                if insertions[i]["method"] == "unipelt.gate":
                    cut[insertions[i]["modules"][0]] = [mods.index(m) for m in left]
        entries.append(entry)
    if not entries:
        raise MergeRefused("only the task head (pelt_head) is left unmerged, and a run needs at least one "
                           "inserted module", hint="export the run instead (pelt export)")
    rdict["inserts"] = entries
    rest_recipe = loads(yaml.safe_dump(rdict, sort_keys=False), "<unmerged rest>")
    with tempfile.TemporaryDirectory(prefix="pelt-rest-") as d:
        (Path(d) / "config.json").write_text(json.dumps(config), encoding="utf-8")
        model, _, rows = meta_model(Path(d), rest_recipe, head)
    if [(r.site, r.method) for r in rows] != [(insertions[i]["site"], insertions[i]["method"]) for i in rest]:
        raise PeltError("internal: the reduced recipe does not insert exactly the unmerged modules")
    want = expected_state(model)
    tensors = {}
    for name, shape in want.items():
        t = adapter[name]
        for gate, rows_kept in cut.items():
            if name.startswith(gate + ".net."):
                t = t[rows_kept].contiguous()  # sigmoid gates are independent per module: keep their rows
        if tuple(t.shape) != shape:
            raise PeltError(f"internal: rest tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        tensors[name] = t
    trainable, _ = freeze_base(model)
    return {"recipe": rest_recipe, "rows": rows, "tensors": tensors, "new_params": trainable}


def _write_rest(d: Path, out: Path, run_dir: Path, meta: dict, plan: dict, specs: list[TensorSpec],
                digests: dict[str, str], head: dict | None) -> None:
    from pelt_cli.recipe import dump

    ck = Checkpoint(root=out, files=[], tensors={s.name: TensorInfo(s.name, s.dtype, s.shape, Path(), 0, s.nbytes)
                                                 for s in specs})
    run = {
        "format": RUN_FORMAT, "pelt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"path": str(out.resolve()), "fingerprint": fingerprint(ck, digests),
                 "structure": structure_fingerprint(ck), "family": meta["base"].get("family"),
                 "model_class": meta["base"].get("model_class"), "params": ck.total_params},
        "recipe": plan["recipe"].to_dict(), "new_params": plan["new_params"],
        "insertions": [asdict(r) for r in plan["rows"]],
        "merged_from": str(run_dir.resolve()),
    }
    if head:
        run["head"] = head
    d.mkdir()
    save_file(plan["tensors"], d / ADAPTER_FILE, metadata={"pelt_run_format": str(RUN_FORMAT)})
    (d / RECIPE_FILE).write_text(f"# unmerged rest of {run_dir}\n" + dump(plan["recipe"]), encoding="utf-8")
    (d / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    gates = run_dir / GATES_FILE
    if gates.is_file():
        doc = json.loads(gates.read_text(encoding="utf-8"))
        sites = {r.site for r in plan["rows"] if r.method == "unipelt.gate"}
        doc["layers"] = {s: {m: v for m, v in mods.items() if m != "lora"} for s, mods in doc.get("layers", {}).items()
                         if s in sites}
        (d / GATES_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- verify

def sample_inputs_for(config: Any, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, Any]:
    """Simple model inputs built from a transformers config: token ids, Whisper features or ViT pixels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)

    def ids() -> Any:
        avoid = {v for k, v in vars(config).items() if isinstance(v, int) and k.endswith(("_token_index",
                 "_token_id")) and k not in ("pad_token_id", "bos_token_id", "eos_token_id",
                                              "decoder_start_token_id")}
        x = torch.randint(0, int(vocab), (batch, seq), generator=g)
        for a in avoid:
            x[x == a] = (a + 1) % int(vocab) if (a + 1) % int(vocab) not in avoid else 0
        return x

    if getattr(config, "num_mel_bins", None) and getattr(config, "is_encoder_decoder", False):
        frames = 2 * int(getattr(config, "max_source_positions", 1500))
        return {"input_features": torch.randn(batch, config.num_mel_bins, frames, generator=g),
                "decoder_input_ids": ids()}
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


def verify_merge(run_dir: str | os.PathLike[str], merged_dir: str | os.PathLike[str],
                 samples: int | dict[str, Any] = 2) -> float:
    """Max |Δ| between the run (base + modules) and the merged checkpoint (plus its rest run, if any).

    Args:
        run_dir: the run that was merged.
        merged_dir: the merge's output.
        samples: a batch size for :func:`sample_inputs_for`, or ready model inputs.
    """
    import torch

    from pelt_cli.apply import load_base, load_run

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
