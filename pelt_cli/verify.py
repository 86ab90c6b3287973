"""``pelt verify``: check a bundle, a run or a checkpoint without loading a model's weights.

Each check is one row ``{check, status, detail}``, status ``ok``, ``fail``, ``warn`` (passes, with a caveat) or
``skip`` (what it needs is not there, e.g. the base of a bundle exported elsewhere). A check that fails stops the
checks that build on it. Nothing is written (a tar bundle is extracted into a temporary directory, removed after).

* a **bundle**: its files (a tar: no links, devices or paths outside it), the manifest's structure, its digest (and
  ``--expect-digest``), every file's SHA-256, ``bundle.safetensors``'s header, each tensor against its manifest row
  (dtype, shape, BLAKE2b), the recipe; with the base at the manifest's path hint: its fingerprint, the tensors taken
  from it, and the tensor table the recipe and head give on the base's ``meta`` skeleton;
* a **run**: ``run.json`` and its recipe, the safetensors headers of ``adapter.safetensors`` (and
  ``pruned.safetensors``), ``gates.json``; with the base: its fingerprint, and the adapter's tensor table against
  the one the recipe and head give on the skeleton;
* a **checkpoint**: every header (offsets back to back inside the file, dtype × shape = bytes, no trailing bytes),
  the shard index, ``config.json``, and every tensor the config's model needs, with its shape, on the skeleton.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pelt_cli.bundle import (
    BUNDLE_FILE,
    MANIFEST_FILE,
    bundle_run,
    check_tensor_table,
    file_sha256,
    manifest_digest,
    open_bundle,
    parse_digest,
    read_manifest,
    shown_as,
)
from pelt_cli.errors import CheckpointError, PeltError, UsageError
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.guard import is_regular, kind_of
from pelt_cli.io.header import INDEX_NAME
from pelt_cli.run import ADAPTER_FILE, GATES_FILE, PRUNED_FILE, RUN_FILE, Base, Run, check_state

FAILED = object()  # what a failed check gives the checks that would build on its value


class Checks:
    """The rows of a report: each check a callable that returns its value (or raises a PeltError: a failure)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def run(
        self, name: str, fn: Callable[[], Any], detail: Callable[[Any], str] = lambda v: "", failure: str = "fail"
    ) -> Any:
        """Run one check; its value, or :data:`FAILED` (the row's status is ``failure``, its detail the error's)."""
        try:
            value = fn()
        except PeltError as e:
            problems = getattr(e, "problems", None) or [e.message]
            self.add(name, failure, "; ".join(problems))
            return FAILED
        self.add(name, "ok", detail(value))
        return value

    def add(self, name: str, status: str, detail: str) -> None:
        """A row decided by the caller (``warn``, ``skip``)."""
        self.rows.append({"check": name, "status": status, "detail": detail})


def verify_path(path: str | os.PathLike[str], *, expect_digest: str | None = None) -> dict[str, Any]:
    """Check a bundle (directory or tar), a run directory or a checkpoint, whichever ``path`` is.

    Returns:
        ``{path, kind, ok, digest, checks: [{check, status, detail}]}`` (``digest``: a bundle's, else None).

    Raises:
        CheckpointError: ``path`` is missing, or none of the three.
        UsageError: ``expect_digest`` is malformed, or given for something other than a bundle.
    """
    p = Path(path)
    kind = kind_of_target(p)
    if expect_digest is not None:
        parse_digest(expect_digest)
        if kind != "bundle":
            raise UsageError(f"--expect-digest checks a bundle; {p} is a {kind}")
    checks, digest = Checks(), None
    if kind == "bundle":
        digest = verify_bundle(p, checks, expect_digest)
    elif kind == "run":
        verify_run(p, checks)
    else:
        verify_checkpoint(p, checks)
    ok = all(r["status"] != "fail" for r in checks.rows)
    return {"path": str(p), "kind": kind, "ok": ok, "digest": digest, "checks": checks.rows}


def kind_of_target(p: Path) -> str:
    """``bundle``, ``run`` or ``checkpoint``, from what ``p`` holds.

    Raises:
        CheckpointError: missing, a FIFO or device, or a file that is no tar, ``.safetensors`` or shard index.
    """
    if kind_of(p, CheckpointError) == "dir":
        if os.path.lexists(p / RUN_FILE):
            return "run"
        return "bundle" if os.path.lexists(p / MANIFEST_FILE) or os.path.lexists(p / BUNDLE_FILE) else "checkpoint"
    if p.suffix == ".safetensors" or p.name.endswith(".index.json"):
        return "checkpoint"
    try:
        is_tar = tarfile.is_tarfile(p)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot be read ({e.strerror or e})") from None
    if is_tar:
        return "bundle"
    raise CheckpointError(
        f"{p}: not a bundle (a directory or tar), a run directory or a checkpoint (a directory, a .safetensors "
        f"file or {INDEX_NAME})"
    )


