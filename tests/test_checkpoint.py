"""Checkpoint I/O: header parsing, bad inputs, the atomic sharded writer, fingerprints."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from pelt_cli import checkpoint as ck
from pelt_cli.errors import CheckpointError, OutputExistsError, PeltError


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_header_matches_safetensors(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    st_save_file(tensors, tmp_path / "x.safetensors")
    h = ck.read_header(tmp_path / "x.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in h.tensors.items()} == {
        "a": ("F32", (3, 5)), "b": ("I64", (7,)), "c": ("BF16", (2,))}
    assert h.tensors["a"].nbytes == 60 and h.tensors["b"].numel == 7
    with ck.TensorReader(ck.open_checkpoint(tmp_path / "x.safetensors")) as r:
        for name, t in tensors.items():
            assert torch.equal(r.read(name), t)


# ------------------------------------------------------------------------------------------------ bad inputs

def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Each malformed input and a fragment its one-line error must contain."""
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    (tmp / "empty-dir").mkdir()
    (tmp / "pickle-dir").mkdir()
    (tmp / "pickle-dir" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (tmp / "model.bin").write_bytes(b"\x80\x04pickle")
    (tmp / "short.safetensors").write_bytes(b"\x01\x02\x03")
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
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


@pytest.mark.parametrize("case", ["missing", "no-weights", "truncated", "length-too-big", "not-json", "overlap",
                                  "past-end", "pickle-file", "pickle-dir"])
def test_bad_input_library(tmp_path: Path, case: str) -> None:
    path, fragment = _bad_inputs(tmp_path)[case]
    with pytest.raises(CheckpointError) as e:
        ck.open_checkpoint(path)
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
    import shutil

    d = tmp_path / "s"
    shutil.copytree(tiny_dir / "llama-sharded", d)
    idx = json.loads((d / ck.INDEX_NAME).read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "model-99999-of-99999.safetensors"
    (d / ck.INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="missing: model-99999"):
        ck.open_checkpoint(d)


# ------------------------------------------------------------------------------------------------ writer

def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(50, 16, generator=g),
        "layer.0.w": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layer.0.b": torch.randn(16, generator=g).half(),
        "ids": torch.arange(10),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(8, 6, generator=g).t(),
    }


def test_writer_roundtrip_single(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = [ck.TensorSpec(n, ck.safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with ck.ShardedWriter(tmp_path / "out", specs) as w:
        for n in reversed(list(tensors)):  # any order
            w.write(n, tensors[n])
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n


def test_writer_sharded_index_bytes(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    specs = [ck.TensorSpec(n, "F32", (256,)) for n in tensors]
    with ck.ShardedWriter(tmp_path / "out", specs, max_shard_size=ck.parse_size("3KiB")) as w:
        for n, t in tensors.items():
            w.write(n, t)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([ck.INDEX_NAME] + [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)])
    idx = json.loads((tmp_path / "out" / ck.INDEX_NAME).read_text())
    assert idx["metadata"]["total_size"] == 10 * 1024
    assert idx["weight_map"]["t0"] == "model-00001-of-00004.safetensors"
    assert idx["weight_map"]["t9"] == "model-00004-of-00004.safetensors"
    reopened = ck.open_checkpoint(tmp_path / "out")
    assert reopened.sharded and reopened.total_bytes == 10 * 1024
    with ck.TensorReader(reopened) as r:
        assert all(torch.equal(r.read(n), t) for n, t in tensors.items())


def test_writer_output_loads_in_transformers(tiny_models_built: dict, tmp_path: Path) -> None:
    import transformers

    model = tiny_models_built["llama"]
    state = {k: v for k, v in model.state_dict().items()}
    specs = [ck.TensorSpec(n, ck.safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in state.items()]
    with ck.ShardedWriter(tmp_path / "m", specs, max_shard_size=ck.parse_size("20KB")) as w:
        for n, t in state.items():
            w.write(n, t)
        model.config.to_json_file(w.tmp_dir / "config.json")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    for n, t in reloaded.state_dict().items():
        assert torch.equal(t, state[n]), n


def test_writer_atomic_on_failure(tmp_path: Path) -> None:
    specs = [ck.TensorSpec("a", "F32", (4,)), ck.TensorSpec("b", "F32", (4,))]
    with pytest.raises(RuntimeError, match="boom"), ck.ShardedWriter(tmp_path / "out", specs) as w:
        w.write("a", torch.ones(4))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(PeltError, match="never written"), ck.ShardedWriter(tmp_path / "out", specs) as w:
        w.write("a", torch.ones(4))
    assert os.listdir(tmp_path) == []
    with pytest.raises(PeltError, match="planned F32\\[4\\], got F16\\[4\\]"), \
            ck.ShardedWriter(tmp_path / "out", specs) as w:
        w.write("a", torch.ones(4).half())
    assert os.listdir(tmp_path) == []


def test_writer_refuses_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        ck.ShardedWriter(tmp_path / "out", [ck.TensorSpec("a", "F32", (1,))])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_save_file_atomic(tmp_path: Path) -> None:
    tensors = _tensors()
    ck.save_file(tensors, tmp_path / "a.safetensors", metadata={"pelt": "1"})
    assert os.listdir(tmp_path) == ["a.safetensors"]
    back = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    assert ck.read_header(tmp_path / "a.safetensors").metadata == {"format": "pt", "pelt": "1"}


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1.5kb", 1500), ("1024B", 1024)])
def test_parse_size(text: str, expected: int) -> None:
    assert ck.parse_size(text) == expected


@pytest.mark.parametrize("text", ["5", "GB", "-1GB", "5 parsecs", "0MB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(PeltError, match="expected a positive number with a unit"):
        ck.parse_size(text)


# ------------------------------------------------------------------------------------------------ fingerprints

def test_fingerprint_is_content_based(tiny_dir: Path, tmp_path: Path) -> None:
    single = ck.open_checkpoint(tiny_dir / "qwen2")
    sharded = ck.open_checkpoint(tiny_dir / "qwen2-sharded")
    assert len(sharded.files) > 1
    fp = ck.fingerprint(single)
    assert fp.startswith("blake2b:") and len(fp) == len("blake2b:") + 32
    assert ck.fingerprint(sharded) == fp  # same content, other sharding
    assert ck.structure_fingerprint(single) == ck.structure_fingerprint(sharded)
    # flip one byte of one tensor's data in a copy: the fingerprint changes, the structure one does not
    import shutil

    shutil.copytree(tiny_dir / "qwen2", tmp_path / "q")
    copy = ck.open_checkpoint(tmp_path / "q")
    info = copy.tensors["model.norm.weight"]
    with open(info.file, "r+b") as f:
        f.seek(info.begin)
        b = f.read(1)
        f.seek(info.begin)
        f.write(bytes([b[0] ^ 1]))
    assert ck.fingerprint(copy) != fp
    assert ck.structure_fingerprint(copy) == ck.structure_fingerprint(single)
