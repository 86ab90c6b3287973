"""Fuzzed bundles: ≥ 300 seeded mutations of a bundle's manifest, tensor file and tar, through ``pelt apply-bundle``
and ``pelt verify`` in this process.

For every case: exit 0 or 2; on 2 exactly one ``error:`` line (a ``hint:`` may follow) and no traceback; nothing
written on failure and no temporary file left anywhere; the inputs unchanged; ``verify`` agrees with
``apply-bundle``; and a change to the signed content that was not re-signed (as a forger would) is always refused.
``PELT_FUZZ_N=3000`` runs more cases; ``PELT_FUZZ_SEED`` picks another sequence.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import pelt_main
from test_verify import env, pelt_bytes  # noqa: F401 - env is the module's fixture

from pelt_cli.bundle import BUNDLE_FILE, MANIFEST_FILE, canonical_manifest, file_sha256, manifest_digest

N = int(os.environ.get("PELT_FUZZ_N", "300"))
SEED = int(os.environ.get("PELT_FUZZ_SEED", "11"))
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**63 - 1,  # 2**64 as recipe.seed trips torch.manual_seed: the recipe validator's to bound (reported)
    -0.5,
    1e308,
    float("nan"),
    "",
    "x",
    "F16",
    "bundle",
    "base",
    "../../etc/passwd",
    "é" * 3,
    "\ud800",  # a lone surrogate: valid JSON, not text
    [],
    {},
    [[]],
    {"a": 1},
    [1, "a", None],
    "sha256:" + "0" * 64,
]


# ---------------------------------------------------------------------------------------------------- mutators


def _nodes(doc: Any, out: list | None = None) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON document."""
    out = [] if out is None else out
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        out.append((doc, k))
        _nodes(v, out)
    return out


def mutate_json(doc: dict, rng: random.Random) -> None:
    """One structural change somewhere in the manifest: delete, replace with an odd value, reverse, nudge."""
    parent, key = rng.choice(_nodes(doc))
    value, op = parent[key], rng.choice(["delete", "replace", "replace", "reverse", "nudge", "wrap"])
    if op == "delete":
        del parent[key]
    elif op == "reverse" and isinstance(value, list | str) and len(value) > 1:
        parent[key] = value[::-1]
    elif op == "nudge" and isinstance(value, int | float) and not isinstance(value, bool):
        parent[key] = value + rng.choice([1, -1, 0.5, -value - 1])
    elif op == "wrap":
        parent[key] = [value] if rng.random() < 0.5 else {"v": value}
    else:
        parent[key] = rng.choice(ODD_VALUES)


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    """Flip, cut, grow or splice bytes."""
    b = bytearray(raw)
    op = rng.choice(["flip", "flip", "cut", "append", "insert", "zero"])
    at = rng.randrange(max(1, len(b)))
    if op == "flip" and b:
        b[at] ^= 1 << rng.randrange(8)
    elif op == "cut":
        del b[at:]
    elif op == "append":
        b += rng.randbytes(rng.randrange(1, 64))
    elif op == "insert":
        b[at:at] = rng.choice([b"\xff", b"\xc3", b"\x00", b"[", b"}", rng.randbytes(8)])
    else:
        b[at : at + 8] = bytes(len(b[at : at + 8]))
    return bytes(b)


def resign(bundle: Path) -> None:
    """Record the bundle file's new SHA-256 and the manifest's new digest, as a forger would."""
    try:
        m = json.loads((bundle / MANIFEST_FILE).read_text())
        m["files"][BUNDLE_FILE] = file_sha256(bundle / BUNDLE_FILE)
        m["digest"] = manifest_digest(m)
    except (ValueError, TypeError, KeyError, AttributeError, OSError, IndexError):
        return  # a manifest too broken to sign stays as it is
    (bundle / MANIFEST_FILE).write_text(json.dumps(m))


def _json_case(bundle: Path, rng: random.Random, signed: bool) -> None:
    m = json.loads((bundle / MANIFEST_FILE).read_text())
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        mutate_json(m, rng)
    if signed and isinstance(m, dict):
        m["digest"] = manifest_digest(m)
    (bundle / MANIFEST_FILE).write_text(json.dumps(m, indent=rng.choice([None, 2])))


