"""Writing checkpoints: the sharded writer (planned layout, ``pwrite`` to each tensor's offset), ``save_file``
for one small file, and shard planning. Every file lands through :mod:`pelt_cli.io.atomic`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import threading
from collections import deque
from pathlib import Path
from typing import Any

from pelt_cli.errors import CheckpointError, OutputExistsError, PeltError, UsageError
from pelt_cli.io.atomic import atomic_dir, atomic_file
from pelt_cli.io.header import INDEX_NAME, SINGLE_NAME, TensorSpec, encode_header, safetensors_dtype

WRITE_BEHIND = 256 * 2**20  # written bytes whose write-back may be in flight before the oldest are waited for
SYNC_WAIT_BEFORE, SYNC_WRITE, SYNC_WAIT_AFTER = 1, 2, 4  # sync_file_range(2) flags
DIRECT_ALIGN = 4096  # O_DIRECT: file offset, memory address and length in whole blocks of this size
DIRECT_MIN = 1 << 20  # tensors at least this big skip the page cache where their bytes are block-aligned
BOUNCE_BYTES = 16 << 20  # the buffer an untouched tensor is copied through when it skips the page cache
HUGE_MIN = 4 << 20  # buffers at least this big ask for transparent huge pages


def parse_size(text: str) -> int:
    """Parse a byte size with its unit spelled out: ``5GB``, ``500MB``, ``2GiB``, ``1024B``.

    Raises:
        UsageError: the text has no recognised unit or is not a positive number.
    """
    units = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
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


@functools.cache
def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or None where there is none."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def sync_range(fd: int, offset: int, nbytes: int, flags: int) -> bool:
    """``sync_file_range(fd, offset, nbytes, flags)``: start (``SYNC_WRITE``) or wait for (``SYNC_WAIT_*``) the
    write-back of a byte range, without the metadata an ``fsync`` flushes. False where it is not available."""
    fn = _sync_file_range()
    return fn is not None and fn(fd, offset, nbytes, flags) == 0


def buffer_address(data: memoryview) -> int | None:
    """The memory address of a writable buffer's first byte (None for a read-only one)."""
    import ctypes

    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError):
        return None


def direct_split(offset: int, nbytes: int, address: int | None) -> tuple[int, int]:
    """``(head, middle)``: of a write of ``nbytes`` at file ``offset`` from memory ``address``, the bytes before the
    first block boundary and the whole blocks after them, when file and memory are equally misaligned (else the
    middle is 0: write it all through the page cache)."""
    head = -offset % DIRECT_ALIGN
    if address is None or (address + head) % DIRECT_ALIGN or nbytes < head:
        return nbytes, 0
    return head, (nbytes - head) // DIRECT_ALIGN * DIRECT_ALIGN


