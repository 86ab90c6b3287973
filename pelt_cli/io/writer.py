"""Writing checkpoints: the sharded writer (planned layout, ``pwrite`` to each tensor's offset), ``save_file``
for one small file, and shard planning. Every file lands through :mod:`pelt_cli.io.atomic`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pelt_cli.errors import CheckpointError, OutputExistsError, PeltError, UsageError
from pelt_cli.io.atomic import atomic_dir, atomic_file
from pelt_cli.io.header import INDEX_NAME, SINGLE_NAME, TensorSpec, encode_header, safetensors_dtype


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
        self._commit = atomic_dir(self.out_dir, overwrite)
        self.tmp = self._commit.tmp
        self._where: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()

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
                raise CheckpointError(
                    f"tensor {name!r}: source ended after {spec.nbytes - left} of {spec.nbytes} bytes"
                )
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
        except BaseException as e:
            self._abort(e)
            raise
        self._close()
        self._commit.__exit__(exc_type, exc, tb)  # renames into place, or removes on an exception

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

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
