"""``pelt export``: diffed adapter bundles, and PEFT adapters out of (and into) pelt runs.

A bundle is a directory holding exactly two files:

* ``bundle.safetensors``: the run's tensors that are new relative to its base. A run tensor whose bytes equal a base
  tensor (by BLAKE2b digest, e.g. a buffer of ones equal to a LayerNorm weight) is left out and referenced by name;
* ``manifest.json``: format version, pelt version, the base (content and structure fingerprints, a path hint,
  family, class), the resolved recipe, the insertions, the task head, gate statistics (``gates.json``) and every
  tensor with dtype, shape, BLAKE2b-128 checksum and where it is stored (``bundle`` or ``base``).

``export_bundle(run, "-", stream=f)`` writes the same two files as an uncompressed tar stream (members at the top
level, ``manifest.json`` first), so ``pelt export RUN -o - | tar -x -C DIR`` gives the bundle directory.
:func:`apply_bundle` rebuilds a run directory on a base whose fingerprint matches (or any base with ``force``).
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

from pelt_cli import __version__, merge
from pelt_cli.apply import ADAPTER_FILE, RECIPE_FILE, RUN_FILE, RUN_FORMAT, atomic_dir, read_run
from pelt_cli.checkpoint import (
    TensorReader,
    fingerprint,
    open_checkpoint,
    save_file,
    structure_fingerprint,
    tensor_digest,
)
from pelt_cli.errors import CheckpointError, OutputExistsError, PeltError, UsageError
from pelt_cli.merge import GATES_FILE, clean_stale_temps, expected_state, meta_model, read_adapter

BUNDLE_FILE = "bundle.safetensors"
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class BaseMismatch(PeltError):
    """A bundle or adapter offered to a base other than the one it was made on."""

    exit_code = 2


class ExportRefused(PeltError):
    """A run that the requested format cannot represent."""

    exit_code = 2


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists", hint="choose another -o path or pass --force")
    clean_stale_temps(out)


# ---------------------------------------------------------------------------------------------------- bundles

def _base_refs(meta: dict, adapter: Any, digests: dict[str, str]) -> dict[str, str]:
    """Run tensor → base tensor with the same bytes. Only same dtype+shape base tensors are hashed."""
    try:
        base = open_checkpoint(meta["base"]["path"])
    except CheckpointError:
        return {}  # base not here: keep everything (the bundle is then self-contained)
    kinds = {(i.dtype, i.shape) for i in adapter.tensors.values()}
    by_digest: dict[str, str] = {}
    for name in sorted(base.tensors):
        info = base.tensors[name]
        if (info.dtype, info.shape) in kinds:
            by_digest.setdefault(tensor_digest(info), name)
    return {n: by_digest[d] for n, d in digests.items() if d in by_digest}


def _manifest(meta: dict, run_dir: Path, adapter: Any, digests: dict[str, str], refs: dict[str, str]) -> dict:
    gates = run_dir / GATES_FILE
    b = meta["base"]
    tensors = []
    for name in sorted(adapter.tensors):
        info = adapter.tensors[name]
        row = {"name": name, "dtype": info.dtype, "shape": list(info.shape), "blake2b_128": digests[name],
               "stored": "base" if name in refs else "bundle"}
        if name in refs:
            row["base_tensor"] = refs[name]
        tensors.append(row)
    return {
        "format": "pelt-bundle", "format_version": BUNDLE_FORMAT, "pelt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"fingerprint": b["fingerprint"], "structure": b["structure"], "path_hint": b["path"],
                 "family": b.get("family"), "model_class": b.get("model_class"), "params": b.get("params")},
        "recipe": meta["recipe"], "new_params": meta.get("new_params"), "insertions": meta["insertions"],
        "head": meta.get("head"),
        "gates": json.loads(gates.read_text(encoding="utf-8")) if gates.is_file() else None,
        "tensors": tensors,
    }


def export_bundle(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False,
                  stream: BinaryIO | None = None) -> dict[str, Any]:
    """Write a run as a diffed adapter bundle (a directory, or a tar stream when ``out`` is ``"-"``).

    Args:
        run_dir: the run directory.
        out: the bundle directory to create, or ``"-"`` to write a tar stream to ``stream``.
        force: replace an existing ``out``.
        stream: a binary file object for ``out == "-"`` (the CLI passes ``sys.stdout.buffer``).

    Returns:
        The manifest.
    """
    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    adapter = open_checkpoint(run_dir / ADAPTER_FILE)
    digests = {n: tensor_digest(i) for n, i in adapter.tensors.items()}
    refs = _base_refs(meta, adapter, digests)
    manifest = _manifest(meta, run_dir, adapter, digests, refs)

    def fill(d: Path) -> None:
        with TensorReader(adapter) as r:
            keep = {n: r.read(n) for n in sorted(adapter.tensors) if n not in refs}
        save_file(keep, d / BUNDLE_FILE, metadata={"pelt_bundle_format": str(BUNDLE_FORMAT)})
        (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    if str(out) == "-":
        if stream is None:
            raise UsageError("export to '-' needs a binary stream to write the tar to")
        with tempfile.TemporaryDirectory(prefix="pelt-bundle-") as d:
            fill(Path(d))
            with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for name in (MANIFEST_FILE, BUNDLE_FILE):
                    info = tar.gettarinfo(str(Path(d) / name), arcname=name)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o644
                    with open(Path(d) / name, "rb") as f:
                        tar.addfile(info, f)
        return manifest
    out = Path(out)
    _prepare_out(out, force)
    with atomic_dir(out, force) as tmp:
        fill(tmp)
    return manifest


def _open_bundle(path: Path, scratch: Path) -> Path:
    """A bundle directory, or a tar of one (extracted into ``scratch``: only the two bundle files, plain)."""
    if path.is_dir():
        return path
    if not (path.is_file() and tarfile.is_tarfile(path)):
        raise CheckpointError(f"{path}: not a bundle (a directory with {MANIFEST_FILE}, or a tar of one)")
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name in (MANIFEST_FILE, BUNDLE_FILE) and member.isfile():
                src = tar.extractfile(member)
                assert src is not None
                (scratch / member.name).write_bytes(src.read())
    return scratch


def apply_bundle(bundle_dir: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str],
                 *, force: bool = False) -> Path:
    """Rebuild a run directory from a bundle and a base checkpoint.

    Args:
        bundle_dir: a bundle directory (or a tar of one).
        model: the base checkpoint to put the run on.
        out: the run directory to create.
        force: accept a base whose fingerprint differs from the bundle's (and replace an existing ``out``).

    Raises:
        BaseMismatch: the base's fingerprint differs from the bundle's (without ``force``), or a tensor the bundle
            takes from the base has other content there (always).
        CheckpointError: a corrupt bundle (checksum mismatch) or one that does not fit the base's structure.
    """
    import yaml

    from pelt_cli.recipe import dump, loads
    from pelt_cli.sites import detect_family
    from pelt_cli.surgery import freeze_base

    out = Path(out)
    _prepare_out(out, force)
    with tempfile.TemporaryDirectory(prefix="pelt-bundle-") as scratch:
        bdir = _open_bundle(Path(bundle_dir), Path(scratch))
        try:
            manifest = json.loads((bdir / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{bdir}: no readable {MANIFEST_FILE} ({e})") from None
        if manifest.get("format") != "pelt-bundle" or manifest.get("format_version", 99) > BUNDLE_FORMAT:
            raise CheckpointError(f"{bdir}: not a pelt bundle this version understands "
                                  f"(format {manifest.get('format')} v{manifest.get('format_version')})")
        ckpt = open_checkpoint(model)
        fp, st = fingerprint(ckpt), structure_fingerprint(ckpt)
        want = manifest["base"]
        if fp != want["fingerprint"] and not force:
            raise BaseMismatch(f"{model}: fingerprint {fp} differs from the bundle's base {want['fingerprint']} "
                               f"(exported from {want.get('path_hint')})",
                               hint="pass the base the bundle was exported from, or --force to use this one anyway")
        state = _bundle_tensors(bdir, manifest, ckpt)
    recipe = loads(yaml.safe_dump(manifest["recipe"], sort_keys=False), str(Path(bundle_dir) / MANIFEST_FILE))
    skel, _, rows = meta_model(ckpt.directory, recipe, manifest.get("head"))
    if [(r.site, r.method) for r in rows] != [(i["site"], i["method"]) for i in manifest["insertions"]]:
        raise CheckpointError(f"{model}: the bundle's recipe inserts other modules on this base than it recorded")
    if expected_state(skel) != {n: tuple(t.shape) for n, t in state.items()}:
        raise CheckpointError(f"{model}: the bundle's tensors do not fit this base's layers (names or shapes)")
    trainable, _ = freeze_base(skel)
    run = {
        "format": RUN_FORMAT, "pelt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"path": str(Path(ckpt.root).resolve()), "fingerprint": fp, "structure": st,
                 "family": detect_family(ckpt), "model_class": type(skel).__name__, "params": ckpt.total_params},
        "recipe": recipe.to_dict(), "new_params": trainable,
        "insertions": [asdict(r) for r in rows],
        "from_bundle": {"base_fingerprint": want["fingerprint"], "created": manifest.get("created")},
    }
    if manifest.get("head"):
        run["head"] = manifest["head"]
    with atomic_dir(out, force) as tmp:
        save_file(state, tmp / ADAPTER_FILE, metadata={"pelt_run_format": str(RUN_FORMAT)})
        (tmp / RECIPE_FILE).write_text("# rebuilt from a pelt bundle\n" + dump(recipe), encoding="utf-8")
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        if manifest.get("gates"):
            (tmp / GATES_FILE).write_text(json.dumps(manifest["gates"], indent=2) + "\n", encoding="utf-8")
    return out


def _bundle_tensors(bdir: Path, manifest: dict, ckpt: Any) -> dict[str, Any]:
    """Every run tensor, from the bundle file or the base, each checked against its manifest checksum."""
    bundle = open_checkpoint(bdir / BUNDLE_FILE)
    state = {}
    with TensorReader(bundle) as rb, TensorReader(ckpt) as rbase:
        for row in manifest["tensors"]:
            name = row["name"]
            if row["stored"] == "base":
                info = ckpt.tensors.get(row["base_tensor"])
                if info is None or tensor_digest(info) != row["blake2b_128"]:
                    raise BaseMismatch(f"the bundle takes {name} from the base tensor {row['base_tensor']}, which "
                                       "this base lacks or holds with other content; no --force can supply it")
                state[name] = rbase.read(row["base_tensor"])
            else:
                info = bundle.tensors.get(name)
                if info is None or tensor_digest(info) != row["blake2b_128"]:
                    raise CheckpointError(f"{bdir / BUNDLE_FILE}: tensor {name} is missing or its checksum differs "
                                          "from the manifest (corrupt bundle)")
                state[name] = rb.read(name)
    extra = sorted(set(bundle.tensors) - set(state))
    if extra:
        raise CheckpointError(f"{bdir / BUNDLE_FILE}: tensors not in the manifest: {extra[:3]}")
    return state


# ---------------------------------------------------------------------------------------------------- PEFT

def _refuse_for_peft(meta: dict, has_head: bool) -> str:
    bad = [f"{i['method']} at {i['disk_site']}" for i in meta["insertions"] if i["method"] not in ("lora", "ia3")]
    if has_head:
        bad.append("the task head pelt_head")
    if bad:
        raise ExportRefused(f"a PEFT adapter holds LoRA or IA³ only; this run also has {len(bad)} other module(s): "
                            f"{', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}",
                            hint="pelt export without --format peft writes a bundle that keeps every module")
    kinds = sorted({i["method"] for i in meta["insertions"]})
    if len(kinds) != 1:
        raise ExportRefused(f"this run mixes {' and '.join(kinds) or 'nothing'}; one PEFT adapter is either LoRA or "
                            "IA³", hint="export a bundle instead, or split the recipe into two runs")
    sites = [i["site"] for i in meta["insertions"]]
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ExportRefused(f"{dup[0]} carries two {kinds[0]} modules; PEFT allows one per layer and adapter")
    return kinds[0]


def export_peft(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a LoRA-only or IA³-only run as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` / ``ia3_l`` (no adapter name), and
    ``target_modules`` lists the exact module paths. GPT-2's sliced q/v LoRA becomes a full-width ``lora_B`` with zero
    rows for the k third (the same function). IA³ output vectors are ``(out, 1)``, input ones ``(1, in)`` and listed
    in ``feedforward_modules``.

    Raises:
        ExportRefused: the run holds other methods, mixes LoRA and IA³, or has two modules on one layer.
    """
    import torch

    from pelt_cli import surgery

    run_dir, out = Path(run_dir), Path(out)
    meta = read_run(run_dir)
    names = open_checkpoint(run_dir / ADAPTER_FILE).tensors
    kind = _refuse_for_peft(meta, any(n.startswith("pelt_head.") for n in names))
    base = open_checkpoint(meta["base"]["path"])
    model, _, _ = meta_model(base.directory, merge.run_recipe(meta, str(run_dir / RUN_FILE)), None)
    adapter = read_adapter(run_dir, model)
    tensors, ranks, ff, fan_in_fan_out, dropout = {}, {}, [], False, 0.0
    for ins in meta["insertions"]:
        site, path = ins["site"], ins["modules"][0]
        _, out_f, transposed = surgery.features(surgery.get_module(model, site))
        fan_in_fan_out |= transposed
        mod = surgery.get_module(model, path)
        if kind == "lora":
            b = adapter[f"{path}.B"]
            if mod.slices:  # zero rows where the sliced LoRA writes nothing: the same function
                full, offset = torch.zeros(out_f, b.shape[1], dtype=b.dtype), 0
                for start, end in mod.slices:
                    full[start:end] = b[offset:offset + end - start]
                    offset += end - start
                b = full
            tensors[f"{PEFT_PREFIX}{site}.lora_A.weight"] = adapter[f"{path}.A"].contiguous()
            tensors[f"{PEFT_PREFIX}{site}.lora_B.weight"] = b.contiguous()
            ranks[site] = (mod.rank, mod.alpha)
            dropout = max(dropout, float(getattr(mod.dropout, "p", 0.0)))
        else:
            vec = torch.cat([torch.ones(mod.fixed, dtype=adapter[f"{path}.l"].dtype), adapter[f"{path}.l"]])
            tensors[f"{PEFT_PREFIX}{site}.ia3_l"] = vec[None, :] if mod.side == "input" else vec[:, None]
            if mod.side == "input":
                ff.append(site)
    sites = [i["site"] for i in meta["insertions"]]
    config: dict[str, Any] = {
        "peft_type": "LORA" if kind == "lora" else "IA3", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": meta["base"]["path"], "revision": None, "target_modules": sites,
        "exclude_modules": None, "fan_in_fan_out": fan_in_fan_out, "modules_to_save": None,
    }
    if kind == "lora":
        counts: dict[tuple, int] = {}
        for v in ranks.values():
            counts[v] = counts.get(v, 0) + 1
        r, alpha = max(counts, key=lambda v: counts[v])
        config.update({
            "r": r, "lora_alpha": _num(alpha), "lora_dropout": dropout, "bias": "none", "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {s: v[0] for s, v in ranks.items() if v[0] != r},
            "alpha_pattern": {s: _num(v[1]) for s, v in ranks.items() if v[1] != alpha},
        })
    else:
        config.update({"feedforward_modules": ff, "init_ia3_weights": True})
    _prepare_out(out, force)
    with atomic_dir(out, force) as tmp:
        save_file(tensors, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _peft_state(pdir: Path) -> tuple[dict, dict]:
    try:
        cfg = json.loads((pdir / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{pdir}: no readable {PEFT_CONFIG} ({e})") from None
    ck = open_checkpoint(pdir / PEFT_WEIGHTS)
    with TensorReader(ck) as r:
        state = {n.removeprefix(PEFT_PREFIX): r.read(n) for n in ck.tensors}
    if any(not n.startswith(PEFT_PREFIX) for n in ck.tensors):
        raise ExportRefused(f"{pdir / PEFT_WEIGHTS}: keys without the {PEFT_PREFIX!r} prefix; not a PEFT adapter")
    return cfg, state


def _lora_entries(cfg: dict, state: dict) -> tuple[list[dict], dict]:
    import math

    unsupported = [k for k in ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "target_parameters",
                               "trainable_token_indices", "alora_invocation_tokens") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    odd = sorted(n for n in state if not n.endswith((".lora_A.weight", ".lora_B.weight")))
    if unsupported or odd:
        raise ExportRefused(f"this PEFT LoRA uses what pelt's lora does not have: {', '.join(unsupported + odd[:3])}")
    groups: dict[tuple, list[str]] = {}
    values = {}
    for name in sorted(state):
        if not name.endswith(".lora_A.weight"):
            continue
        site = name[: -len(".lora_A.weight")]
        r = state[name].shape[0]
        alpha = next((v for k, v in (cfg.get("alpha_pattern") or {}).items() if re_full(k, site)), cfg["lora_alpha"])
        alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha  # rsLoRA α/√r = (α√r)/r
        groups.setdefault((r, float(alpha)), []).append(site)
        values[f"{site}.pelt_lora.A"] = state[name]
        values[f"{site}.pelt_lora.B"] = state[f"{site}.lora_B.weight"]
    entries = [{"method": "lora", "targets": sites,
                "params": {"rank": r, "alpha": a, "dropout": float(cfg.get("lora_dropout") or 0.0)}}
               for (r, a), sites in groups.items()]
    return entries, values


def re_full(pattern: str, key: str) -> bool:
    """PEFT's pattern rule (``rank_pattern``/``alpha_pattern``): the key ends with the pattern at a dot boundary."""
    import re

    return re.match(rf"(.*\.)?({pattern})$", key) is not None


def _ia3_entries(state: dict) -> tuple[list[dict], dict]:
    sides: dict[str, list[str]] = {"input": [], "output": []}
    vectors = {}
    for name in sorted(state):
        if not name.endswith(".ia3_l"):
            raise ExportRefused(f"{name}: not an IA³ vector; pelt imports ia3_l tensors only")
        site, t = name[: -len(".ia3_l")], state[name]
        side = "input" if t.shape[0] == 1 and t.dim() == 2 and t.shape[1] > 1 else "output"
        sides[side].append(site)
        vectors[site] = (side, t.reshape(-1))
    entries = [{"method": "ia3", "targets": sites, "params": {"ffn_placement": p}}
               for sites, p in ((sides["input"], "down_input"), (sides["output"], "up_output")) if sites]
    return entries, vectors


def import_peft(peft_dir: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                force: bool = False) -> Path:
    """Bring a PEFT LoRA or IA³ adapter into a pelt run directory on ``model``.

    The recipe names the adapter's modules exactly (one ``lora`` entry per rank/alpha pair; one ``ia3`` entry per
    side), is applied to the base like ``pelt apply``, and the adapter's weights replace the fresh ones.

    Raises:
        ExportRefused: an adapter type or option pelt's methods cannot express (DoRA, biases, modules_to_save, an
            IA³ vector on a side pelt's ia3 does not scale there, …).
    """
    import shutil

    import torch
    import yaml

    from pelt_cli.apply import apply
    from pelt_cli.checkpoint import _commit_dir
    from pelt_cli.recipe import loads

    pdir, out = Path(peft_dir), Path(out)
    cfg, state = _peft_state(pdir)
    ptype = cfg.get("peft_type")
    if ptype == "LORA":
        entries, values = _lora_entries(cfg, state)
    elif ptype == "IA3":
        entries, vectors = _ia3_entries(state)
    else:
        raise ExportRefused(f"{pdir}: peft_type {ptype!r}; pelt imports LORA and IA3 adapters")
    recipe = loads(yaml.safe_dump({"name": f"peft-{pdir.name}", "description": f"imported from {pdir}",
                                   "inserts": entries}, sort_keys=False), str(pdir / PEFT_CONFIG))
    base = open_checkpoint(model)
    skel, _, _ = meta_model(base.directory, recipe, None)
    if ptype == "IA3":
        values = {}
        for site, (side, vec) in vectors.items():
            mod = skel.get_submodule(f"{site}.pelt_ia3")
            if mod.side != side or vec.numel() != mod.l.numel() + mod.fixed:
                raise ExportRefused(f"{site}: the PEFT vector scales the layer's {side} ({vec.numel()} wide); pelt's "
                                    f"ia3 scales its {mod.side} there")
            if mod.fixed and not torch.equal(vec[: mod.fixed], torch.ones(mod.fixed, dtype=vec.dtype)):
                raise ExportRefused(f"{site}: the PEFT vector scales the q third of a fused QKV layer; pelt's ia3 "
                                    "keeps it at one")
            values[f"{site}.pelt_ia3.l"] = vec[mod.fixed:].contiguous()
    _prepare_out(out, force)
    tmp = out.parent / f".{out.name}.pelt-tmp-{os.getpid()}"
    try:
        apply(recipe, base.root, tmp, force=True)
        ck = open_checkpoint(tmp / ADAPTER_FILE)
        with TensorReader(ck) as r:
            current = {n: r.read(n) for n in ck.tensors}
        for name, t in values.items():
            if name not in current or tuple(current[name].shape) != tuple(t.shape):
                raise ExportRefused(f"{name}: shape {tuple(t.shape)} does not fit the layer on this base")
            current[name] = t.to(current[name].dtype).contiguous()
        save_file(current, tmp / ADAPTER_FILE, metadata={"pelt_run_format": str(RUN_FORMAT)})
        run = json.loads((tmp / RUN_FILE).read_text(encoding="utf-8"))
        run["imported_from"] = {"peft_dir": str(pdir.resolve()), "peft_type": ptype,
                                "base_model_name_or_path": cfg.get("base_model_name_or_path")}
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        _commit_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
