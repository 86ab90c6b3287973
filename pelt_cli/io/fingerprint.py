"""Checkpoint fingerprints: a streamed content hash (cached per file identity) and a header-only one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pelt_cli.errors import CheckpointError
from pelt_cli.io.atomic import write_text_atomic
from pelt_cli.io.checkpoint import Checkpoint
from pelt_cli.io.header import TensorInfo

HASH_CHUNK = 16 * 1024 * 1024


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
        parts.append(
            f"{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"
        )
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
        write_text_atomic(where[0], fp + "\n")
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
