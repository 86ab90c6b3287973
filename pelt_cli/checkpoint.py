"""Checkpoint I/O: safetensors headers (stdlib only), lazy tensor reads, an atomic sharded writer, fingerprints.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each tensor name
to ``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the data region that starts at ``8 + n``),
an optional ``__metadata__`` string map, then the raw little-endian tensor bytes.

Nothing here imports torch at module level: reading headers and fingerprints needs only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, OutputExistsError, PeltError, UsageError

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation refuses larger headers too
HASH_CHUNK = 16 * 1024 * 1024


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
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(p, f"header is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise _bad(p, f"header is JSON {type(doc).__name__}, expected an object of tensors")
    data_start = 8 + n
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
                p, f"tensor {name!r}: data_offsets {offsets} run past the end of the file "
                f"(data region is {data_len} bytes): truncated or corrupt"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), p, data_start + b, data_start + e)
    _check_overlaps(p, tensors)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _check_overlaps(p: Path, tensors: dict[str, TensorInfo]) -> None:
    ranges = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(ranges, ranges[1:], strict=False):
        if b1 < e0:
            raise _bad(p, f"tensors {n0!r} and {n1!r} have overlapping data_offsets: corrupt header")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: a file, a directory with model.safetensors, or a sharded directory with an index


@dataclass
class Checkpoint:
    """A safetensors checkpoint read from its headers only."""

    root: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    sharded: bool = False

    @property
    def directory(self) -> Path:
        """The directory holding the weights (and config.json, tokenizer files, …)."""
        return self.root if self.root.is_dir() else self.root.parent

    @property
    def total_params(self) -> int:
        """Number of elements over all tensors on disk."""
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data over all tensors on disk."""
        return sum(t.nbytes for t in self.tensors.values())


def _refuse_pickle(p: Path) -> CheckpointError:
    return CheckpointError(
        f"{p}: pickle checkpoint refused: pelt never executes pickles, it reads safetensors only",
        hint="convert once in a trusted environment: python -c \"from transformers import AutoModel; "
        f"AutoModel.from_pretrained('{p if p.is_dir() else p.parent}').save_pretrained('OUT')\" "
        "(saves model.safetensors)",
    )


def resolve_files(path: str | os.PathLike[str]) -> tuple[Path, list[Path], bool]:
    """Find the safetensors files of a checkpoint path.

    Args:
        path: a ``.safetensors`` file, a directory with ``model.safetensors``, or a sharded directory.

    Returns:
        ``(root, files, sharded)``.

    Raises:
        CheckpointError: missing path, no weights, or a pickle checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory", hint="give a directory, a .safetensors file or "
                              "a short name (pelt inspect --help lists them)")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(p)
        if p.name.endswith(".index.json"):
            return resolve_files(p.parent)
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p}: not a .safetensors file (suffix {p.suffix or 'none'!r})")
        return p, [p], False
    if (p / INDEX_NAME).is_file():
        return p, _index_files(p / INDEX_NAME), True
    if (p / SINGLE_NAME).is_file():
        return p, [p / SINGLE_NAME], False
    found = sorted(p.glob("*.safetensors"))
    if found:
        return p, found, len(found) > 1
    if any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir()):
        raise _refuse_pickle(p)
    raise CheckpointError(f"{p}: no weights found (expected model.safetensors, {INDEX_NAME} or *.safetensors)")


def _load_json(p: Path, what: str) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: {what} is not valid JSON ({e})") from None


def _index_files(index_path: Path) -> list[Path]:
    doc = _load_json(index_path, "shard index")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: shard index has no 'weight_map' object")
    names = list(dict.fromkeys(wm.values()))
    files = [index_path.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: shard(s) listed in the index are missing: {', '.join(missing)}")
    return files


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read every header of a checkpoint and cross-check the shard index. Reads no tensor data.

    Args:
        path: a ``.safetensors`` file, a directory with ``model.safetensors``, or a sharded directory.

    Returns:
        The checkpoint's tensor table and config (``config.json`` when present).

    Raises:
        CheckpointError: any problem with the files, reported with the path.
    """
    root, files, sharded = resolve_files(path)
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for f in files:
        h = read_header(f)
        for name, info in h.tensors.items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
        metadata.update(h.metadata)
    if sharded and (root / INDEX_NAME).is_file():
        _check_index(root / INDEX_NAME, tensors)
    directory = root if root.is_dir() else root.parent
    config = None
    if (directory / "config.json").is_file():
        config = _load_json(directory / "config.json", "config.json")
    return Checkpoint(root=root, files=files, tensors=tensors, metadata=metadata, config=config, sharded=sharded)


