"""pelt_cli.io.fingerprint: content-based (not layout-based) fingerprints, and their cache."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.fingerprint import cached_fingerprint, fingerprint, structure_fingerprint, tensor_digest


def test_fingerprint_is_content_based(tiny_dir: Path, tmp_path: Path) -> None:
    single = open_checkpoint(tiny_dir / "qwen2")
    sharded = open_checkpoint(tiny_dir / "qwen2-sharded")
    assert len(sharded.files) > 1
    fp = fingerprint(single)
    assert fp.startswith("blake2b:") and len(fp) == len("blake2b:") + 32
    assert fingerprint(sharded) == fp  # same content, other sharding
    assert structure_fingerprint(single) == structure_fingerprint(sharded)
    # flip one byte of one tensor's data in a copy: the fingerprint changes, the structure one does not
    shutil.copytree(tiny_dir / "qwen2", tmp_path / "q")
    copy = open_checkpoint(tmp_path / "q")
    info = copy.tensors["model.norm.weight"]
    with open(info.file, "r+b") as f:
        f.seek(info.begin)
        b = f.read(1)
        f.seek(info.begin)
        f.write(bytes([b[0] ^ 1]))
    assert fingerprint(copy) != fp
    assert structure_fingerprint(copy) == structure_fingerprint(single)


def test_fingerprint_cache_written_atomically(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PELT_FINGERPRINT_CACHE", "1")
    shutil.copytree(tiny_dir / "qwen2", tmp_path / "q")
    now = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: now() + 60 * 10**9)  # files look older than the 2 s racy window
    ckpt = open_checkpoint(tmp_path / "q")
    assert cached_fingerprint(ckpt) is None
    fp = fingerprint(ckpt)
    assert cached_fingerprint(ckpt) == fp
    cache_dir = tmp_path / "cache" / "pelt" / "fingerprints"
    [entry] = os.listdir(cache_dir)  # the value only: no temporary left behind
    assert (cache_dir / entry).read_text() == fp + "\n"
    assert fp == fingerprint(open_checkpoint(tiny_dir / "qwen2"))


def test_tensor_digest_is_per_content(tiny_dir: Path) -> None:
    ckpt = open_checkpoint(tiny_dir / "qwen2")
    norm = ckpt.tensors["model.norm.weight"]
    assert len(tensor_digest(norm)) == 32
    assert tensor_digest(norm) == tensor_digest(open_checkpoint(tiny_dir / "qwen2-sharded").tensors[norm.name])
