"""Content-addressed bundles and ``pelt verify``: every change to a bundle is refused in one line (exit 2).

Regression tests for issue 11's "silent acceptance of a changed bundle" (labels reversed, LoRA alpha or dropout
changed, a tensor's dtype or shape changed in the manifest), the bundle "Tracebacks" (a non-UTF-8 manifest, a
manifest that is a list, a row without ``stored``, no ``base``, a string ``format_version`` or ``head``, no
insertions, a truncated tar on stdin) and hostile tars (``..``, links, devices); ``--expect-digest``; and
``pelt verify`` on good and bad bundles, runs and checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import tiny_models
import torch
from conftest import make_run, pelt_main
from safetensors.torch import load_file

from pelt_cli.bundle import BUNDLE_FILE, MANIFEST_FILE, canonical_manifest, export_bundle, manifest_digest
from pelt_cli.io.writer import save_file
from pelt_cli.run import ADAPTER_FILE, RUN_FILE, Run, expected_state

LABELS = ["negative", "neutral", "positive"]


def add_head(run: Path, labels: list[str]) -> Path:
    """Give a run pelt's own classification head (spec in run.json, random weights in adapter.safetensors)."""
    meta = json.loads((run / RUN_FILE).read_text())
    meta["head"] = {"task": "text-classification", "labels": list(labels), "hidden": 32, "dropout": 0.1}
    (run / RUN_FILE).write_text(json.dumps(meta, indent=2))
    skel, _ = Run.open(run).skeleton()
    state = load_file(run / ADAPTER_FILE)
    g = torch.Generator().manual_seed(0)
    for name, shape in expected_state(skel).items():
        state.setdefault(name, torch.randn(shape, generator=g))
    save_file(state, run / ADAPTER_FILE)
    return run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT base, a LoRA run on it with a 3-label head, and its bundle (directory and tar)."""
    root = tmp_path_factory.mktemp("verify")
    tiny_models.build("bert").save_pretrained(root / "bert")
    run = add_head(make_run("lora", root / "bert", root / "run"), LABELS)
    export_bundle(run, root / "bundle")
    with open(root / "bundle.tar", "wb") as f:
        export_bundle(run, "-", stream=f)
    return {"root": root, "base": root / "bert", "run": run, "bundle": root / "bundle", "tar": root / "bundle.tar"}


def pelt_bytes(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """``pelt ARGS`` in this process with ``stdin`` as binary standard input (a tar for ``apply-bundle -``)."""
    from pelt_cli.cli import main

    out, err, real = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        sys.stdin = real
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def refused(r: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one ``error:`` line naming every word, no traceback, nothing on stdout but verify's rows."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])


def copy_bundle(env: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(env["bundle"], tmp_path / "bundle"))


def edit_manifest(bundle: Path, edit: Any, resign: bool = False) -> dict:
    """Apply ``edit(manifest)`` in place (and record the new digest when ``resign``, as a forger would)."""
    m = json.loads((bundle / MANIFEST_FILE).read_text())
    edit(m)
    if resign:
        m["digest"] = manifest_digest(m)
    (bundle / MANIFEST_FILE).write_text(json.dumps(m, indent=2))
    return m


def apply_cmd(bundle: Path | str, env: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return pelt_main("apply-bundle", str(bundle), str(env["base"]), "-o", str(out), *extra)


def verify_rows(target: Path, *extra: str) -> tuple[int, dict[str, str]]:
    r = pelt_main("verify", str(target), "--format", "json", *extra)
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == (r.returncode == 2)
    doc = json.loads(r.stdout)
    return r.returncode, {c["check"]: c["status"] for c in doc["checks"]}


# ---------------------------------------------------------------------------------------------------- digests


def test_export_prints_and_records_a_reproducible_digest(env: dict[str, Path], tmp_path: Path) -> None:
    r = pelt_main("export", str(env["run"]), "-o", str(tmp_path / "b"))
    m = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'b'}\n"  # stdout stays the path, for pipes
    assert f"digest {m['digest']}\n" in r.stderr and m["digest"] == manifest_digest(m)
    assert m["digest"].startswith("sha256:") and len(m["digest"]) == 7 + 64
    first = json.loads((env["bundle"] / MANIFEST_FILE).read_text())
    assert first["digest"] == m["digest"]  # the same run exported twice: the same digest (``created`` is unsigned)
    assert set(m["files"]) == {BUNDLE_FILE} and "digest" not in canonical_manifest(m).decode()
    with tarfile.open(env["tar"]) as tar:
        assert json.load(tar.extractfile(MANIFEST_FILE))["digest"] == m["digest"]
    rebuilt = apply_cmd(env["bundle"], env, tmp_path / "r")
    assert rebuilt.returncode == 0 and f"digest {m['digest']} checked" in rebuilt.stderr
    assert Run.open(tmp_path / "r").meta.extra["from_bundle"]["digest"] == m["digest"]


def _reverse_labels(m: dict) -> None:
    m["head"]["labels"].reverse()


def _double_alpha(m: dict) -> None:
    m["recipe"]["inserts"][0]["params"]["alpha"] *= 2


def _dropout(m: dict) -> None:
    m["recipe"]["inserts"][0]["params"]["dropout"] = 0.3


def _dtype(m: dict) -> None:
    m["tensors"][0]["dtype"] = "F16"


def _shape(m: dict) -> None:
    m["tensors"][0]["shape"] = m["tensors"][0]["shape"][::-1]


def _head_dropout(m: dict) -> None:
    m["head"]["dropout"] = 0.5


TAMPERS = {
    "labels_reversed": _reverse_labels,
    "lora_alpha_changed": _double_alpha,
    "lora_dropout_changed": _dropout,
    "tensor_dtype_changed": _dtype,
    "tensor_shape_changed": _shape,
    "head_dropout_changed": _head_dropout,
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_a_changed_manifest_is_refused(env: dict[str, Path], tmp_path: Path, name: str) -> None:
    bundle = copy_bundle(env, tmp_path)
    edit_manifest(bundle, TAMPERS[name])
    refused(apply_cmd(bundle, env, tmp_path / "out"), "not the digest it records", "changed after export")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    code, rows = verify_rows(bundle)
    assert code == 2 and rows["digest"] == "fail" and rows["file bundle.safetensors"] == "ok"


def test_flipped_tensor_bytes_are_refused(env: dict[str, Path], tmp_path: Path) -> None:
    bundle = copy_bundle(env, tmp_path)
    raw = bytearray((bundle / BUNDLE_FILE).read_bytes())
    raw[-5] ^= 0x40  # inside the last tensor's data
    (bundle / BUNDLE_FILE).write_bytes(bytes(raw))
    refused(apply_cmd(bundle, env, tmp_path / "out"), BUNDLE_FILE, "SHA-256 differs")
    code, rows = verify_rows(bundle)
    assert code == 2 and rows["digest"] == "ok" and rows["file bundle.safetensors"] == "fail"
    assert rows["tensors"] == "fail"  # the BLAKE2b of the tensor's row says so too


def test_a_forged_digest_passes_only_without_expect_digest(env: dict[str, Path], tmp_path: Path) -> None:
    published = json.loads((env["bundle"] / MANIFEST_FILE).read_text())["digest"]
    bundle = copy_bundle(env, tmp_path)
    forged = edit_manifest(bundle, _reverse_labels, resign=True)  # consistent: only a separate digest catches it
    r = apply_cmd(bundle, env, tmp_path / "out", "--expect-digest", published)
    refused(r, f"is not the expected {published}", forged["digest"])
    assert not (tmp_path / "out").exists()
    code, rows = verify_rows(bundle, "--expect-digest", published)
    assert code == 2 and rows["digest"] == "ok" and rows["expected digest"] == "fail"
    ok = apply_cmd(env["bundle"], env, tmp_path / "good", "--expect-digest", published.removeprefix("sha256:"))
    assert ok.returncode == 0 and Run.open(tmp_path / "good").head["labels"] == LABELS
    assert verify_rows(env["bundle"], "--expect-digest", published.upper().replace("SHA256:", "sha256:"))[0] == 0


@pytest.mark.parametrize("value", ["abc", "sha256:" + "0" * 63, "md5:" + "0" * 64, ""])
def test_a_malformed_expect_digest_is_one_line(env: dict[str, Path], tmp_path: Path, value: str) -> None:
    refused(apply_cmd(env["bundle"], env, tmp_path / "out", "--expect-digest", value), "--expect-digest", "sha256:")
    refused(pelt_main("verify", str(env["bundle"]), "--expect-digest", value), "expected sha256:")


def test_a_bundle_without_a_digest_warns_and_expect_digest_refuses_it(env: dict[str, Path], tmp_path: Path) -> None:
    bundle = copy_bundle(env, tmp_path)
    edit_manifest(bundle, lambda m: [m.pop("digest"), m.pop("files")])  # as pelt wrote bundles before digests
    r = apply_cmd(bundle, env, tmp_path / "out")
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert r.returncode == 0 and len(warnings) == 1 and "no digest" in warnings[0]
    assert Run.open(tmp_path / "out").meta.extra["from_bundle"]["digest"] is None
    refused(apply_cmd(bundle, env, tmp_path / "o2", "--expect-digest", "f" * 64), "no digest")
    code, rows = verify_rows(bundle)
    assert code == 0 and rows["digest"] == "warn" and rows["tensors"] == "ok"
    stripped = Path(shutil.copytree(env["bundle"], tmp_path / "stripped"))
    edit_manifest(stripped, lambda m: m.pop("digest"))  # not an old bundle: one whose digest was removed
    refused(apply_cmd(stripped, env, tmp_path / "o3"), "no digest, and keys", "files")


# ---------------------------------------------------------------------------------------------------- manifest boundary


def _utf16(b: Path) -> None:
    (b / MANIFEST_FILE).write_bytes((b / MANIFEST_FILE).read_text().encode("utf-16"))


def _latin1(b: Path) -> None:
    (b / MANIFEST_FILE).write_bytes((b / MANIFEST_FILE).read_bytes().replace(b'"lora"', b'"l\xe9ra"', 1))


BAD_MANIFESTS = {
    "non_utf8": (_latin1, "not UTF-8"),
    "utf16": (_utf16, "UTF-16"),
    "lone_surrogate": (
        lambda b: (b / MANIFEST_FILE).write_text((b / MANIFEST_FILE).read_text().replace('"lora"', '"\\ud800"', 1)),
        "lone surrogate",
    ),
    "a_list": (lambda b: (b / MANIFEST_FILE).write_text("[1, 2]"), "JSON list, expected an object"),
    "not_json": (lambda b: (b / MANIFEST_FILE).write_text("{"), "not valid JSON"),
    "deep": (lambda b: (b / MANIFEST_FILE).write_text("[" * 100_000), "nested too deeply"),
    "row_without_stored": (lambda b: edit_manifest(b, lambda m: m["tensors"][0].pop("stored")), "tensors[0].stored"),
    "no_base": (lambda b: edit_manifest(b, lambda m: m.pop("base")), "base"),
    "string_format_version": (
        lambda b: edit_manifest(b, lambda m: m.update(format_version="1")),
        "format_version '1'",
    ),
    "string_head": (lambda b: edit_manifest(b, lambda m: m.update(head="classifier")), "head: a string"),
    "no_insertions": (lambda b: edit_manifest(b, lambda m: m.update(insertions=[])), "insertions: empty"),
    "insertions_missing": (lambda b: edit_manifest(b, lambda m: m.pop("insertions")), "insertions: a null"),
    "newer_format": (lambda b: edit_manifest(b, lambda m: m.update(format_version=99)), "newer than this pelt"),
    "labels_not_strings": (lambda b: edit_manifest(b, lambda m: m["head"].update(labels=[1, 2, 3])), "head.labels"),
    "unknown_dtype": (lambda b: edit_manifest(b, lambda m: m["tensors"][0].update(dtype="F128")), "tensors[0].dtype"),
    "no_manifest": (lambda b: (b / MANIFEST_FILE).unlink(), "no manifest.json"),
    "manifest_is_a_dir": (lambda b: [(b / MANIFEST_FILE).unlink(), (b / MANIFEST_FILE).mkdir()], "directory"),
    "fifo_manifest": (lambda b: [(b / MANIFEST_FILE).unlink(), os.mkfifo(b / MANIFEST_FILE)], "FIFO"),
    "bundle_file_missing": (lambda b: (b / BUNDLE_FILE).unlink(), "missing"),
}


@pytest.mark.parametrize("name", list(BAD_MANIFESTS))
def test_a_malformed_bundle_is_one_line(env: dict[str, Path], tmp_path: Path, name: str) -> None:
    bundle = copy_bundle(env, tmp_path)
    mutate, words = BAD_MANIFESTS[name]
    mutate(bundle)
    refused(apply_cmd(bundle, env, tmp_path / "out"), words)
    assert not (tmp_path / "out").exists()
    r = pelt_main("verify", str(bundle), "--format", "tsv")
    refused(r, words)
    assert r.stdout.splitlines()[0] == "check\tstatus\tdetail" and "\tfail\t" in r.stdout


def test_forged_malformed_manifests_are_one_line(env: dict[str, Path], tmp_path: Path) -> None:
    """Re-signed by a forger, so the digest passes: the deeper checks still refuse in one line."""
    cases = {
        "head_hidden": (lambda m: m["head"].update(hidden=0), "head.hidden"),
        "fewer_labels": (lambda m: m["head"]["labels"].pop(), "does not match the run's recipe"),
        "rank_changed": (lambda m: m["recipe"]["inserts"][0]["params"].update(rank=4), "does not match"),
        "recipe_invalid": (lambda m: m["recipe"]["inserts"][0]["params"].update(rank=-1), "rank"),
        "insertion_dropped": (lambda m: m["insertions"].pop(), "insertions differ"),
        "head_class": (lambda m: m["head"].update({"class": "os.system"}), "head.class"),
        "files_bad": (lambda m: m["files"].update({"../etc/passwd": "x"}), "not a bundle file"),
    }
    for i, (name, (edit, words)) in enumerate(cases.items()):
        bundle = Path(shutil.copytree(env["bundle"], tmp_path / f"b{i}"))
        edit_manifest(bundle, edit, resign=True)
        refused(apply_cmd(bundle, env, tmp_path / f"out{i}"), words)
        assert not (tmp_path / f"out{i}").exists(), name


# ---------------------------------------------------------------------------------------------------- tars


def _tar_with(env: dict[str, Path], member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """The exported tar with one more member appended."""
    buf = io.BytesIO()
    with tarfile.open(env["tar"]) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        dst.addfile(member, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name: str, kind: bytes, linkname: str = "", size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, size
    return info


HOSTILE_TARS = {
    "dotdot": (_member("../evil.txt", tarfile.REGTYPE, size=4), "points outside the bundle"),
    "absolute": (_member("/tmp/evil.txt", tarfile.REGTYPE, size=4), "points outside the bundle"),
    "symlink": (_member("tokenizer.json", tarfile.SYMTYPE, "/etc/passwd"), "link or device"),
    "hardlink": (_member("vocab.txt", tarfile.LNKTYPE, "manifest.json"), "link or device"),
    "device": (_member("tokenizer.json", tarfile.CHRTYPE), "link or device"),
    "fifo": (_member("x", tarfile.FIFOTYPE), "link or device"),
    "twice": (_member(MANIFEST_FILE, tarfile.REGTYPE, size=4), "manifest.json twice"),
}


@pytest.mark.parametrize("name", list(HOSTILE_TARS))
def test_a_hostile_tar_is_one_line(env: dict[str, Path], tmp_path: Path, name: str) -> None:
    member, words = HOSTILE_TARS[name]
    raw = _tar_with(env, member, b"evil" if member.size else b"")
    (tmp_path / "b.tar").write_bytes(raw)
    refused(apply_cmd(tmp_path / "b.tar", env, tmp_path / "out"), words)
    refused(pelt_bytes("apply-bundle", "-", str(env["base"]), "-o", str(tmp_path / "o2"), stdin=raw), words)
    refused(pelt_main("verify", str(tmp_path / "b.tar")), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar"]
    assert not (tmp_path.parent / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_tar_on_stdin_round_trip_and_truncated(env: dict[str, Path], tmp_path: Path) -> None:
    raw = env["tar"].read_bytes()
    r = pelt_bytes("apply-bundle", "-", str(env["base"]), "-o", str(tmp_path / "out"), stdin=raw)
    assert r.returncode == 0 and r.stdout == f"{tmp_path / 'out'}\n", r.stderr
    a, b = load_file(env["run"] / ADAPTER_FILE), load_file(tmp_path / "out" / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with tarfile.open(env["tar"]) as tar:
        last = tar.getmembers()[-1]
    for cut in (0, 100, 511, 513, 1536, len(raw) // 2, last.offset_data + last.size - 1):  # short of the data's end
        r = pelt_bytes("apply-bundle", "-", str(env["base"]), "-o", str(tmp_path / f"t{cut}"), stdin=raw[:cut])
        refused(r, "<stdin>")
        assert not (tmp_path / f"t{cut}").exists()
    refused(pelt_bytes("apply-bundle", "-", "-", "-o", str(tmp_path / "x"), stdin=raw), "both read stdin")
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2])
    refused(apply_cmd(tmp_path / "cut.tar", env, tmp_path / "t"), "cut.tar")


def test_a_tar_of_the_bundle_folder_works(env: dict[str, Path], tmp_path: Path) -> None:
    """``tar -cf b.tar bundle/`` (one folder level) is a bundle too; verify reads it without extracting beside it."""
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        tar.add(env["bundle"], arcname="bundle")
    code, rows = verify_rows(tmp_path / "b.tar")
    assert code == 0 and rows["bundle"] == "ok" and rows["digest"] == "ok"
    assert apply_cmd(tmp_path / "b.tar", env, tmp_path / "out").returncode == 0


# ---------------------------------------------------------------------------------------------------- verify


def test_verify_a_good_bundle_run_and_checkpoint(env: dict[str, Path]) -> None:
    code, rows = verify_rows(env["bundle"])
    assert code == 0 and set(rows.values()) == {"ok"}
    assert {"digest", "file bundle.safetensors", "tensors", "recipe", "base", "tensor table"} <= set(rows)
    code, rows = verify_rows(env["tar"])
    assert code == 0 and set(rows.values()) == {"ok"}
    code, rows = verify_rows(env["run"])
    assert code == 0 and rows == {
        "run.json": "ok",
        "header adapter.safetensors": "ok",
        "base": "ok",
        "tensor table": "ok",
    }
    code, rows = verify_rows(env["base"])
    assert code == 0 and rows == {"headers": "ok", "weights": "ok"}
    r = pelt_main("verify", str(env["bundle"]), "--format", "json")
    doc = json.loads(r.stdout)
    assert doc["kind"] == "bundle" and doc["ok"] is True and doc["digest"].startswith("sha256:")


def test_verify_a_bundle_whose_base_is_elsewhere_skips_the_base(env: dict[str, Path], tmp_path: Path) -> None:
    bundle = copy_bundle(env, tmp_path)
    edit_manifest(bundle, lambda m: m["base"].update(path_hint=str(tmp_path / "gone")))  # unsigned: digest holds
    code, rows = verify_rows(bundle)
    assert code == 0 and rows["base"] == "skip" and rows["digest"] == "ok" and "tensor table" not in rows


def test_verify_bad_runs(env: dict[str, Path], tmp_path: Path) -> None:
    run = Path(shutil.copytree(env["run"], tmp_path / "run"))
    state = load_file(run / ADAPTER_FILE)
    name = next(n for n in state if n.endswith(".A"))
    state[name] = state[name][:4].clone()  # another rank than the recipe's
    save_file(state, run / ADAPTER_FILE)
    code, rows = verify_rows(run)
    assert code == 2 and rows["tensor table"] == "fail" and rows["header adapter.safetensors"] == "ok"
    with open(run / ADAPTER_FILE, "ab") as f:
        f.write(b"\0" * 8)  # trailing bytes
    code, rows = verify_rows(run)
    assert code == 2 and rows["header adapter.safetensors"] == "fail" and "tensor table" not in rows
    (run / RUN_FILE).write_text("[]")
    code, rows = verify_rows(run)
    assert code == 2 and rows == {"run.json": "fail"}
    refused(pelt_main("verify", str(env["run"]), "--expect-digest", "0" * 64), "checks a bundle")


def test_verify_bad_checkpoints(env: dict[str, Path], tmp_path: Path) -> None:
    ck = Path(shutil.copytree(env["base"], tmp_path / "ck"))
    state = load_file(ck / "model.safetensors")
    del state[next(n for n in state if n.endswith("attention.self.query.weight"))]
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    code, rows = verify_rows(ck)
    assert code == 2 and rows == {"headers": "ok", "weights": "fail"}
    with open(ck / "model.safetensors", "ab") as f:
        f.write(b"junk")
    code, rows = verify_rows(ck)
    assert code == 2 and rows == {"headers": "fail"}
    os.mkfifo(tmp_path / "fifo")
    refused(pelt_main("verify", str(tmp_path / "fifo")), "FIFO")
    (tmp_path / "notes.txt").write_text("hello")
    refused(pelt_main("verify", str(tmp_path / "notes.txt")), "not a bundle")
    refused(pelt_main("verify", str(tmp_path / "missing")), "no such file")


def test_surrogate_escapes_are_refused_not_printed(env: dict[str, Path], tmp_path: Path) -> None:
    """``"\\ud800"`` is valid JSON but no text: a real process (strict UTF-8 stdout) gets one error line, no crash."""
    from conftest import run_pelt

    run = Path(shutil.copytree(env["run"], tmp_path / "run"))
    meta = json.loads((run / RUN_FILE).read_text())
    meta["recipe"]["name"] = "\ud800"
    (run / RUN_FILE).write_text(json.dumps(meta))
    r = run_pelt("verify", str(run), "--format", "tsv")
    refused(r, "lone surrogate")
    assert r.stdout.splitlines()[1].startswith("run.json\tfail\t")
