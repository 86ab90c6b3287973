"""pelt_cli.io.reader: ``load_file`` equals the safetensors library's, tensors own their memory, bad names refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from pelt_cli.errors import CheckpointError, PeltError
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.reader import TensorReader, load_file


def _saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(4, 3, generator=g),
        "i": torch.arange(5),
        "h": torch.randn(2, generator=g).half(),
        "empty": torch.zeros(0, 2),
    }
    st_save_file(tensors, tmp_path / "a.safetensors")
    return tmp_path / "a.safetensors", tensors


def test_load_file_matches_safetensors(tmp_path: Path) -> None:
    path, tensors = _saved(tmp_path)
    mine, theirs = load_file(path), st_load_file(path)
    assert sorted(mine) == sorted(theirs) == sorted(tensors)
    for n, t in tensors.items():
        assert mine[n].dtype == t.dtype and mine[n].shape == t.shape and torch.equal(mine[n], t), n
    mine["w"].add_(1)  # writable, and not shared with the file
    assert torch.equal(load_file(path)["w"], tensors["w"])


def test_load_file_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_file(tmp_path / "nope.safetensors")


def test_reader_bytes_into_buffer_and_bad_name(tmp_path: Path) -> None:
    path, tensors = _saved(tmp_path)
    ckpt = open_checkpoint(path)
    buf = bytearray(64)
    with TensorReader(ckpt) as r:
        view = r.read_bytes("w", into=buf)
        assert len(view) == 48 and bytes(view) == tensors["w"].numpy().tobytes()
        fd, offset, nbytes = r.locate("i")
        assert (offset, nbytes) == (ckpt.tensors["i"].begin, 40)
        with pytest.raises(PeltError, match="smaller than tensor"):
            r.read_bytes("w", into=bytearray(8))
        with pytest.raises(CheckpointError, match="no tensor named 'x'"):
            r.read("x")