def _check_index(index_path: Path, tensors: dict[str, TensorInfo]) -> None:
    wm: dict[str, str] = _load_json(index_path, "shard index")["weight_map"]
    missing = [k for k in wm if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{index_path}: {len(missing)} tensor(s) in the index are in no shard header, e.g. {missing[0]!r}"
        )
    wrong = [k for k, f in wm.items() if tensors[k].file.name != f]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{index_path}: index puts {k!r} in {wm[k]} but it is in {tensors[k].file.name}")
    extra = [k for k in tensors if k not in wm]
    if extra:
        raise CheckpointError(f"{index_path}: {len(extra)} tensor(s) are missing from the index, e.g. {extra[0]!r}")


# ----------------------------------------------------------------------------------------------------------------
# Lazy reads


def torch_dtype(dtype: str) -> Any:
    """The torch dtype for a safetensors dtype string."""
    import torch

    table = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
        "F64": torch.float64, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }
    return table[dtype]


def safetensors_dtype(tdtype: Any) -> str:
    """The safetensors dtype string for a torch dtype."""
    import torch

    table = {
        torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
        torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
        torch.float64: "F64", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }
    return table[tdtype]


class TensorReader:
    """Reads one tensor at a time from a checkpoint, keeping at most one file open.

    Use as a context manager; ``read(name)`` returns a fresh torch tensor that owns its memory.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._path: Path | None = None
        self._fh: Any = None

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the open shard, if any."""
        if self._fh is not None:
            self._fh.close()
            self._fh, self._path = None, None

    def _open(self, name: str) -> TensorInfo:
        info = self.ckpt.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.ckpt.root}: no tensor named {name!r}")
        if self._path != info.file:
            self.close()
            self._fh, self._path = open(info.file, "rb"), info.file  # noqa: SIM115 - closed in close()
        return info

    def read_bytes(self, name: str, into: bytearray | None = None) -> bytearray | memoryview:
        """The raw little-endian bytes of one tensor: a new buffer, or a view on the front of ``into`` (reused
        across tensors, so a streaming pass touches the same pages instead of faulting in fresh ones)."""
        info = self._open(name)
        if into is None:
            buf: bytearray | memoryview = bytearray(info.nbytes)
        else:
            if len(into) < info.nbytes:
                raise PeltError(f"read buffer of {len(into)} bytes is smaller than tensor {name!r}")
            buf = memoryview(into)[: info.nbytes]
        self._fh.seek(info.begin)
        got = self._fh.readinto(buf)
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {name!r} is truncated ({got} of {info.nbytes} bytes)")
        return buf

    def locate(self, name: str) -> tuple[int, int, int]:
        """``(fd, offset, nbytes)`` of one tensor's bytes in its (opened) shard, for kernel-side copies."""
        info = self._open(name)
        return self._fh.fileno(), info.begin, info.nbytes

    def read(self, name: str) -> Any:
        """One tensor as a torch tensor of its stored dtype and shape."""
        import torch

        info = self.ckpt.tensors[name] if name in self.ckpt.tensors else None
        buf = self.read_bytes(name)
        assert info is not None
        if info.numel == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints


def tensor_digest(info: TensorInfo) -> str:
    """BLAKE2b-128 of one tensor's bytes, streamed in chunks (memory stays flat)."""
    h = hashlib.blake2b(digest_size=16)
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        left = info.nbytes
        while left:
            chunk = f.read(min(HASH_CHUNK, left))
            if not chunk:
                raise CheckpointError(f"{info.file}: tensor {info.name!r} is truncated")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _fingerprint_cache(ckpt: Checkpoint) -> tuple[Path, int] | None:
    """The cache file for a checkpoint's fingerprint, keyed by its files' identity (path, size, mtime, ctime,
    inode, device), and the newest of their timestamps; None when caching is off."""
    if os.environ.get("PELT_FINGERPRINT_CACHE", "1") == "0":
        return None
    parts, newest = [], 0
    for f in sorted({str(i.file) for i in ckpt.tensors.values()}):
        st = os.stat(f)
        parts.append(f"{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}")
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pelt" / "fingerprints"
    return root / hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest(), newest


