"""pelt_cli.io.atomic: outputs appear whole or not at all; stale temporaries of dead processes are cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pelt_cli.errors import OutputExistsError
from pelt_cli.io import atomic
from pelt_cli.io.atomic import (
    atomic_dir,
    atomic_file,
    clean_stale_temps,
    commit_dir,
    pid_alive,
    prepare_out,
    temp_sibling,
    write_bytes_atomic,
    write_text_atomic,
)


def _dead_pid() -> int:
    """A process id that no longer exists: a child that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


def test_temp_sibling_naming(tmp_path: Path) -> None:
    assert temp_sibling(tmp_path / "out") == tmp_path / f".out.pelt-tmp-{os.getpid()}"
    assert temp_sibling(tmp_path / "a.json", "pelt-old") == tmp_path / f".a.json.pelt-old-{os.getpid()}"


def test_atomic_dir_commits_on_success(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "sub" / "out") as tmp:
        assert tmp == tmp_path / "sub" / f".out.pelt-tmp-{os.getpid()}" and tmp.is_dir()
        (tmp / "a.txt").write_text("A")
    assert os.listdir(tmp_path / "sub") == ["out"]
    assert (tmp_path / "sub" / "out" / "a.txt").read_text() == "A"


def test_atomic_dir_leaves_nothing_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"\0" * 100)
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out"]
    assert os.listdir(tmp_path / "out") == ["old.txt"] and (tmp_path / "out" / "old.txt").read_text() == "old"


def test_atomic_dir_without_force_refuses_an_output_that_appeared(tmp_path: Path) -> None:
    with pytest.raises(OutputExistsError, match="appeared while writing"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "mine.txt").write_text("mine")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "theirs.txt").write_text("theirs")
    assert os.listdir(tmp_path) == ["out"]
    assert os.listdir(tmp_path / "out") == ["theirs.txt"]


def test_commit_dir_overwrite_replaces_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "out" / "nested").mkdir()
    (tmp_path / "out" / "nested" / "x").write_text("x")
    tmp = tmp_path / "new"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    commit_dir(tmp, tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path) == ["out"]  # neither the temporary nor the moved-aside old one is left
    assert os.listdir(tmp_path / "out") == ["new.txt"] and (tmp_path / "out" / "new.txt").read_text() == "new"


def test_commit_dir_overwrite_replaces_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    tmp = tmp_path / "new"
    tmp.mkdir()
    (tmp / "f").write_text("f")
    commit_dir(tmp, tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["f"]


def test_write_text_atomic_replaces_content(tmp_path: Path) -> None:
    p = tmp_path / "run.json"
    write_text_atomic(p, "one\n")
    write_text_atomic(p, "twö\n")
    assert os.listdir(tmp_path) == ["run.json"]
    assert p.read_bytes() == "twö\n".encode()
    write_bytes_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"


def test_write_text_atomic_failure_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text("old\n")

    def fail(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(p, "new\n")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # the temporary is removed
    assert p.read_text() == "old\n"


def test_atomic_file_for_path_writers(tmp_path: Path) -> None:
    p = tmp_path / "state.pt"
    p.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_file(p) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("killed mid-save")
    assert os.listdir(tmp_path) == ["state.pt"] and p.read_bytes() == b"old"
    with atomic_file(p) as tmp:
        assert tmp.name == f".state.pt.pelt-tmp-{os.getpid()}"
        tmp.write_bytes(b"new")
    assert os.listdir(tmp_path) == ["state.pt"] and p.read_bytes() == b"new"


def test_clean_stale_temps_removes_dead_keeps_live(tmp_path: Path) -> None:
    dead, me = _dead_pid(), os.getpid()
    (tmp_path / f".out.pelt-tmp-{dead}").mkdir()
    (tmp_path / f".out.pelt-tmp-{dead}" / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / f".out.pelt-old-{dead}").write_text("old file")
    (tmp_path / f".out.pelt-tmp-{me}").mkdir()
    (tmp_path / f".other.pelt-tmp-{dead}").mkdir()  # another output's: not ours to clean
    (tmp_path / ".out.pelt-tmp-notapid").mkdir()
    (tmp_path / "out").mkdir()
    removed = clean_stale_temps(tmp_path / "out")
    assert sorted(p.name for p in removed) == [f".out.pelt-old-{dead}", f".out.pelt-tmp-{dead}"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f".out.pelt-tmp-{me}", f".other.pelt-tmp-{dead}", ".out.pelt-tmp-notapid", "out"]
    )
    assert clean_stale_temps(tmp_path / "missing-parent" / "out") == []


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(_dead_pid())


def test_prepare_out(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".out.pelt-tmp-{dead}").mkdir()
    prepare_out(tmp_path / "out", force=False)
    assert os.listdir(tmp_path) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="already exists") as e:
        prepare_out(tmp_path / "out", force=False)
    assert "--force" in (e.value.hint or "")
    prepare_out(tmp_path / "out", force=True)
    assert os.listdir(tmp_path) == ["out"]
