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
from pelt_cli.io.guard import decode_utf8, open_regular, parse_json

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
    with open_regular(p, "a .safetensors file", CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(p, f"truncated: {size} bytes, a safetensors file starts with an 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise _bad(p, f"header length {n} is implausible (over {MAX_HEADER} bytes): not a safetensors file")
            if 8 + n > size:
                raise _bad(p, f"header length {n} is larger than the file ({size} bytes): truncated or corrupt")
            raw = f.read(n)
        except OSError as e:
            raise _bad(p, f"cannot be read ({e.strerror or e})") from None
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
    if not raw.startswith(b"{"):
        raise _bad(p, f"header starts with {raw[:8]!r}, not '{{': not a safetensors file")
    text = decode_utf8(raw, str(p), "a safetensors header (JSON)", CheckpointError)
    doc = parse_json(text, str(p), "the safetensors header", CheckpointError, expect=dict, strict=True)
    data_start = 8 + len(raw)
    tensors, metadata = _parse_entries(p, doc, data_start, size)
    return ShardHeader(path=p, tensors=tensors, metadata=metadata, data_start=data_start, size=size)


def _parse_entries(
    p: Path, doc: dict[str, Any], data_start: int, size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(p, f"__metadata__ is {_short(metadata)}; expected a JSON object of strings")
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise _bad(
                p, f"tensor {name!r}: entry is {_short(entry)}; expected an object with dtype, shape and offsets"
            )
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _bad(p, f"tensor {name!r}: unknown dtype {_short(dtype)} (expected one of {', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise _bad(p, f"tensor {name!r}: shape {_short(shape)} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
            raise _bad(p, f"tensor {name!r}: data_offsets {_short(offsets)} is not a pair of non-negative integers")
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
    _check_layout(p, tensors, data_start, data_len)
    return tensors, dict(metadata)


def _count(v: Any) -> bool:
    """A JSON non-negative integer that fits 64 bits (``true`` is not one)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _short(v: Any) -> str:
    """A JSON value in a message, cut to a readable length."""
    text = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_layout(p: Path, tensors: dict[str, TensorInfo], data_start: int, data_len: int) -> None:
    """Tensor data back to back from the start of the data region to the end of the file, as safetensors requires:
    no overlap, no gap, no trailing bytes."""
    pos = 0
    last = "the header"
    for b, e, name in sorted((t.begin - data_start, t.end - data_start, t.name) for t in tensors.values()):
        if b < pos:
            raise _bad(p, f"tensors {last!r} and {name!r} have overlapping data_offsets: corrupt header")
        if b > pos:
            raise _bad(p, f"{b - pos} bytes between {last} and tensor {name!r} belong to no tensor: corrupt header")
        pos, last = e, f"tensor {name!r}"
    if pos != data_len:
        raise _bad(
            p,
            f"{data_len - pos} bytes after the last tensor's data belong to no tensor: trailing bytes or a bad header",
        )


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

    table: dict[str, Any] = {
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
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }
    if table.get(dtype) is None:
        raise CheckpointError(f"dtype {dtype!r} is not supported by this torch ({torch.__version__})")
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
