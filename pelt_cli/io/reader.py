"""Lazy tensor reads: one tensor at a time, at most one shard file open."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pelt_cli.errors import CheckpointError, PeltError
from pelt_cli.io.checkpoint import Checkpoint, open_checkpoint
from pelt_cli.io.guard import open_regular
from pelt_cli.io.header import TensorInfo, torch_dtype


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
            self._fh = open_regular(info.file, "a .safetensors file", CheckpointError)  # closed in close()
            self._path = info.file
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

        buf = self.read_bytes(name)  # raises for an unknown name
        info = self.ckpt.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(buf, dtype=torch_dtype(info.dtype)).reshape(info.shape)


def load_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every tensor of a small checkpoint, normally one ``.safetensors`` file (an adapter, a bundle), in header order.

    Args:
        path: the file (or anything :func:`~pelt_cli.io.checkpoint.open_checkpoint` accepts).

    Returns:
        name → torch tensor that owns its memory.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt.
    """
    ckpt = open_checkpoint(path)
    with TensorReader(ckpt) as r:
        return {name: r.read(name) for name in ckpt.tensors}


PREFETCH_BYTES = 512 * 2**20


def prefetch(ckpt: Checkpoint, nbytes: int = PREFETCH_BYTES) -> int:
    """Ask the kernel to start reading the first ``nbytes`` of a checkpoint's files into the page cache, in shard
    order, and return at once: a cold streaming pass then overlaps its first reads with its set-up. Advice only (no
    effect where ``posix_fadvise`` is missing; files that cannot be opened are skipped). Returns the bytes advised."""
    import stat

    if not hasattr(os, "posix_fadvise"):
        return 0
    done = 0
    for f in ckpt.files:
        if done >= nbytes:
            break
        try:
            fd = os.open(f, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                n = min(nbytes - done, st.st_size)
                os.posix_fadvise(fd, 0, n, os.POSIX_FADV_WILLNEED)
                done += n
        except OSError:
            pass
        finally:
            os.close(fd)
    return done
