"""``pelt export``: diffed adapter bundles (PEFT adapters: :mod:`pelt_cli.peft_format`).

A bundle is a directory holding two files (plus, with ``--peft``, a PEFT adapter's two files beside them):

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
import shutil
import tarfile
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO

from pelt_cli import __version__
from pelt_cli.errors import BaseMismatch, CheckpointError, UsageError
from pelt_cli.io.atomic import atomic_dir, prepare_out
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.fingerprint import tensor_digest
from pelt_cli.io.reader import TensorReader
from pelt_cli.io.writer import save_file
from pelt_cli.recipe import Recipe
from pelt_cli.run import ADAPTER_FILE, GATES_FILE, TOKENIZER_FILES, Base, PlanRow, Run, check_state, now

BUNDLE_FILE = "bundle.safetensors"
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = 1


# ---------------------------------------------------------------------------------------------------- bundles


def _base_refs(run: Run, adapter: Any, digests: dict[str, str]) -> dict[str, str]:
    """Run tensor → base tensor with the same bytes. Only same dtype+shape base tensors are hashed."""
    try:
        base = run.base(check=False).ckpt
    except CheckpointError:
        return {}  # base not here: keep everything (the bundle is then self-contained)
    kinds = {(i.dtype, i.shape) for i in adapter.tensors.values()}
    by_digest: dict[str, str] = {}
    for name in sorted(base.tensors):
        info = base.tensors[name]
        if (info.dtype, info.shape) in kinds:
            by_digest.setdefault(tensor_digest(info), name)
    return {n: by_digest[d] for n, d in digests.items() if d in by_digest}


def _manifest(run: Run, adapter: Any, digests: dict[str, str], refs: dict[str, str]) -> dict:
    b = run.meta.base
    tensors = []
    for name in sorted(adapter.tensors):
        info = adapter.tensors[name]
        row = {
            "name": name,
            "dtype": info.dtype,
            "shape": list(info.shape),
            "nbytes": info.nbytes,
            "blake2b_128": digests[name],
            "stored": "base" if name in refs else "bundle",
        }
        if name in refs:
            row["base_tensor"] = refs[name]
        tensors.append(row)
    return {
        "format": "pelt-bundle",
        "format_version": BUNDLE_FORMAT,
        "pelt_version": __version__,
        "created": now(),
        "base": {
            "fingerprint": b.fingerprint,
            "structure": b.structure,
            "path_hint": b.path,
            "family": b.family,
            "model_class": b.model_class,
            "params": b.params,
        },
        "recipe": run.meta.recipe,
        "new_params": run.meta.new_params,
        "insertions": [asdict(r) for r in run.insertions],
        "head": run.head,
        "gates": run.gates(),
        "tensors": tensors,
    }


def export_bundle(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    stream: BinaryIO | None = None,
    peft: bool = False,
) -> dict[str, Any]:
    """Write a run as a diffed adapter bundle (a directory, or a tar stream when ``out`` is ``"-"``).

    Args:
        run_dir: the run directory.
        out: the bundle directory to create, or ``"-"`` to write a tar stream to ``stream``.
        force: replace an existing ``out``.
        stream: a binary file object for ``out == "-"`` (the CLI passes ``sys.stdout.buffer``).
        peft: also write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into the bundle,
            so ``PeftModel.from_pretrained(base, BUNDLE)`` loads it (LoRA-only or IA³-only runs).

    Returns:
        The manifest.
    """
    run = Run.open(run_dir)
    adapter = open_checkpoint(run.path(ADAPTER_FILE))
    digests = {n: tensor_digest(i) for n, i in adapter.tensors.items()}
    refs = _base_refs(run, adapter, digests)
    manifest = _manifest(run, adapter, digests, refs)
    tokenizer = run.tokenizer_files()  # the tokenizer travels with the bundle
    manifest["tokenizer"] = [f.name for f in tokenizer]
    files = [MANIFEST_FILE, BUNDLE_FILE, *manifest["tokenizer"]]
    peft_files = None
    if peft:
        from pelt_cli.peft_format import PEFT_CONFIG, PEFT_WEIGHTS, peft_adapter, write_peft

        peft_files = peft_adapter(run)  # refuses before anything is written
        files += [PEFT_CONFIG, PEFT_WEIGHTS]

    def fill(d: Path) -> None:
        with TensorReader(adapter) as r:
            keep = {n: r.read(n) for n in sorted(adapter.tensors) if n not in refs}
        save_file(keep, d / BUNDLE_FILE, metadata={"pelt_bundle_format": str(BUNDLE_FORMAT)})
        (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if peft_files is not None:
            write_peft(d, *peft_files)
        for f in tokenizer:
            shutil.copy2(f, d / f.name)

    if str(out) == "-":
        if stream is None:
            raise UsageError("export to '-' needs a binary stream to write the tar to")
        with tempfile.TemporaryDirectory(prefix="pelt-bundle-") as d:
            fill(Path(d))
            _tar(Path(d), files, stream)
        return manifest
    out = Path(out)
    prepare_out(out, force)
    with atomic_dir(out, force) as tmp:
        fill(tmp)
    return manifest


def _tar(d: Path, files: list[str], stream: BinaryIO) -> None:
    """The files of ``d`` as an uncompressed tar stream, in this order, owner and modes normalised."""
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
            info = tar.gettarinfo(str(d / name), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(d / name, "rb") as f:
                tar.addfile(info, f)


def _open_bundle(path: Path, scratch: Path) -> Path:
    """A bundle directory, or a tar of one (extracted into ``scratch``: only the bundle's own files, plain)."""
    if path.is_dir():
        return path
    if not (path.is_file() and tarfile.is_tarfile(path)):
        raise CheckpointError(f"{path}: not a bundle (a directory with {MANIFEST_FILE}, or a tar of one)")
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name in (MANIFEST_FILE, BUNDLE_FILE, *TOKENIZER_FILES) and member.isfile():
                src = tar.extractfile(member)
                if src is None:
                    raise CheckpointError(f"{path}: cannot read {member.name} from the tar")
                (scratch / member.name).write_bytes(src.read())
    return scratch


def _tokenizer_files(bdir: Path, manifest: dict[str, Any], keep: Path) -> list[Path]:
    """The tokenizer files the manifest lists, copied out of the bundle (which may be a temporary extraction)."""
    names = [n for n in manifest.get("tokenizer") or [] if n in TOKENIZER_FILES and (bdir / n).is_file()]
    keep.mkdir(exist_ok=True)
    for n in names:
        shutil.copy2(bdir / n, keep / n)
    return [keep / n for n in names]


def _read_manifest(bdir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((bdir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{bdir}: no readable {MANIFEST_FILE} ({e})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != "pelt-bundle"
        or not isinstance(manifest.get("format_version", 99), int)
        or manifest.get("format_version", 99) > BUNDLE_FORMAT
    ):
        got = manifest if not isinstance(manifest, dict) else (manifest.get("format"), manifest.get("format_version"))
        raise CheckpointError(f"{bdir}: not a pelt bundle this version understands (format {got})")
    return manifest


def _check_base(base: Base, manifest: dict[str, Any], model: Any, force: bool) -> None:
    want = manifest["base"]
    if base.fingerprint() != want["fingerprint"] and not force:
        raise BaseMismatch(
            f"{model}: fingerprint {base.fingerprint()} differs from the bundle's base "
            f"{want['fingerprint']} (exported from {want.get('path_hint')})",
            hint="pass the base the bundle was exported from, or --force to use this one anyway",
        )


def apply_bundle(
    bundle_dir: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> Path:
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
    out = Path(out)
    prepare_out(out, force)
    base = Base.open(model)
    with tempfile.TemporaryDirectory(prefix="pelt-bundle-") as scratch:
        bdir = _open_bundle(Path(bundle_dir), Path(scratch))
        manifest = _read_manifest(bdir)
        _check_base(base, manifest, model, force)
        state = _bundle_tensors(bdir, manifest, base.ckpt)
        tokenizer = _tokenizer_files(bdir, manifest, Path(scratch) / "tok")
        recipe = Recipe.from_dict(manifest["recipe"], str(Path(bundle_dir) / MANIFEST_FILE))
        run = Run.create(
            base,
            recipe,
            [PlanRow.from_dict(r) for r in manifest["insertions"]],
            "",
            0,
            from_bundle={"base_fingerprint": manifest["base"]["fingerprint"], "created": manifest.get("created")},
        )
        run.meta.head = manifest.get("head")
        skel, rows = run.skeleton(base)
        run.check_rows(rows, base)
        check_state(state, skel, Path(bundle_dir))
        run.meta.new_params, run.meta.insertions = sum(r.new_params for r in rows), rows
        run.meta.base.model_class = type(base.skeleton()).__name__
        gates = {GATES_FILE: json.dumps(manifest["gates"], indent=2) + "\n"} if manifest.get("gates") else {}
        if tokenizer:  # the run keeps the bundle's tokenizer, and merge copies it from there
            run.meta.extra["tokenizer"] = str(out.resolve())
        return run.write(out, state, force=force, note="rebuilt from a pelt bundle", files=gates, copy_files=tokenizer)


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
                    raise BaseMismatch(
                        f"the bundle takes {name} from the base tensor {row['base_tensor']}, which "
                        "this base lacks or holds with other content; no --force can supply it"
                    )
                state[name] = rbase.read(row["base_tensor"])
            else:
                info = bundle.tensors.get(name)
                if info is None or tensor_digest(info) != row["blake2b_128"]:
                    raise CheckpointError(
                        f"{bdir / BUNDLE_FILE}: tensor {name} is missing or its checksum differs "
                        "from the manifest (corrupt bundle)"
                    )
                state[name] = rb.read(name)
    extra = sorted(set(bundle.tensors) - set(state))
    if extra:
        raise CheckpointError(f"{bdir / BUNDLE_FILE}: tensors not in the manifest: {extra[:3]}")
    return state
