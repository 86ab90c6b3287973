"""pelt_cli.io.atomic: outputs appear whole or not at all; stale temporaries of dead processes are cleaned."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pelt_cli.errors import OutputBusy, OutputExistsError, UsageError
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


def test_recover_rolls_a_cut_swap_forward_and_leaves_live_or_odd_leftovers(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".run.pelt-old-{dead}").mkdir()  # killed between the two renames of commit_dir
    (tmp_path / f".run.pelt-old-{dead}" / "v").write_text("old")
    (tmp_path / f".run.pelt-tmp-{dead}").mkdir()
    (tmp_path / f".run.pelt-tmp-{dead}" / "v").write_text("new")
    assert atomic.recover(tmp_path / "run")
    assert os.listdir(tmp_path) == ["run"] and (tmp_path / "run" / "v").read_text() == "new"
    (tmp_path / f".gone.pelt-old-{dead}").mkdir()  # no new generation: a half-removed old one is never revived
    assert not atomic.recover(tmp_path / "gone") and not (tmp_path / "gone").exists()
    clean_stale_temps(tmp_path / "gone")
    live = os.getppid()
    (tmp_path / f".busy.pelt-old-{live}").mkdir()  # a live writer mid-swap: waited for, never touched
    (tmp_path / f".busy.pelt-tmp-{live}").mkdir()
    assert not atomic.recover(tmp_path / "busy", wait=0.1)
    assert sorted(os.listdir(tmp_path)) == sorted(["run", f".busy.pelt-old-{live}", f".busy.pelt-tmp-{live}"])


def test_commit_dir_puts_the_old_one_back_when_the_second_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    real, calls = atomic._rename, []

    def second_fails(src: Path, dst: Path) -> None:
        calls.append(dst.name)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(atomic, "_rename", second_fails)
    with pytest.raises(OSError, match="Input/output"):
        commit_dir(tmp_path / "new", tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["new", "out"] and os.listdir(tmp_path / "out") == ["old.txt"]


def test_guard_output(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for out, how in [(run, "replace"), (run / "sub", "lie inside"), (tmp_path, "contain")]:
        with pytest.raises(UsageError, match=f"the output would {how} the input"):
            atomic.guard_output(out, True, [run])
    with pytest.raises(UsageError, match="not a stream"):
        atomic.guard_output("-", False)
    assert atomic.guard_output(tmp_path / "other", False, [run, None]) == tmp_path / "other"


def test_a_lock_held_by_another_process_is_refused_naming_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "from pelt_cli.io import atomic; import sys; atomic.claim(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(tmp_path / "out")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputBusy, match=f"in use by pelt process {holder.pid}"):
            atomic.claim(tmp_path / "out")
        with pytest.raises(OutputBusy), atomic_dir(tmp_path / "out"):
            pass
    finally:
        holder.communicate("")
    atomic.claim(tmp_path / "out")  # the holder ended: free, and its lock file reused
    atomic.release_claims()
    assert os.listdir(tmp_path) == []
