"""pelt_cli.io.header: headers parsed like the safetensors library, encoded back, dtype tables."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as st_save_file

from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.header import TensorSpec, encode_header, read_header, safetensors_dtype, torch_dtype
from pelt_cli.io.reader import TensorReader


def test_header_matches_safetensors(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    st_save_file(tensors, tmp_path / "x.safetensors")
    h = read_header(tmp_path / "x.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in h.tensors.items()} == {
        "a": ("F32", (3, 5)),
        "b": ("I64", (7,)),
        "c": ("BF16", (2,)),
    }
    assert h.tensors["a"].nbytes == 60 and h.tensors["b"].numel == 7
    with TensorReader(open_checkpoint(tmp_path / "x.safetensors")) as r:
        for name, t in tensors.items():
            assert torch.equal(r.read(name), t)


def test_encode_header_round_trips(tmp_path: Path) -> None:
    specs = [TensorSpec("w", "F32", (2, 3)), TensorSpec("b", "I64", (3,)), TensorSpec("e", "F16", (0,))]
    header, offsets = encode_header(specs, {"k": "v"})
    assert offsets == {"w": 0, "b": 24, "e": 48}
    (n,) = struct.unpack("<Q", header[:8])
    assert n == len(header) - 8 and n % 8 == 0
    (tmp_path / "h.safetensors").write_bytes(header + bytes(48))
    h = read_header(tmp_path / "h.safetensors")
    assert h.metadata == {"k": "v"} and h.data_start == len(header)
    assert [(t.name, t.dtype, t.shape, t.begin - h.data_start, t.nbytes) for t in h.tensors.values()] == [
        ("w", "F32", (2, 3), 0, 24),
        ("b", "I64", (3,), 24, 24),
        ("e", "F16", (0,), 48, 0),
    ]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8, torch.float8_e4m3fn]
)
def test_dtype_tables_invert(dtype: torch.dtype) -> None:
    assert torch_dtype(safetensors_dtype(dtype)) == dtype