def raise_if_failed(report: dict[str, Any]) -> None:
    """Raise the one-line error of a report with a failed check (after its rows were printed).

    Raises:
        CheckpointError: a check failed (exit code 2).
    """
    failed = [r for r in report["checks"] if r["status"] == "fail"]
    if failed:
        first = failed[0]
        raise CheckpointError(
            f"{report['path']}: {len(failed)} of {len(report['checks'])} check(s) failed; first, {first['check']}: "
            f"{first['detail']}"
        )


# ---------------------------------------------------------------------------------------------------- bundles


def verify_bundle(path: Path, checks: Checks, expect: str | None) -> str | None:
    """The checks of a bundle (see the module's docstring); returns its digest (None: it records none)."""
    with tempfile.TemporaryDirectory(prefix="pelt-verify-") as scratch, shown_as(scratch, path):
        bdir = checks.run("bundle", lambda: open_bundle(path, Path(scratch)), _opened(path))
        if bdir is FAILED:
            return None
        manifest = checks.run("manifest", lambda: read_manifest(bdir), _manifest_detail)
        if manifest is FAILED:
            return None
        digest = _digest_checks(checks, manifest, expect)
        for name, want in (manifest.get("files") or {}).items():
            checks.run(f"file {name}", lambda n=name, w=want: _file_matches(bdir / n, w), lambda v: v)
        bundle = checks.run(f"header {BUNDLE_FILE}", lambda: open_checkpoint(bdir / BUNDLE_FILE), _tensor_count)
        if bundle is not FAILED:
            checks.run(
                "tensors",
                lambda: check_tensor_table(bdir, manifest, bundle, None),
                lambda _: (
                    f"{sum(r['stored'] == 'bundle' for r in manifest['tensors'])} stored tensor(s) match their "
                    "rows (dtype, shape, BLAKE2b)"
                ),
            )
        _bundle_base_checks(checks, bdir, manifest, bundle)
    for row in checks.rows:  # messages name the tar, not the temporary directory
        row["detail"] = row["detail"].replace(scratch, str(path))
    return digest


def _opened(path: Path) -> Callable[[Path], str]:
    return lambda d: "a directory" if d == path else "a tar: regular files only, none outside the bundle"


def _manifest_detail(m: dict[str, Any]) -> str:
    head = f"a head of {len(m['head']['labels'])} label(s)" if m.get("head") else "no head"
    return f"format {m['format_version']}: {len(m['insertions'])} insertion(s), {len(m['tensors'])} tensor(s), {head}"


def _tensor_count(ckpt: Any) -> str:
    return f"{len(ckpt.tensors)} tensor(s), {ckpt.total_bytes:,} bytes, offsets back to back, no trailing bytes"


def _digest_checks(checks: Checks, manifest: dict[str, Any], expect: str | None) -> str | None:
    """The recorded digest against the manifest's content, and against ``expect``."""
    got = manifest_digest(manifest)
    recorded = manifest.get("digest")
    if recorded is None:
        checks.add("digest", "fail" if expect else "warn", "none recorded (exported before pelt recorded digests)")
    elif recorded == got:
        checks.add("digest", "ok", got)
    else:
        checks.add("digest", "fail", f"content hashes to {got}, not the recorded {recorded}: changed after export")
    if expect is not None:
        want = parse_digest(expect)
        ok = recorded == got == want
        checks.add("expected digest", "ok" if ok else "fail", want if ok else f"{want} expected, the bundle is {got}")
    return recorded if recorded == got else None


def _file_matches(p: Path, want: str) -> str:
    if not is_regular(p):
        raise CheckpointError(f"{p}: listed in the manifest but missing (or not a regular file)")
    got = file_sha256(p)
    if got != want:
        raise CheckpointError(f"{p}: SHA-256 {got}, the manifest records {want}")
    return got