def cached_fingerprint(ckpt: Checkpoint) -> str | None:
    """The fingerprint computed earlier for exactly these files, if they have not changed since (else None)."""
    where = _fingerprint_cache(ckpt)
    try:
        text = where[0].read_text(encoding="ascii").strip() if where else ""
    except OSError:
        return None
    return text if text.startswith("blake2b:") else None


def _remember_fingerprint(ckpt: Checkpoint, fp: str) -> None:
    import time

    where = _fingerprint_cache(ckpt)
    # A file written within the last 2 s could be rewritten within the same timestamp tick: not cached (the
    # "racy git" rule), so a later change always shows in the key.
    if where is None or time.time_ns() - where[1] < 2_000_000_000:
        return
    try:
        where[0].parent.mkdir(parents=True, exist_ok=True)
        tmp = where[0].with_name(f".{where[0].name}.{os.getpid()}")
        tmp.write_text(fp + "\n", encoding="ascii")
        os.replace(tmp, where[0])
    except OSError:
        pass  # a read-only cache directory only costs a re-hash next time


def fingerprint(ckpt: Checkpoint, digests: dict[str, str] | None = None) -> str:
    """A content fingerprint of a checkpoint, independent of how it is sharded or ordered.

    It hashes, in name order, each tensor's name, dtype, shape and content digest. Data is streamed,
    never loaded whole. The result is cached per file identity (see :func:`cached_fingerprint`), so the
    commands after ``pelt apply`` do not re-read an unchanged base.

    Args:
        ckpt: the checkpoint.
        digests: per-tensor digests already computed (``tensor_digest``), reused where present.

    Returns:
        ``"blake2b:" + 32 hex digits``.
    """
    if not digests:
        known = cached_fingerprint(ckpt)
        if known is not None:
            return known
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        d = (digests or {}).get(name) or tensor_digest(info)
        h.update(f"{name}\0{info.dtype}\0{list(info.shape)}\0{d}\n".encode())
    fp = "blake2b:" + h.hexdigest()
    _remember_fingerprint(ckpt, fp)
    return fp


def structure_fingerprint(ckpt: Checkpoint) -> str:
    """A header-only fingerprint: names, dtypes and shapes (cheap; does not see weight values)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        h.update(f"{name}\0{info.dtype}\0{list(info.shape)}\n".encode())
    return "blake2b:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Writing


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


def parse_size(text: str) -> int:
    """Parse a byte size with its unit spelled out: ``5GB``, ``500MB``, ``2GiB``, ``1024B``.

    Raises:
        UsageError: the text has no recognised unit or is not a positive number.
    """
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            num = t[: -len(unit)]
            try:
                value = float(num)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * units[unit])
    raise UsageError(f"size {text!r}: expected a positive number with a unit, e.g. 5GB, 500MB or 2GiB")


def plan_shards(specs: list[TensorSpec], max_shard_size: int | None) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a bigger tensor gets its own)."""
    if not max_shard_size:
        return [list(specs)]
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """Hugging Face shard file names for ``n`` shards."""
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[: 1 << 30], offset)
        data, offset = data[n:], offset + n


