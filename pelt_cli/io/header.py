"""Safetensors headers: parse and validate (standard library only), encode, and the dtype tables.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each tensor name
to ``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the data region that starts at ``8 + n``),
an optional ``__metadata__`` string map, then the raw little-endian tensor bytes.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pelt_cli.errors import CheckpointError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it. ``begin``/``end`` are absolute byte offsets in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one ``.safetensors`` file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    size: int


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}")


def read_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Parse and validate the header of a ``.safetensors`` file without reading tensor data.

    Args:
        path: the file.

    Returns:
        The header, with every tensor's absolute byte range.

    Raises:
        CheckpointError: the file is missing, truncated, not JSON, or its offsets are inconsistent.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(p, f"truncated: {size} bytes, a safetensors file starts with an 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _bad(p, f"header length {n} is implausible (over {MAX_HEADER} bytes): not a safetensors file")
            if 8 + n > size:
                raise _bad(p, f"header length {n} is larger than the file ({size} bytes): truncated or corrupt")
            raw = f.read(n)
    except FileNotFoundError:
        raise _bad(p, "no such file") from None
    except IsADirectoryError:
        raise _bad(p, "is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise _bad(p, "permission denied") from None
    return parse_header(p, raw, size)


def parse_header(path: Path, raw: bytes, size: int) -> ShardHeader:
    """Parse and validate the JSON header of a safetensors file read elsewhere (e.g. over HTTP Range requests).

    Args:
        path: the file's name, used in messages and as every tensor's ``file``.
        raw: the header bytes (after the 8-byte length).
        size: the whole file's size in bytes.

    Raises:
        CheckpointError: the header is not JSON or its entries are inconsistent.
    """
    p = path
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(p, f"header is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise _bad(p, f"header is JSON {type(doc).__name__}, expected an object of tensors")
    data_start = 8 + len(raw)
    tensors, metadata = _parse_entries(p, doc, data_start, size)
    return ShardHeader(path=p, tensors=tensors, metadata=metadata, data_start=data_start, size=size)


def _parse_entries(
    p: Path, doc: dict[str, Any], data_start: int, size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(p, "__metadata__ must be a map of strings")
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise _bad(p, f"tensor {name!r}: entry must be an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise _bad(p, f"tensor {name!r}: unknown dtype {dtype!r} (expected one of {', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _bad(p, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            raise _bad(p, f"tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
        b, e = offsets
        want = math.prod(shape) * DTYPE_SIZES[dtype]
        if e - b != want:
            raise _bad(p, f"tensor {name!r}: data_offsets {offsets} hold {e - b} bytes, {dtype}{shape} needs {want}")
        if e > data_len:
            raise _bad(
                p,
                f"tensor {name!r}: data_offsets {offsets} run past the end of the file "
                f"(data region is {data_len} bytes): truncated or corrupt",
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), p, data_start + b, data_start + e)
    _check_overlaps(p, tensors)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _check_overlaps(p: Path, tensors: dict[str, TensorInfo]) -> None:
    ranges = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(ranges, ranges[1:], strict=False):
        if b1 < e0:
            raise _bad(p, f"tensors {n0!r} and {n1!r} have overlapping data_offsets: corrupt header")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Build a safetensors header for tensors laid out back to back in the given order.

    Returns:
        ``(header_bytes, offsets)``: the 8-byte length plus JSON padded to 8 bytes, and each tensor's offset
        within the data region.
    """
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    pos = 0
    for s in specs:
        doc[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def torch_dtype(dtype: str) -> Any:
    """The torch dtype for a safetensors dtype string."""
    import torch

    table = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }
    return table[dtype]


def safetensors_dtype(tdtype: Any) -> str:
    """The safetensors dtype string for a torch dtype."""
    import torch

    table = {
        torch.bool: "BOOL",
        torch.uint8: "U8",
        torch.int8: "I8",
        torch.int16: "I16",
        torch.int32: "I32",
        torch.int64: "I64",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float32: "F32",
        torch.float64: "F64",
        torch.uint16: "U16",
        torch.uint32: "U32",
        torch.uint64: "U64",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
    }
    return table[tdtype]