def _bundle_base_checks(checks: Checks, bdir: Path, manifest: dict[str, Any], bundle: Any) -> None:
    """The recipe; then, with the base at the manifest's path hint: fingerprint, tensors from it, tensor table."""
    from pelt_cli.recipe import Recipe

    where = bdir / MANIFEST_FILE
    recipe = checks.run("recipe", lambda: Recipe.from_dict(manifest["recipe"], str(where)), _recipe_detail)
    hint = manifest["base"].get("path_hint")
    if not isinstance(hint, str) or not os.path.lexists(hint):
        checks.add("base", "skip", f"the base {hint} is not here: fingerprint and tensor table not checked")
        return
    base = _base_check(checks, hint, manifest["base"]["fingerprint"], "warn")  # only a hint: not the bundle's fault
    if base is FAILED or recipe is FAILED or bundle is FAILED:
        return
    checks.run(
        "base tensors",
        lambda: check_tensor_table(bdir, manifest, bundle, base.ckpt),
        lambda _: f"{sum(r['stored'] == 'base' for r in manifest['tensors'])} tensor(s) taken from the base match",
    )
    shapes = {r["name"]: SimpleNamespace(shape=tuple(r["shape"])) for r in manifest["tensors"]}
    checks.run("tensor table", lambda: _fits(bundle_run(manifest, base, where, None)[1], shapes, where), str)


def _recipe_detail(recipe: Any) -> str:
    return f"{recipe.name}: {len(recipe.inserts)} insert(s), valid"


def _base_check(checks: Checks, path: str, fingerprint: str, failure: str = "fail") -> Any:
    """Open the base and compare its content fingerprint with the recorded one (a mismatch's status: ``failure``)."""

    def check() -> Base:
        base = Base.open(path)
        if base.fingerprint() != fingerprint:
            raise CheckpointError(f"{path}: fingerprint {base.fingerprint()}, not the recorded {fingerprint}")
        return base

    return checks.run("base", check, lambda b: f"{path}: fingerprint {fingerprint} matches", failure)


def _fits(model: Any, shapes: dict[str, Any], where: Path) -> str:
    check_state(shapes, model, where)
    return f"{len(shapes)} tensor(s): the names and shapes the recipe and head give on the base's skeleton"


# ---------------------------------------------------------------------------------------------------- runs


def verify_run(path: Path, checks: Checks) -> None:
    """The checks of a run directory (see the module's docstring)."""
    run = checks.run(RUN_FILE, lambda: _open_run(path), _run_detail)
    if run is FAILED:
        return
    adapter = checks.run(f"header {ADAPTER_FILE}", lambda: open_checkpoint(run.path(ADAPTER_FILE)), _tensor_count)
    if os.path.lexists(run.path(PRUNED_FILE)):
        checks.run(f"header {PRUNED_FILE}", lambda: open_checkpoint(run.path(PRUNED_FILE)), _tensor_count)
    if os.path.lexists(run.path(GATES_FILE)):
        checks.run(GATES_FILE, run.gates, lambda g: "valid JSON" if isinstance(g, dict) else "not an object")
    if not os.path.lexists(run.meta.base.path):
        checks.add("base", "skip", f"the base {run.meta.base.path} is not here: tensor table not checked")
        return
    base = _base_check(checks, run.meta.base.path, run.meta.base.fingerprint)
    if base is FAILED or adapter is FAILED:
        return
    shapes = {n: SimpleNamespace(shape=i.shape) for n, i in adapter.tensors.items()}

    def table() -> str:
        model, rows = run.skeleton(base)
        run.check_rows(rows, base)
        return _fits(model, shapes, run.path(ADAPTER_FILE))

    checks.run("tensor table", table, str)


def _open_run(path: Path) -> Run:
    """``run.json`` read and its recipe validated (by :meth:`Run.open`), and its head spec checked."""
    return Run.open(path)  # run.json through the boundary: text, structure, base strings and head spec


def _run_detail(run: Run) -> str:
    head = f", head {len(run.head['labels'])} labels" if run.head and run.head.get("labels") else ""
    return f"recipe {run.recipe.name}, {len(run.insertions)} insertion(s){head}"


# ---------------------------------------------------------------------------------------------------- checkpoints


def verify_checkpoint(path: Path, checks: Checks) -> None:
    """The checks of a checkpoint (see the module's docstring)."""
    ckpt = checks.run("headers", lambda: open_checkpoint(path), _headers_detail)
    if ckpt is FAILED:
        return
    if not ckpt.config:
        checks.add("config.json", "skip", "none beside the weights: the tensors a model needs are not checked")
        return
    base = Base(ckpt)
    checks.run("weights", base.verify, lambda n: f"{n:,} tensor(s) the config's model needs, each with its shape")


def _headers_detail(ckpt: Any) -> str:
    shards = f" in {len(ckpt.files)} shard(s), index consistent" if ckpt.sharded else ""
    return f"{len(ckpt.tensors):,} tensor(s){shards}; offsets back to back inside each file, no trailing bytes"
