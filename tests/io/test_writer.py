"""pelt_cli.io.writer: the atomic sharded writer, ``save_file``, shard planning and sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pelt_cli.errors import OutputExistsError, PeltError
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.header import INDEX_NAME, TensorSpec, read_header, safetensors_dtype
from pelt_cli.io.reader import TensorReader
from pelt_cli.io.writer import ShardedWriter, parse_size, plan_shards, save_file, shard_names


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
    specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with ShardedWriter(tmp_path / "out", specs) as w:
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
    specs = [TensorSpec(n, "F32", (256,)) for n in tensors]
    with ShardedWriter(tmp_path / "out", specs, max_shard_size=parse_size("3KiB")) as w:
        for n, t in tensors.items():
            w.write(n, t)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == sorted([INDEX_NAME] + [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)])
    idx = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert idx["metadata"]["total_size"] == 10 * 1024
    assert idx["weight_map"]["t0"] == "model-00001-of-00004.safetensors"
    assert idx["weight_map"]["t9"] == "model-00004-of-00004.safetensors"
    reopened = open_checkpoint(tmp_path / "out")
    assert reopened.sharded and reopened.total_bytes == 10 * 1024
    with TensorReader(reopened) as r:
        assert all(torch.equal(r.read(n), t) for n, t in tensors.items())


def test_writer_output_loads_in_transformers(tiny_models_built: dict, tmp_path: Path) -> None:
    import transformers

    model = tiny_models_built["llama"]
    state = {k: v for k, v in model.state_dict().items()}
    specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in state.items()]
    with ShardedWriter(tmp_path / "m", specs, max_shard_size=parse_size("20KB")) as w:
        for n, t in state.items():
            w.write(n, t)
        model.config.to_json_file(w.tmp_dir / "config.json")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    for n, t in reloaded.state_dict().items():
        assert torch.equal(t, state[n]), n


def test_writer_atomic_on_failure(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (4,))]
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(tmp_path / "out", specs) as w:
        w.write("a", torch.ones(4))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(PeltError, match="never written"), ShardedWriter(tmp_path / "out", specs) as w:
        w.write("a", torch.ones(4))
    assert os.listdir(tmp_path) == []
    with (
        pytest.raises(PeltError, match="planned F32\\[4\\], got F16\\[4\\]"),
        ShardedWriter(tmp_path / "out", specs) as w,
    ):
        w.write("a", torch.ones(4).half())
    assert os.listdir(tmp_path) == []


def test_writer_refuses_existing_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        ShardedWriter(tmp_path / "out", [TensorSpec("a", "F32", (1,))])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_writer_overwrite_replaces_whole_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with ShardedWriter(tmp_path / "out", [TensorSpec("a", "F32", (2,))], overwrite=True) as w:
        w.write("a", torch.tensor([1.0, 2.0]))
        w.write_text("note.txt", "new")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors", "note.txt"]
    assert load_file(tmp_path / "out" / "model.safetensors")["a"].tolist() == [1.0, 2.0]


def test_save_file_atomic(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "a.safetensors", metadata={"pelt": "1"})
    assert os.listdir(tmp_path) == ["a.safetensors"]
    back = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())
    assert read_header(tmp_path / "a.safetensors").metadata == {"format": "pt", "pelt": "1"}


def test_save_file_failure_keeps_old_file(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "a.safetensors")
    before = (tmp_path / "a.safetensors").read_bytes()
    with pytest.raises(AttributeError):
        save_file({"a": torch.zeros(3), "b": "not a tensor"}, tmp_path / "a.safetensors")  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == ["a.safetensors"]
    assert (tmp_path / "a.safetensors").read_bytes() == before


def test_plan_shards_and_names() -> None:
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]  # 40, 40, 120, 20, 20 B
    plan = plan_shards(specs, 80)
    assert [[s.name for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert plan_shards(specs, None) == [specs]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


@pytest.mark.parametrize(
    "text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5kb", 1500), ("1024B", 1024)]
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5", "GB", "-1GB", "5 parsecs", "0MB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(PeltError, match="expected a positive number with a unit"):
        parse_size(text)