def aligned_buffer(nbytes: int) -> memoryview:
    """A page-aligned, writable buffer of ``nbytes`` (anonymous memory), for block-aligned direct writes; a big one
    asks for huge pages (fewer page faults, and a direct write pins a few pages instead of thousands)."""
    import mmap

    m = mmap.mmap(-1, max(1, nbytes))
    if nbytes >= HUGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # no transparent huge pages here: ordinary pages
            m.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(m)


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

    Direct writes: a tensor of at least :data:`DIRECT_MIN` bytes whose buffer is misaligned like its file offset
    (:func:`direct_split`; see :meth:`block_offset` and :func:`aligned_buffer`) has its whole blocks written with
    ``O_DIRECT``, past the page cache (allocating fresh page-cache pages costs more than the copy into them), and
    only its ragged ends through the cache. Where ``O_DIRECT`` is refused (tmpfs, other file systems) it is off.

    Write-behind: the disk starts writing each tensor as soon as it is written (``sync_file_range``), and once more
    than :data:`WRITE_BEHIND` bytes are in flight the oldest are waited for and dropped from the page cache. The disk
    works while the next tensors are computed, the closing ``fsync`` has little left, a big output does not fill the
    page cache with dirty pages, and its freed pages are reused for the next writes (fresh page-cache pages cost
    more than the copy into them). An output under :data:`WRITE_BEHIND` bytes stays cached whole.

    Threads: :meth:`write_bytes` and :meth:`copy_range` of different tensors may run in several threads at once
    (each has its own bounce buffer; the write-behind window is shared under a lock), so the disk is kept busy
    while other threads compute.

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
        self._commit = atomic_dir(self.out_dir, overwrite)
        self.tmp = self._commit.tmp
        self._where: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._direct: list[int | None] = []  # each shard's O_DIRECT descriptor, if the file system allows it
        self.direct_bytes = 0  # bytes written past the page cache
        self._local = threading.local()  # each thread's bounce buffer
        self._lock = threading.Lock()  # tensors may be written from several threads at once
        self._refused: list[int] = []  # O_DIRECT descriptors turned off (closed at the end: another thread may use one)
        self._written: set[str] = set()
        self._behind: deque[tuple[int, int, int]] = deque()  # (fd, offset, nbytes) whose write-back was started
        self._in_flight = 0

    @property
    def tmp_dir(self) -> Path:
        """The temporary directory being filled; extra files may be placed here before commit."""
        return self.tmp

    def __enter__(self) -> ShardedWriter:
        self._commit.__enter__()
        try:
            self._open_shards()
        except BaseException as e:
            self._abort(e)
            raise
        return self

    def _open_shards(self) -> None:
        for i, (shard, name) in enumerate(zip(self.shards, self.names, strict=True)):
            header, offsets = encode_header(shard, self.metadata)
            fd = os.open(self.tmp / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + sum(s.nbytes for s in shard))
            for s in shard:
                self._where[s.name] = (i, len(header) + offsets[s.name])
            try:
                self._direct.append(os.open(self.tmp / name, os.O_WRONLY | os.O_DIRECT))
            except (AttributeError, OSError):  # no O_DIRECT here (macOS, tmpfs): everything through the cache
                self._direct.append(None)

    def block_offset(self, name: str) -> int:
        """Where a tensor starts within a :data:`DIRECT_ALIGN` block of its file: a buffer holding its bytes at
        this offset from an aligned start (:func:`aligned_buffer`) is written past the page cache."""
        return self._where[name][1] % DIRECT_ALIGN

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
        self._write_at(shard, offset, mv, len(mv) >= DIRECT_MIN)
        self._written.add(name)

    def _write_at(self, shard: int, offset: int, mv: memoryview, direct: bool) -> None:
        """Write bytes at an offset of a shard: whole blocks past the cache where allowed and aligned, the rest
        through it (with write-behind)."""
        ok = direct and self._direct[shard] is not None
        head, middle = direct_split(offset, len(mv), buffer_address(mv)) if ok else (len(mv), 0)
        if middle and self._write_direct(shard, mv[head : head + middle], offset + head):
            parts = [(0, head), (head + middle, len(mv))]
        else:
            parts = [(0, len(mv))]
        for lo, hi in parts:
            _pwrite_all(self._fds[shard], mv[lo:hi], offset + lo)
            self._write_behind(self._fds[shard], offset + lo, hi - lo)

    def _copy_direct(self, name: str, src_fd: int, src: int, dst: int) -> None:
        """Copy a tensor's bytes from another file through an aligned buffer, the whole blocks with ``O_DIRECT``."""
        shard, nbytes = self._where[name][0], self.specs[name].nbytes
        bounce = getattr(self._local, "bounce", None)
        if bounce is None:
            bounce = self._local.bounce = aligned_buffer(BOUNCE_BYTES + DIRECT_ALIGN)
        done = 0
        while done < nbytes:
            shift = (dst + done) % DIRECT_ALIGN
            k = min(nbytes - done, BOUNCE_BYTES - shift)  # chunks end on block boundaries
            view, got = bounce[shift : shift + k], 0
            while got < k:
                n = os.preadv(src_fd, [view[got:]], src + done + got)
                if n <= 0:
                    raise CheckpointError(f"tensor {name!r}: source ended after {done + got} of {nbytes} bytes")
                got += n
            self._write_at(shard, dst + done, view, True)
            done += k

    def _write_direct(self, shard: int, mv: memoryview, offset: int) -> bool:
        """Write whole blocks with ``O_DIRECT``; False (and direct writes off for the shard) where it is refused."""
        fd = self._direct[shard]
        if fd is None:
            return False
        try:
            while len(mv):
                n = os.pwrite(fd, mv[: 1 << 30], offset)
                with self._lock:
                    self.direct_bytes += n
                mv, offset = mv[n:], offset + n
                if n % DIRECT_ALIGN:  # a short write off the block grid: the rest goes through the cache
                    _pwrite_all(self._fds[shard], mv, offset)
                    break
        except OSError:  # EINVAL: alignment this file system does not take; nothing of this write is trusted
            with self._lock:
                if self._direct[shard] == fd:
                    self._direct[shard] = None
                    self._refused.append(fd)
            return False
        return True

    def _write_behind(self, fd: int, offset: int, nbytes: int) -> None:
        """Start the write-back of a written range; wait for (and drop from the cache) the oldest beyond the window."""
        if not nbytes or not sync_range(fd, offset, nbytes, SYNC_WRITE):
            return
        with self._lock:
            self._behind.append((fd, offset, nbytes))
            self._in_flight += nbytes
            old = []
            while self._in_flight > WRITE_BEHIND:
                old.append(self._behind.popleft())
                self._in_flight -= old[-1][2]
        for fd0, off0, n0 in old:
            if sync_range(fd0, off0, n0, SYNC_WAIT_BEFORE | SYNC_WRITE | SYNC_WAIT_AFTER):
                os.posix_fadvise(fd0, off0, n0, os.POSIX_FADV_DONTNEED)  # clean now: its pages can be reused

    def copy_range(self, name: str, src_fd: int, src_offset: int) -> None:
        """Copy one tensor's bytes from another file: inside the kernel (``copy_file_range``: no user-space buffer),
        or, for a big tensor where ``O_DIRECT`` works, through an aligned buffer with its whole blocks written past
        the page cache (:data:`BOUNCE_BYTES` at a time)."""
        spec = self.specs[name]
        shard, offset = self._where[name]
        if self._direct[shard] is not None and spec.nbytes >= DIRECT_MIN:
            self._copy_direct(name, src_fd, src_offset, offset)
            self._written.add(name)
            return
        left, src, dst = spec.nbytes, src_offset, offset
        while left:
            try:
                n = os.copy_file_range(src_fd, self._fds[shard], left, src, dst)
            except (AttributeError, OSError):  # old kernel, other file system: copy through a buffer
                n = os.pwrite(self._fds[shard], os.pread(src_fd, min(left, 1 << 26), src), dst)
            if n <= 0:
                raise CheckpointError(
                    f"tensor {name!r}: source ended after {spec.nbytes - left} of {spec.nbytes} bytes"
                )
            left, src, dst = left - n, src + n, dst + n
        self._written.add(name)
        self._write_behind(self._fds[shard], offset, spec.nbytes)

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
        except BaseException as e:
            self._abort(e)
            raise
        self._close()
        self._commit.__exit__(exc_type, exc, tb)  # renames into place, or removes on an exception

    def _close(self) -> None:
        for fd in self._fds + [d for d in self._direct if d is not None] + self._refused:
            os.close(fd)
        self._fds.clear()
        self._direct.clear()
        self._refused.clear()
        self._behind.clear()
        self._in_flight = 0

    def _abort(self, e: BaseException) -> None:
        """Close the shards and remove the temporary directory after ``e``."""
        self._close()
        self._commit.__exit__(type(e), e, e.__traceback__)

    def _finish(self) -> None:
        missing = [n for n in self.specs if n not in self._written]
        if missing:
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
    with atomic_file(p) as tmp:
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            for s in specs:
                _pwrite_all(fd, tensor_bytes(tensors[s.name]), len(header) + offsets[s.name])
            os.fsync(fd)
        finally:
            os.close(fd)