def _manifest_bytes_case(bundle: Path, rng: random.Random, signed: bool) -> None:
    p = bundle / MANIFEST_FILE
    if rng.random() < 0.15:
        p.write_bytes(rng.choice([b"", b"[]", b"null", b"\xef\xbb\xbf{}", b"[" * 5000, p.read_text().encode("utf-16")]))
    else:
        p.write_bytes(mutate_bytes(p.read_bytes(), rng))


def _tensor_file_case(bundle: Path, rng: random.Random, signed: bool) -> None:
    p = bundle / BUNDLE_FILE
    p.write_bytes(mutate_bytes(p.read_bytes(), rng))
    if signed:
        resign(bundle)


def _files_case(bundle: Path, rng: random.Random, signed: bool) -> None:
    op = rng.choice(["drop", "extra", "swap", "dir"])
    if op == "drop":
        rng.choice([bundle / MANIFEST_FILE, bundle / BUNDLE_FILE]).unlink()
    elif op == "extra":  # a file the manifest does not list: ignored, never used
        (bundle / rng.choice(["tokenizer.json", "README.md", "vocab.txt"])).write_bytes(rng.randbytes(32))
    elif op == "swap":
        (bundle / BUNDLE_FILE).write_bytes((bundle / MANIFEST_FILE).read_bytes())
    else:
        (bundle / BUNDLE_FILE).unlink()
        (bundle / BUNDLE_FILE).mkdir()


CASES: list[tuple[str, Callable[[Path, random.Random, bool], None]]] = [
    ("json", _json_case),
    ("json", _json_case),
    ("json", _json_case),
    ("manifest-bytes", _manifest_bytes_case),
    ("tensor-file", _tensor_file_case),
    ("files", _files_case),
]


def tar_of(bundle: Path, rng: random.Random) -> bytes:
    """The bundle's files as a tar (in a random order, sometimes under a folder), sometimes damaged."""
    buf = io.BytesIO()
    names = sorted(p.name for p in bundle.iterdir() if p.is_file())
    rng.shuffle(names)
    prefix = rng.choice(["", "", "bundle/", "./"])
    with tarfile.open(fileobj=buf, mode="w", format=rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])) as tar:
        for n in names:
            tar.add(bundle / n, arcname=prefix + n)
    raw = buf.getvalue()
    return mutate_bytes(raw, rng) if rng.random() < 0.3 else raw


# ---------------------------------------------------------------------------------------------------- the harness


