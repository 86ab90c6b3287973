"""``pelt export``: diffed adapter bundles (PEFT adapters: :mod:`pelt_cli.peft_format`), content-addressed.

A bundle is a directory holding two files (plus, with ``--peft``, a PEFT adapter's two files beside them, and the
run's tokenizer files):

* ``bundle.safetensors``: the run's tensors that are new relative to its base. A run tensor whose bytes equal a base
  tensor (by BLAKE2b digest, e.g. a buffer of ones equal to a LayerNorm weight) is left out and referenced by name;
* ``manifest.json``: format version, pelt version, the base (content and structure fingerprints, a path hint,
  family, class), the resolved recipe, the insertions, the task head, gate statistics (``gates.json``), every
  tensor with dtype, shape, BLAKE2b-128 checksum and where it is stored (``bundle`` or ``base``), the SHA-256 of
  every other file of the bundle (``files``) and the bundle's ``digest``.

The digest is ``sha256:`` + SHA-256 of the canonical manifest (:func:`canonical_manifest`: sorted keys, no spaces,
ASCII) without the fields that say when, where and by which pelt version it was made (``digest``, ``created``,
``pelt_version``, ``base.path_hint``). Through ``files`` it covers every byte of every file, so any change to the
recipe, labels, head, tensor table or tensor bytes changes it; exporting the same run twice gives the same digest.

``export_bundle(run, "-", stream=f)`` writes the same files as an uncompressed tar stream (members at the top
level, ``manifest.json`` first), so ``pelt export RUN -o - | tar -x -C DIR`` gives the bundle directory.
:func:`apply_bundle` checks the digest and every file, then rebuilds a run directory on a base whose fingerprint
matches (or any base with ``force``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from pelt_cli import __version__
from pelt_cli.errors import BaseMismatch, CheckpointError, PeltError, RecipeError, UsageError
from pelt_cli.headspec import check_head, is_int, kind_name
from pelt_cli.io.atomic import atomic_dir, guard_output
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.fingerprint import HASH_CHUNK, tensor_digest
from pelt_cli.io.guard import is_regular, kind_of, load_json, open_regular
from pelt_cli.io.header import DTYPE_SIZES
from pelt_cli.io.reader import TensorReader
from pelt_cli.io.writer import save_file
from pelt_cli.recipe import Recipe
from pelt_cli.run import ADAPTER_FILE, GATES_FILE, TOKENIZER_FILES, Base, PlanRow, Run, check_state, now

BUNDLE_FILE = "bundle.safetensors"
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = 1
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")  # pelt_cli.peft_format's PEFT_CONFIG, PEFT_WEIGHTS
BUNDLE_FILES = (MANIFEST_FILE, BUNDLE_FILE, *PEFT_FILES, *TOKENIZER_FILES)  # what a bundle may hold
UNSIGNED = ("digest", "created", "pelt_version")  # provenance, not content: outside the digest (and base.path_hint)
MAX_MANIFEST = 64 * 1024 * 1024
DIGEST_RE = re.compile(r"(sha256:)?([0-9a-f]{64})")
LEGACY_KEYS = set(  # the keys of a manifest exported before digests
    "format format_version pelt_version created base recipe new_params insertions head gates tensors tokenizer".split()
)
NO_DIGEST_HINT = "re-export the run with this pelt to get a digest"


# ---------------------------------------------------------------------------------------------------- digests


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes the digest hashes: the manifest without its unsigned fields, as JSON with sorted keys, no spaces,
    ASCII (``\\uXXXX`` escapes; floats as Python writes them, which read back exactly)."""
    doc = {k: v for k, v in manifest.items() if k not in UNSIGNED}
    if isinstance(doc.get("base"), dict):
        doc["base"] = {k: v for k, v in doc["base"].items() if k != "path_hint"}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("ascii")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """``sha256:<hex>`` of :func:`canonical_manifest`: the bundle's content address."""
    return "sha256:" + hashlib.sha256(canonical_manifest(manifest)).hexdigest()


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, streamed in chunks (memory stays flat)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def parse_digest(value: str) -> str:
    """A digest given on the command line (``sha256:<hex>`` or the 64 hex digits alone) in the manifest's form.

    Raises:
        UsageError: not a SHA-256 digest.
    """
    found = DIGEST_RE.fullmatch(value.strip().lower())
    if not found:
        raise UsageError(f"--expect-digest {value!r}: expected sha256:<64 hex digits> (as pelt export prints it)")
    return "sha256:" + found.group(2)