def tensor_bytes(tensor: Any) -> memoryview:
    """A zero-copy byte view of a CPU tensor (made contiguous first if needed)."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class ShardedWriter:
    """Writes a checkpoint directory atomically: into a temporary sibling, renamed into place on success.

    The layout is planned up front from ``specs``, so each shard's header is written first and every tensor's
    bytes go straight to their offset (``pwrite``) in any order: memory stays at one tensor. On an exception the
    temporary directory is removed and nothing appears at ``out_dir``.

    Example:
        with ShardedWriter(out, specs, max_shard_size=5 * 10**9) as w:
            for s in specs:
                w.write(s.name, compute(s.name))
            w.copy_file(base / "config.json")
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        specs: list[TensorSpec],
        max_shard_size: int | None = None,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
        layout: tuple[list[list[TensorSpec]], list[str]] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise OutputExistsError(f"{self.out_dir}: already exists", hint="choose another path or pass --force")
        self.overwrite = overwrite
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise PeltError("duplicate tensor names in the output plan")
        self.metadata = {"format": "pt", **(metadata or {})}
        if layout is not None:  # an explicit (shards, file names), e.g. a base checkpoint's own layout
            self.shards, self.names = layout
            if sorted(x.name for shard in self.shards for x in shard) != sorted(self.specs):
                raise PeltError("the explicit shard layout does not hold exactly the planned tensors")
        else:
            self.shards = plan_shards(specs, max_shard_size)
            self.names = shard_names(len(self.shards))
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.pelt-tmp-{os.getpid()}"
        self._where: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()

    @property
    def tmp_dir(self) -> Path:
        """The temporary directory being filled; extra files may be placed here before commit."""
        return self.tmp

    def __enter__(self) -> ShardedWriter:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        for i, (shard, name) in enumerate(zip(self.shards, self.names, strict=True)):
            header, offsets = encode_header(shard, self.metadata)
            fd = os.open(self.tmp / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + sum(s.nbytes for s in shard))
            for s in shard:
                self._where[s.name] = (i, len(header) + offsets[s.name])
        return self

    def write(self, name: str, tensor: Any) -> None:
        """Write one tensor; its dtype and shape must match the plan."""
        spec = self.specs.get(name)
        if spec is None:
            raise PeltError(f"tensor {name!r} is not in the output plan")
        got = (safetensors_dtype(tensor.dtype), tuple(tensor.shape))
        if got != (spec.dtype, spec.shape):
            raise PeltError(f"tensor {name!r}: planned {spec.dtype}{list(spec.shape)}, got {got[0]}{list(got[1])}")
        self.write_bytes(name, tensor_bytes(tensor))

    def write_bytes(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Write one tensor's raw little-endian bytes (e.g. copied unchanged from a base checkpoint)."""
        spec = self.specs[name]
        mv = memoryview(data).cast("B")
        if len(mv) != spec.nbytes:
            raise PeltError(f"tensor {name!r}: planned {spec.nbytes} bytes, got {len(mv)}")
        shard, offset = self._where[name]
        _pwrite_all(self._fds[shard], mv, offset)
        self._written.add(name)

    def copy_range(self, name: str, src_fd: int, src_offset: int) -> None:
        """Copy one tensor's bytes from another file inside the kernel (``copy_file_range``: no user-space buffer)."""
        spec = self.specs[name]
        shard, offset = self._where[name]
        left, src, dst = spec.nbytes, src_offset, offset
        while left:
            try:
                n = os.copy_file_range(src_fd, self._fds[shard], left, src, dst)
            except (AttributeError, OSError):  # old kernel, other file system: copy through a buffer
                n = os.pwrite(self._fds[shard], os.pread(src_fd, min(left, 1 << 26), src), dst)
            if n <= 0:
                raise CheckpointError(f"tensor {name!r}: source ended after {spec.nbytes - left} of {spec.nbytes} "
                                      "bytes")
            left, src, dst = left - n, src + n, dst + n
        self._written.add(name)

    def copy_file(self, src: str | os.PathLike[str], name: str | None = None) -> None:
        """Copy a side file (config, tokenizer, …) into the output."""
        shutil.copy2(src, self.tmp / (name or Path(src).name))

    def write_text(self, name: str, text: str) -> None:
        """Write a side text file into the output."""
        (self.tmp / name).write_text(text, encoding="utf-8")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            if exc_type is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        if exc_type is None:
            _commit_dir(self.tmp, self.out_dir, self.overwrite)

    def _finish(self) -> None:
        missing = [n for n in self.specs if n not in self._written]
        if missing:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise PeltError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[0]!r}")
        for fd in self._fds:
            os.fsync(fd)
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                "weight_map": {
                    s.name: fname for shard, fname in zip(self.shards, self.names, strict=True) for s in shard
                },
            }
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _commit_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename a finished temporary directory into place (replacing ``out`` only when ``overwrite``)."""
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputExistsError(f"{out}: appeared while writing; left untouched")
        old = out.parent / f".{out.name}.pelt-old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Write a single ``.safetensors`` file atomically (temporary name, then rename).

    Args:
        tensors: name → CPU torch tensor.
        path: destination file; replaced if it exists.
        metadata: optional string map stored in the header.
    """
    p = Path(path)
    specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    header, offsets = encode_header(specs, {"format": "pt", **(metadata or {})})
    tmp = p.parent / f".{p.name}.pelt-tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            for s in specs:
                _pwrite_all(fd, tensor_bytes(tensors[s.name]), len(header) + offsets[s.name])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def iter_tensors(ckpt: Checkpoint, names: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, tensor)`` one at a time, in file order, so only one tensor is held at once."""
    wanted = list(names) if names is not None else list(ckpt.tensors)
    order = sorted(wanted, key=lambda n: (str(ckpt.tensors[n].file), ckpt.tensors[n].begin))
    with TensorReader(ckpt) as r:
        for n in order:
            yield n, r.read(n)
