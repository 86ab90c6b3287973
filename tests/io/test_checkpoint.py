"""pelt_cli.io.checkpoint: every malformed input refused with its path, shard indexes cross-checked."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from pelt_cli.errors import CheckpointError
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.header import INDEX_NAME


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each malformed input and a fragment its one-line error must contain."""
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    (tmp / "empty-dir").mkdir()
    (tmp / "pickle-dir").mkdir()
    (tmp / "pickle-dir" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (tmp / "model.bin").write_bytes(b"\x80\x04pickle")
    (tmp / "short.safetensors").write_bytes(b"\x01\x02\x03")
    overlap = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    return {
        "missing": (tmp / "does-not-exist", "no such file or directory"),
        "no-weights": (tmp / "empty-dir", "no weights found"),
        "truncated": (tmp / "short.safetensors", "truncated"),
        "length-too-big": (_write_raw(tmp / "big.safetensors", good, b"\0" * 8, length=10_000), "larger than the file"),
        "not-json": (_write_raw(tmp / "nj.safetensors", b"{not json!", b""), "not valid JSON"),
        "overlap": (_write_raw(tmp / "ov.safetensors", overlap, b"\0" * 12), "overlapping"),
        "past-end": (_write_raw(tmp / "pe.safetensors", good, b"\0" * 4), "run past the end"),
        "pickle-file": (tmp / "model.bin", "pickle checkpoint refused"),
        "pickle-dir": (tmp / "pickle-dir", "pickle checkpoint refused"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "no-weights",
        "truncated",
        "length-too-big",
        "not-json",
        "overlap",
        "past-end",
        "pickle-file",
        "pickle-dir",
    ],
)
def test_bad_input_library(tmp_path: Path, case: str) -> None:
    path, fragment = _bad_inputs(tmp_path)[case]
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert fragment in str(e.value)
    assert str(path) in str(e.value)
    assert e.value.exit_code == 2


def test_bad_input_cli_one_line_exit_2(tmp_path: Path) -> None:
    from conftest import run_pelt

    cases = _bad_inputs(tmp_path)
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    for case, (path, fragment) in cases.items():
        r = run_pelt("inspect", str(path), "--format", "json")
        assert r.returncode == 2, (case, r.stderr)
        assert r.stdout == "", case
        lines = r.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and fragment in lines[0] and str(path) in lines[0], (case, lines)
        assert len(lines) <= 2 and all(not ln.startswith("Traceback") for ln in lines), (case, lines)
        if case.startswith("pickle"):
            assert lines[1].startswith("hint: ") and "save_pretrained" in lines[1]
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before  # nothing written


def test_sharded_index_cross_checked(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "s"
    shutil.copytree(tiny_dir / "llama-sharded", d)
    idx = json.loads((d / INDEX_NAME).read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "model-99999-of-99999.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="missing: model-99999"):
        open_checkpoint(d)