def check_digest(bdir: Path, manifest: dict[str, Any], expect: str | None = None) -> str | None:
    """Check the manifest's digest against its content (and ``expect``, a digest published separately), then every
    file it lists against its SHA-256. Returns the digest, or None for a bundle exported before digests.

    Raises:
        CheckpointError: a digest or file that differs, a file missing, or ``expect`` given for a bundle without one.
    """
    where = bdir / MANIFEST_FILE
    if "digest" not in manifest:
        if expect is not None:
            raise CheckpointError(
                f"{where}: no digest (exported before pelt recorded one), so --expect-digest cannot be checked",
                hint=NO_DIGEST_HINT,
            )
        return None
    got = manifest_digest(manifest)
    if manifest["digest"] != got:
        raise CheckpointError(
            f"{where}: content hashes to {got}, not the digest it records ({manifest['digest']}): the bundle was "
            "changed after export"
        )
    if expect is not None and parse_digest(expect) != got:
        raise CheckpointError(f"{where}: digest {got} is not the expected {parse_digest(expect)}")
    for name, want in manifest["files"].items():
        p = bdir / name
        if not is_regular(p):
            raise CheckpointError(f"{p}: listed in the manifest but missing (or not a regular file)")
        if file_sha256(p) != want:
            raise CheckpointError(f"{p}: its SHA-256 differs from the manifest's (the bundle was changed after export)")
    return got


# ---------------------------------------------------------------------------------------------------- the manifest


def _bad(where: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}")


def read_manifest(bdir: Path) -> dict[str, Any]:
    """``manifest.json`` of a bundle directory, read and checked (type, encoding, size and structure).

    Raises:
        CheckpointError: missing, not a regular file, too large, not UTF-8 JSON, or not a pelt bundle manifest.
    """
    p = bdir / MANIFEST_FILE
    if not os.path.lexists(p):
        raise CheckpointError(
            f"{bdir}: not a pelt bundle (no {MANIFEST_FILE})", hint="pelt export RUN -o BUNDLE writes one"
        )
    doc = load_json(p, "a bundle manifest", CheckpointError, expect=None, limit=MAX_MANIFEST)  # lone surrogates too
    check_manifest(doc, p)
    return doc


def check_manifest(doc: Any, where: Path) -> None:
    """Raise unless ``doc`` has the structure of a pelt bundle manifest (every field pelt reads, with its type).

    Raises:
        CheckpointError: the first problem found, naming the field and what was expected.
    """
    if not isinstance(doc, dict):
        raise _bad(where, f"a JSON {kind_name(doc)}, expected an object (a pelt bundle manifest)")
    if doc.get("format") != "pelt-bundle":
        raise _bad(where, f"format {doc.get('format')!r}: expected 'pelt-bundle' (not a pelt bundle manifest)")
    version = doc.get("format_version")
    if not is_int(version) or version < 1:
        raise _bad(where, f"format_version {version!r}: expected a positive integer")
    if version > BUNDLE_FORMAT:
        raise CheckpointError(
            f"{where}: bundle format {version} is newer than this pelt understands ({BUNDLE_FORMAT})",
            hint="upgrade pelt",
        )
    base = doc.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise _bad(where, f"base {kind_name(base)}: expected an object with the base's fingerprint (a string)")
    for key, kind in (("recipe", dict), ("insertions", list), ("tensors", list)):
        if not isinstance(doc.get(key), kind):
            raise _bad(where, f"{key}: a {kind_name(doc.get(key))}, expected a {kind_name(kind())}")
    if not doc["insertions"]:
        raise _bad(where, "insertions: empty; a pelt bundle carries at least one inserted module")
    for i, row in enumerate(doc["insertions"]):
        _check_insertion(row, f"{where}: insertions[{i}]")
    check_head(doc.get("head"), where)
    _check_tensor_rows(doc["tensors"], where)
    _check_extras(doc, where)


INSERTION_FIELDS = {"entry": int, "method": str, "site": str, "disk_site": str, "role": str, "block": str}