def tree_hash(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def check_result(r: Any, what: str) -> None:
    """Exit 0 or 2; on 2 one ``error:`` line (and at most a ``hint:``), never a traceback."""
    assert r.returncode in (0, 2), (what, r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, (what, r.stderr[-2000:])
    r.stdout.encode("utf-8")  # a real stdout is strict UTF-8: what is printed must encode
    lines = r.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    if r.returncode == 2:
        assert len(errors) == 1, (what, r.stderr)
        assert not [ln for ln in lines if ln.startswith(("warning:", "wrote"))], (what, r.stderr)
    else:
        assert not errors, (what, r.stderr)


def run_case(i: int, paths: dict[str, Path], work: Path, tmp: Path) -> tuple[str, int, bool]:
    """One fuzz case; returns its kind, apply-bundle's exit code and whether the signed content changed."""
    rng = random.Random(SEED * 100_003 + i)
    kind, mutate = rng.choice(CASES)
    signed = rng.random() < 0.4
    bundle = Path(shutil.copytree(paths["bundle"], work / f"b{i}"))
    mutate(bundle, rng, signed)
    changed = _content_changed(paths["bundle"], bundle)
    target, stdin = bundle, None
    if rng.random() < 0.25 and not (bundle / BUNDLE_FILE).is_dir():
        kind, raw = kind + "+tar", tar_of(bundle, rng)  # a damaged tar may still extract to the same files
        (work / f"b{i}.tar").write_bytes(raw)
        target, stdin = (work / f"b{i}.tar", None) if rng.random() < 0.5 else ("-", raw)
    before = [tree_hash(p) for p in (bundle, Path(target)) if p.exists()]
    out = work / f"out{i}"
    args = ("apply-bundle", str(target), str(paths["base"]), "-o", str(out))
    r = pelt_bytes(*args, stdin=stdin) if stdin is not None else pelt_main(*args)
    what = f"case {i} ({kind}{', signed' if signed else ''})"
    check_result(r, what)
    assert out.exists() == (r.returncode == 0), what
    assert not [p for p in work.iterdir() if ".pelt-" in p.name], what
    assert not list(tmp.iterdir()), (what, list(tmp.iterdir()))
    assert [tree_hash(p) for p in (bundle, Path(target)) if p.exists()] == before, what
    if changed and not signed:
        assert r.returncode == 2, (what, "an unsigned change was accepted", r.stderr)
    if stdin is None:
        v = pelt_main("verify", str(target), "--format", "jsonl")
        check_result(v, what + " verify")
        base_warned = '"check": "base", "status": "warn"' in v.stdout  # another base at the manifest's path hint
        assert v.returncode == r.returncode or (base_warned and "bundle's base" in r.stderr), (what, r.stderr, v.stdout)
        assert not list(tmp.iterdir()), what
    shutil.rmtree(out, ignore_errors=True)
    return kind, r.returncode, changed


def _content_changed(good: Path, bundle: Path) -> bool:
    """Whether the signed content differs: the canonical manifest, or the bytes of a file apply-bundle reads."""
    for name in (BUNDLE_FILE, "tokenizer.json", "vocab.txt"):
        a, b = good / name, bundle / name
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            return name == BUNDLE_FILE or a.exists()
    try:
        m = json.loads((bundle / MANIFEST_FILE).read_bytes().decode("utf-8"))
        return canonical_manifest(m) != canonical_manifest(json.loads((good / MANIFEST_FILE).read_text()))
    except (ValueError, OSError, AttributeError, TypeError, RecursionError):
        return True


@pytest.fixture()
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory pelt's scratch space goes to, checked empty after every case."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_fuzzed_bundles(env: dict[str, Path], tmp_path: Path, private_tmp: Path) -> None:  # noqa: F811
    base_before = tree_hash(env["base"])
    work = tmp_path / "work"
    work.mkdir()
    results = [run_case(i, env, work, private_tmp) for i in range(N)]
    assert tree_hash(env["base"]) == base_before
    kinds = {k for k, _, _ in results}
    codes = [c for _, c, _ in results]
    assert len(results) == N
    assert {"json", "manifest-bytes", "tensor-file", "files"} <= {k.split("+")[0] for k in kinds}
    assert codes.count(2) >= N // 2 and codes.count(0) >= 1  # most mutations are refused, some are harmless


def test_fuzzed_runs_through_verify(env: dict[str, Path], tmp_path: Path, private_tmp: Path) -> None:  # noqa: F811
    """``pelt verify RUN`` on mutated ``run.json`` files (head specs included) and adapter files: exit 0 or 2, one
    line, the run unchanged. ``PELT_FUZZ_N`` scales it too (a third as many cases)."""
    codes = []
    for i in range(max(1, N // 3)):
        rng = random.Random(SEED * 7_919 + i)
        run = Path(shutil.copytree(env["run"], tmp_path / f"r{i}"))
        if rng.random() < 0.7:
            meta = json.loads((run / "run.json").read_text())
            for _ in range(rng.choice([1, 1, 2])):
                mutate_json(meta, rng)
            (run / "run.json").write_text(json.dumps(meta))
        else:
            (run / "adapter.safetensors").write_bytes(mutate_bytes((run / "adapter.safetensors").read_bytes(), rng))
        before = tree_hash(run)
        r = pelt_main("verify", str(run), "--format", "tsv")
        check_result(r, f"run case {i}")
        assert tree_hash(run) == before and not list(private_tmp.iterdir()), i
        codes.append(r.returncode)
        shutil.rmtree(run)
    assert codes.count(2) >= len(codes) // 3