def _check_insertion(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise CheckpointError(f"{where}: a {kind_name(row)}, expected an object")
    for key, kind in (*INSERTION_FIELDS.items(), ("new_params", int)):
        value = row.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{where}.{key}: {value!r}, expected a {kind_name(kind())}")
    if "layer" not in row or not (row["layer"] is None or is_int(row["layer"])):
        raise CheckpointError(f"{where}.layer: {row.get('layer')!r}, expected an integer or null")
    modules = row.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{where}.modules: expected a list of strings")


def _check_tensor_rows(rows: list[Any], where: Path) -> None:
    seen: set[str] = set()
    for i, row in enumerate(rows):
        at = f"tensors[{i}]"
        if not isinstance(row, dict):
            raise _bad(where, f"{at}: a {kind_name(row)}, expected an object")
        name, dtype, shape = row.get("name"), row.get("dtype"), row.get("shape")
        if not isinstance(name, str) or not name or name in seen:
            raise _bad(where, f"{at}.name: {name!r}, expected a tensor name not given before")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _bad(where, f"{at}.dtype: {dtype!r}, expected one of {', '.join(DTYPE_SIZES)}")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            raise _bad(where, f"{at}.shape: {shape!r}, expected a list of non-negative integers")
        if not isinstance(row.get("blake2b_128"), str):
            raise _bad(where, f"{at}.blake2b_128: {row.get('blake2b_128')!r}, expected a checksum string")
        stored = row.get("stored")
        if stored not in ("bundle", "base"):
            raise _bad(where, f"{at}.stored: {stored!r}, expected 'bundle' or 'base'")
        if stored == "base" and not isinstance(row.get("base_tensor"), str):
            raise _bad(where, f"{at}.base_tensor: {row.get('base_tensor')!r}, expected the base tensor's name")


def _check_extras(doc: dict[str, Any], where: Path) -> None:
    """``tokenizer``, ``gates``, ``files`` and ``digest``: optional, but typed when present."""
    tok = doc.get("tokenizer", [])
    if not isinstance(tok, list) or not all(isinstance(n, str) and n in TOKENIZER_FILES for n in tok):
        raise _bad(where, f"tokenizer: {tok!r}, expected a list of tokenizer file names")
    if not isinstance(doc.get("gates") or {}, dict):
        raise _bad(where, f"gates: a {kind_name(doc['gates'])}, expected an object or null")
    if "digest" not in doc:  # a bundle from before digests has exactly the keys pelt wrote then
        odd = sorted(set(doc) - LEGACY_KEYS)
        if odd:
            raise _bad(where, f"no digest, and keys a bundle exported before digests never has: {odd[:3]}")
        return
    if not isinstance(doc["digest"], str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", doc["digest"]):
        raise _bad(where, f"digest: {doc['digest']!r}, expected sha256:<64 hex digits>")
    files = doc.get("files")
    if not isinstance(files, dict) or BUNDLE_FILE not in files:
        raise _bad(where, f"files: expected an object of file name → sha256 that lists {BUNDLE_FILE}")
    for name, value in files.items():
        if name not in BUNDLE_FILES or name == MANIFEST_FILE or not isinstance(value, str):
            raise _bad(where, f"files: {name!r} → {value!r} is not a bundle file with its sha256")
    missing = [n for n in tok if n not in files]
    if missing:
        raise _bad(where, f"files: the tokenizer files {missing} have no sha256")


# ---------------------------------------------------------------------------------------------------- export


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
        The manifest, with its ``digest``.
    """
    run = Run.open(run_dir)
    if str(out) != "-":
        guard_output(out, force, [run.dir, run.meta.base.path])  # never the run itself, nor inside it or its base
    if os.path.exists(run.meta.base.path):
        run.base()  # a base whose content changed since the run was made is refused, as by every command
    adapter = open_checkpoint(run.path(ADAPTER_FILE))
    digests = {n: tensor_digest(i) for n, i in adapter.tensors.items()}
    refs = _base_refs(run, adapter, digests)
    manifest = _manifest(run, adapter, digests, refs)
    tokenizer = run.tokenizer_files()  # the tokenizer travels with the bundle
    manifest["tokenizer"] = [f.name for f in tokenizer]
    files = [BUNDLE_FILE, *manifest["tokenizer"], *(PEFT_FILES if peft else ())]
    peft_files = _peft_adapter(run) if peft else None  # refuses before anything is written

    def fill(d: Path) -> None:
        with TensorReader(adapter) as r:
            keep = {n: r.read(n) for n in sorted(adapter.tensors) if n not in refs}
        save_file(keep, d / BUNDLE_FILE, metadata={"pelt_bundle_format": str(BUNDLE_FORMAT)})
        if peft_files is not None:
            from pelt_cli.peft_format import write_peft

            write_peft(d, *peft_files)
        for f in tokenizer:
            shutil.copy2(f, d / f.name)
        sign(d, manifest, files)

    if str(out) == "-":
        if stream is None:
            raise UsageError("export to '-' needs a binary stream to write the tar to")
        with tempfile.TemporaryDirectory(prefix="pelt-bundle-") as d:
            fill(Path(d))
            _tar(Path(d), [MANIFEST_FILE, *files], stream)
        return manifest
    out = Path(out)
    with atomic_dir(out, force) as tmp:
        fill(tmp)
    return manifest


def _peft_adapter(run: Run) -> Any:
    from pelt_cli.peft_format import peft_adapter

    return peft_adapter(run)


def sign(d: Path, manifest: dict[str, Any], files: list[str]) -> None:
    """Record the SHA-256 of the bundle's ``files`` (written in ``d``) and the digest, then write the manifest."""
    manifest["files"] = {name: file_sha256(d / name) for name in files}
    manifest["digest"] = manifest_digest(manifest)
    (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


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


# ---------------------------------------------------------------------------------------------------- opening


def open_bundle(path: str | os.PathLike[str], scratch: Path, stream: BinaryIO | None = None) -> Path:
    """A bundle directory: ``path`` itself, or a tar of one (a file, or ``"-"``: the tar read from ``stream``)
    extracted into ``scratch``: only the bundle's own files, as plain files.

    Raises:
        CheckpointError: no such path, not a directory or regular file, not a tar, a truncated tar, or a tar with
            links, devices, absolute paths or ``..`` in a member's name.
    """
    if str(path) == "-":
        if stream is None:
            raise UsageError("BUNDLE - reads a tar from stdin, but there is no stdin stream")
        _extract(stream, "<stdin>", scratch)
        return scratch
    p = Path(path)
    if kind_of(p, CheckpointError) == "dir":
        return p
    with open_regular(p, "a bundle (a directory, or a tar of one)", CheckpointError) as f:
        _extract(f, str(p), scratch)
    return scratch


@contextmanager
def shown_as(scratch: str | os.PathLike[str], bundle: str | os.PathLike[str]) -> Iterator[None]:
    """Errors about the files of a tar extracted into ``scratch`` name the tar (or ``<stdin>``) instead."""
    try:
        yield
    except PeltError as e:
        label = "<stdin>" if str(bundle) == "-" else str(bundle)
        e.message = e.message.replace(str(scratch), label)
        e.args = (e.message,)
        if isinstance(e, RecipeError):
            e.problems = [p.replace(str(scratch), label) for p in e.problems]
        raise


def _extract(src: BinaryIO, where: str, scratch: Path) -> None:
    """Copy the bundle files of a tar stream into ``scratch``, refusing what a bundle never holds."""
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=src, mode="r|") as tar:
            for member in tar:
                name = _member_name(member, where)
                if name is None:
                    continue
                if name in seen:
                    raise CheckpointError(f"{where}: the tar holds {name} twice")
                seen.add(name)
                data = tar.extractfile(member)
                with open(scratch / name, "wb") as out:
                    shutil.copyfileobj(data, out, HASH_CHUNK)
    except (tarfile.TarError, EOFError) as e:
        raise CheckpointError(
            f"{where}: not a readable tar ({e or 'truncated'})", hint="pelt export RUN -o - writes a bundle as a tar"
        ) from None
    if not seen:
        raise CheckpointError(f"{where}: the tar holds no bundle files ({MANIFEST_FILE}, {BUNDLE_FILE}, …)")


def _member_name(member: tarfile.TarInfo, where: str) -> str | None:
    """The bundle file a tar member is (None: a directory, or a file a bundle does not use)."""
    parts = [x for x in PurePosixPath(member.name).parts if x != "."]
    if member.name.startswith("/") or ".." in parts:
        raise CheckpointError(f"{where}: tar member {member.name!r} points outside the bundle")
    if member.isdir():
        return None
    if not member.isfile():
        raise CheckpointError(f"{where}: tar member {member.name!r} is a link or device, not a regular file")
    if len(parts) > 2 or not parts or parts[-1] not in BUNDLE_FILES:
        return None  # a bundle's files sit at the top level, or inside one folder (tar -cf b.tar bundle/)
    return parts[-1]


# ---------------------------------------------------------------------------------------------------- apply


def _tokenizer_files(bdir: Path, manifest: dict[str, Any], keep: Path) -> list[Path]:
    """The tokenizer files the manifest lists, copied out of the bundle (which may be a temporary extraction)."""
    names = [n for n in manifest.get("tokenizer") or [] if is_regular(bdir / n)]
    keep.mkdir(exist_ok=True)
    for n in names:
        shutil.copy2(bdir / n, keep / n)
    return [keep / n for n in names]


def _check_base(base: Base, manifest: dict[str, Any], model: Any, force: bool) -> None:
    want = manifest["base"]
    if base.fingerprint() != want["fingerprint"] and not force:
        raise BaseMismatch(
            f"{model}: fingerprint {base.fingerprint()} differs from the bundle's base "
            f"{want['fingerprint']} (exported from {want.get('path_hint')})",
            hint="pass the base the bundle was exported from, or --force to use this one anyway",
        )


def load_bundle(
    bundle: str | os.PathLike[str], scratch: Path, *, expect_digest: str | None = None, stream: BinaryIO | None = None
) -> tuple[Path, dict[str, Any], str | None]:
    """Open a bundle (directory, tar file or ``"-"``) and check it before anything else reads it.

    Returns:
        ``(directory, manifest, digest)``; the digest is None for a bundle exported before digests.

    Raises:
        CheckpointError: see :func:`open_bundle`, :func:`read_manifest` and :func:`check_digest`.
    """
    if expect_digest is not None:
        parse_digest(expect_digest)  # a malformed value is refused before any file is read
    bdir = open_bundle(bundle, scratch, stream)
    manifest = read_manifest(bdir)
    return bdir, manifest, check_digest(bdir, manifest, expect_digest)


def apply_bundle(
    bundle_dir: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    expect_digest: str | None = None,
    stream: BinaryIO | None = None,
) -> Path:
    """Rebuild a run directory from a bundle and a base checkpoint.

    Args:
        bundle_dir: a bundle directory, a tar of one, or ``"-"`` (a tar read from ``stream``).
        model: the base checkpoint to put the run on.
        out: the run directory to create.
        force: accept a base whose fingerprint differs from the bundle's (and replace an existing ``out``).
        expect_digest: the digest the bundle must have (``sha256:<hex>``, published apart from the bundle).
        stream: the binary stream ``"-"`` reads (the CLI passes ``sys.stdin.buffer``).

    Returns:
        The run directory; its ``run.json`` records the bundle's digest under ``from_bundle`` (None for a bundle
        exported before digests).

    Raises:
        BaseMismatch: the base's fingerprint differs from the bundle's (without ``force``), or a tensor the bundle
            takes from the base has other content there (always).
        CheckpointError: a changed or corrupt bundle (digest, file or tensor checksum mismatch), a malformed one, or
            one that does not fit the base's structure.
    """
    out = guard_output(out, force, [model, None if str(bundle_dir) == "-" else bundle_dir])
    base = Base.open(model)
    with tempfile.TemporaryDirectory(prefix="pelt-bundle-") as scratch, shown_as(scratch, bundle_dir):
        bdir, manifest, digest = load_bundle(bundle_dir, Path(scratch), expect_digest=expect_digest, stream=stream)
        where = bdir / MANIFEST_FILE
        _check_base(base, manifest, model, force)
        state = bundle_tensors(bdir, manifest, base.ckpt)
        tokenizer = _tokenizer_files(bdir, manifest, Path(scratch) / "tok")
        run, skel, rows = bundle_run(manifest, base, where, digest)
        check_state(state, skel, where)
        run.meta.new_params, run.meta.insertions = sum(r.new_params for r in rows), rows
        run.meta.base.model_class = type(base.skeleton()).__name__
        gates = {GATES_FILE: json.dumps(manifest["gates"], indent=2) + "\n"} if manifest.get("gates") else {}
        if tokenizer:  # the run keeps the bundle's tokenizer, and merge copies it from there
            run.meta.extra["tokenizer"] = str(out.resolve())
        return run.write(out, state, force=force, note="rebuilt from a pelt bundle", files=gates, copy_files=tokenizer)


def bundle_run(manifest: dict[str, Any], base: Base, where: Path, digest: str | None) -> tuple[Run, Any, list]:
    """The run a manifest describes, on ``base`` (not yet written), its ``meta`` skeleton with the modules and head
    inserted, and the insertion rows, checked against the manifest's.

    Raises:
        CheckpointError: the manifest's recipe is not valid (every problem on one line), or its insertions differ
            from what its recipe inserts on this base.
    """
    try:
        recipe = Recipe.from_dict(manifest["recipe"], str(where))
    except RecipeError as e:  # one line for the bundle, as every other problem of its manifest
        raise CheckpointError("; ".join(e.problems), hint=e.hint) from None
    provenance = {"base_fingerprint": manifest["base"]["fingerprint"], "created": manifest.get("created")}
    rows = [PlanRow.from_dict(r) for r in manifest["insertions"]]
    run = Run.create(base, recipe, rows, "", 0, from_bundle={**provenance, "digest": digest})
    run.meta.head = manifest.get("head")
    skel, rows = run.skeleton(base)
    run.check_rows(rows, base)
    return run, skel, rows


def bundle_tensors(bdir: Path, manifest: dict[str, Any], ckpt: Any) -> dict[str, Any]:
    """Every run tensor, from the bundle file or the base, each checked against its manifest row (dtype, shape and
    checksum) before it is read.

    Raises:
        CheckpointError: a tensor of the bundle file missing, extra, or not as its row says.
        BaseMismatch: a tensor the bundle takes from the base that the base lacks or holds with other content.
    """
    bundle = open_checkpoint(bdir / BUNDLE_FILE)
    check_tensor_table(bdir, manifest, bundle, ckpt)
    state = {}
    with TensorReader(bundle) as rb, TensorReader(ckpt) as rbase:
        for row in manifest["tensors"]:
            if row["stored"] == "base":
                state[row["name"]] = rbase.read(row["base_tensor"])
            else:
                state[row["name"]] = rb.read(row["name"])
    return state


def check_tensor_table(bdir: Path, manifest: dict[str, Any], bundle: Any, ckpt: Any | None) -> None:
    """Each manifest row against the tensor it names (in the bundle file, or in the base ``ckpt`` when given): the
    same dtype, shape and BLAKE2b-128 checksum; and no tensor in the bundle file that no row names.

    Raises:
        CheckpointError / BaseMismatch: as :func:`bundle_tensors`.
    """
    where = bdir / BUNDLE_FILE
    for row in manifest["tensors"]:
        name = row["name"]
        if row["stored"] == "base":
            if ckpt is None:
                continue
            info = ckpt.tensors.get(row["base_tensor"])
            if (
                info is None
                or (info.dtype, list(info.shape)) != (row["dtype"], row["shape"])
                or tensor_digest(info) != row["blake2b_128"]
            ):
                raise BaseMismatch(
                    f"the bundle takes {name} from the base tensor {row['base_tensor']}, which "
                    "this base lacks or holds with other content; no --force can supply it"
                )
            continue
        info = bundle.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{where}: tensor {name} is missing (corrupt bundle)")
        if (info.dtype, list(info.shape)) != (row["dtype"], row["shape"]):
            raise CheckpointError(
                f"{where}: tensor {name} is {info.dtype} {list(info.shape)} but the manifest says "
                f"{row['dtype']} {row['shape']}"
            )
        if tensor_digest(info) != row["blake2b_128"]:
            raise CheckpointError(f"{where}: tensor {name}: its checksum differs from the manifest (corrupt bundle)")
    extra = sorted(set(bundle.tensors) - {r["name"] for r in manifest["tensors"] if r["stored"] == "bundle"})
    if extra:
        raise CheckpointError(f"{where}: tensors not in the manifest: {extra[:3]}")
