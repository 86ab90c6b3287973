"""Atomic writes: the one write-to-temp-then-rename implementation of pelt, and the rules that keep every output,
a run above all, whole through kills, full disks and concurrent processes.

**Files.** A file is written under a temporary sibling name ``.NAME.pelt-tmp-PID`` and renamed into place when
complete (:func:`atomic_file`), so a reader never sees half a file.

**Directories (runs, merged checkpoints, bundles).** A directory output changes as one unit: every command that
writes one (``apply``, each ``train`` checkpoint, an in-place ``prune``, any ``--force`` replace) fills a complete new
generation in ``.OUT.pelt-tmp-PID`` (files it does not change are hard-linked or copied from the current one) and
commits it by renames (:func:`commit_dir`):

1. ``OUT`` → ``.OUT.pelt-old-PID`` (only when ``OUT`` exists; by then the new generation is complete);
2. ``.OUT.pelt-tmp-PID`` → ``OUT``;
3. ``.OUT.pelt-old-PID`` removed.

A kill before 1 leaves ``OUT`` as it was (plus a temporary); after 2, the new ``OUT`` (plus the old one aside).
A kill between 1 and 2 leaves no ``OUT`` but both complete generations aside: :func:`recover`, which
:func:`clean_stale_temps` runs and ``Run.open`` / ``Base.open`` call before reading, rolls forward to the new one
(complete, because step 1 only happens after it is). Only leftovers of processes that no longer run are touched.
A full disk fails while the new generation is filled: it is removed, ``OUT`` untouched. Runs stay plain
directories that ``Run.open``, ``merge``, ``export``, transformers and peft read as they are (a symbolic link
swapped to a generation directory would be atomic too, but ``cp -r``, ``tar`` and ``rm -r`` treat links apart).

**Locks.** A writer holds ``fcntl.flock`` on ``.OUT.pelt-lock`` beside the output (the lock file is removed on
release): :class:`atomic_dir` for its write, :func:`claim` from a command's check of the output until its commit,
:func:`locked` for a whole ``pelt train``. A second process gets :class:`~pelt_cli.errors.OutputBusy` (exit 1) at
once, naming the holder's PID; nobody waits. Exit 1, not 2: the input is fine, the environment is busy. The kernel
drops the lock of a killed process; its lock file is removed by the next writer.

**Outputs and inputs.** :func:`guard_output` is the one check of a command's ``-o``: not ``-`` (unless the command
streams), not an input, not inside one, not containing one, not existing without ``--force``.

**Tests.** ``PELT_TEST_KILL_AT_RENAME=N`` ends the process with ``os._exit(137)`` right before its Nth rename through
this module; ``PELT_TEST_RENAME_LOG=FILE`` appends ``N NAME`` per rename (tests/test_atomic_runs.py kills at each).

Standard library only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pelt_cli.errors import OutputBusy, OutputExistsError, UsageError

TMP_TAG = "pelt-tmp"
OLD_TAG = "pelt-old"
LOCK_TAG = "pelt-lock"
KILL_ENV = "PELT_TEST_KILL_AT_RENAME"
LOG_ENV = "PELT_TEST_RENAME_LOG"

_renames: dict[int, int] = {}  # pid → renames done (a forked child counts from 0)
_locks: dict[str, tuple[int, bool]] = {}  # lock path → (fd, pinned by locked())


def _rename(src: Path, dst: Path) -> None:
    """``os.replace`` with the test hooks (see the module docstring)."""
    pid = os.getpid()
    n = _renames[pid] = _renames.get(pid, 0) + 1
    if os.environ.get(KILL_ENV) == str(n):
        os._exit(137)
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{n} {dst.name}\n")
    os.replace(src, dst)


def temp_sibling(path: str | os.PathLike[str], tag: str = TMP_TAG) -> Path:
    """The temporary name beside ``path`` owned by this process: ``.NAME.pelt-tmp-PID``.

    Args:
        path: the final output path.
        tag: ``pelt-tmp`` (being written) or ``pelt-old`` (being replaced).

    Returns:
        The sibling path.
    """
    p = Path(path)
    return p.parent / f".{p.name}.{tag}-{os.getpid()}"


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. another user's: left where it is


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename in it) to disk; silently skipped where directories can't be opened.

    Args:
        directory: the directory.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str], overwrite: bool) -> None:
    """Rename a finished temporary directory into place, replacing ``out`` only when ``overwrite``.

    A replaced ``out`` is moved aside as ``.OUT.pelt-old-PID`` first; a kill between the two renames is undone by
    :func:`recover` (see the module docstring).

    Args:
        tmp: the finished temporary directory.
        out: the final path.
        overwrite: replace an existing ``out`` (moved aside, swapped, then removed).

    Raises:
        OutputExistsError: ``out`` exists (e.g. appeared while writing) and ``overwrite`` is false; ``tmp`` is
            removed and ``out`` left untouched.
    """
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputExistsError(f"{out}: appeared while writing; left untouched")
        old = temp_sibling(out, OLD_TAG)
        _rename(out, old)
        try:
            _rename(tmp, out)
        except OSError:
            os.replace(old, out)  # the old one back at once
            raise
        _remove(old)
    else:
        _rename(tmp, out)
    fsync_dir(out.parent)


class atomic_dir:  # noqa: N801 - used as a context manager like open()
    """Fill a temporary sibling directory, rename it to ``out`` on success, remove it on failure.

    The output's lock is held from entry to exit (unless the caller holds it already), and stale leftovers of dead
    processes beside ``out`` are cleaned (or recovered) on entry.

    Example:
        with atomic_dir(out, force) as tmp:
            (tmp / "run.json").write_text(text)
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False) -> None:
        self.out, self.force = Path(out), force
        self.tmp = temp_sibling(self.out)
        self.taken = False

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.taken = _acquire(self.out, pinned=False)
        try:
            clean_stale_temps(self.out)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except BaseException:
            self._release()
            raise
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            commit_dir(self.tmp, self.out, self.force)
        finally:
            self._release()

    def _release(self) -> None:
        key = str(lock_path(self.out))
        if key in _locks and not _locks[key][1]:  # taken here, or claimed by the command; not a whole train's
            release(self.out)


def link_or_copy(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Put every file and folder of ``src`` into ``dst`` (hard links where possible, else copies), except the names
    in ``skip`` and pelt's own temporaries: the unchanged part of a new generation (files are only ever replaced by
    renames, never rewritten in place, so a link is as good as a copy).

    Args:
        src: the current directory.
        dst: the new generation being filled.
        skip: top-level names left out (the files the caller writes anew).
    """

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    skip = set(skip)
    for p in src.iterdir():
        if p.name in skip or any(f".{tag}" in p.name for tag in (TMP_TAG, OLD_TAG, LOCK_TAG)):
            continue
        if p.is_dir() and not p.is_symlink():
            leftovers = shutil.ignore_patterns(*(f"*.{tag}*" for tag in (TMP_TAG, OLD_TAG, LOCK_TAG)))
            shutil.copytree(p, dst / p.name, copy_function=link, ignore=leftovers)
        else:
            link(str(p), str(dst / p.name))


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` on success and is removed on failure.

    For writers that want a path (``torch.save``, ``savefig``). The body may fsync its own file descriptor. Stale
    temporaries of dead processes beside ``path`` are removed first.

    Args:
        path: the destination file; replaced if it exists.

    Yields:
        The temporary path (``.NAME.pelt-tmp-PID`` beside ``path``).
    """
    p = Path(path)
    tmp = temp_sibling(p)
    clean_stale_temps(p)
    try:
        yield tmp
        _rename(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace a file's content atomically: the old content or the new one, never a mix.

    Args:
        path: the destination file.
        data: its new content.
    """
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Replace a text file atomically (UTF-8): the old content or the new one, never a mix.

    Args:
        path: the destination file.
        text: its new content.
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one owned by another user counts as alive).

    Args:
        pid: the process id.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path) -> Iterator[tuple[Path, str, int]]:
    """``(path, tag, pid)`` of every ``.OUT.pelt-tmp-PID`` / ``.OUT.pelt-old-PID`` beside ``out``."""
    head = f".{out.name}."
    for p in out.parent.iterdir():
        kind, _, pid = p.name[len(head) :].rpartition("-")
        if p.name.startswith(head) and kind in (TMP_TAG, OLD_TAG) and pid.isdigit():
            yield p, kind, int(pid)


def _dead(pid: int) -> bool:
    return pid != os.getpid() and not pid_alive(pid)


def recover(out: str | os.PathLike[str], wait: float = 2.0) -> bool:
    """Bring back an output that a killed process left between the two renames of :func:`commit_dir`.

    ``OUT`` missing with ``.OUT.pelt-old-PID`` and ``.OUT.pelt-tmp-PID`` beside it (PID gone): the new generation is
    renamed into place (it is complete: the old one is only moved aside after it is). A live process in the middle
    of its swap is waited for (up to ``wait`` seconds), never touched.

    Args:
        out: the output path.
        wait: seconds to wait for a live writer's swap to finish.

    Returns:
        Whether ``out`` was brought back.
    """
    out = Path(out)
    deadline = time.monotonic() + wait
    while out.parent.is_dir() and not os.path.lexists(out):
        olds = [pid for _, kind, pid in _leftovers(out) if kind == OLD_TAG]
        for pid in olds:
            if not _dead(pid):
                continue
            new = out.parent / f".{out.name}.{TMP_TAG}-{pid}"
            if not new.is_dir():
                continue  # not a cut swap (it always leaves the new one): maybe a half-removed old one; never revived
            try:
                os.replace(new, out)
            except OSError:
                return False  # e.g. a read-only directory: the caller reports the missing output
            fsync_dir(out.parent)
            clean_stale_temps(out)  # the killed writer's other leftovers, its lock file included
            return True
        if all(_dead(pid) for pid in olds) or time.monotonic() > deadline:
            return False  # nothing to wait for: no live writer in the middle of a swap
        time.sleep(0.02)
    return False


def clean_stale_temps(out: str | os.PathLike[str]) -> list[Path]:
    """Recover ``out`` if a killed swap left it missing (:func:`recover`), then remove the ``.OUT.pelt-tmp-PID`` /
    ``.OUT.pelt-old-PID`` left beside ``out`` by processes that no longer run, and a lock file nobody holds.

    Args:
        out: the output path whose leftovers to remove.

    Returns:
        The paths removed.
    """
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    recover(out, wait=0.0)
    for p, _, pid in list(_leftovers(out)):
        if _dead(pid):
            _remove(p)
            removed.append(p)
    _drop_stale_lock(out)
    return removed


def _drop_stale_lock(out: Path) -> None:
    """Remove the lock file a killed writer left (nobody holds it); a live holder's stays."""
    lp = lock_path(out)
    if str(lp) in _locks or not lp.exists():
        return
    try:
        if _acquire(out, pinned=False):
            release(out)
    except OutputBusy:
        pass


def prepare_out(out: str | os.PathLike[str], force: bool) -> None:
    """Refuse an existing output unless ``force``, and clear stale temporaries of killed runs beside it.

    Args:
        out: the output path.
        force: an existing output will be replaced.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    out = Path(out)
    clean_stale_temps(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists", hint="choose another -o path or pass --force")


def guard_output(
    out: str | os.PathLike[str],
    force: bool,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    stream: bool = False,
) -> Path:
    """The one check of a command's ``-o``: an output may never be, contain or lie inside an input.

    Args:
        out: the output path (``-``: stdout, only where the command streams).
        force: an existing output will be replaced.
        inputs: the paths the command reads (None, "" and "-", stdin, are ignored).
        stream: the command can write ``-`` as a stream.

    Returns:
        ``out`` as a path.

    Raises:
        UsageError: ``-`` for a command that writes a directory, or an output that overlaps an input.
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    if str(out) == "-" and not stream:
        raise UsageError("-o -: this command writes a directory, not a stream", hint="give a directory path")
    o = Path(os.path.realpath(out))
    for inp in inputs:
        if inp is None or str(inp) in ("", "-"):
            continue
        i = Path(os.path.realpath(inp))
        how = "replace" if o == i else "contain" if o in i.parents else "lie inside" if i in o.parents else ""
        if how:
            raise UsageError(f"{out}: the output would {how} the input {inp}", hint="choose an -o path outside it")
    prepare_out(out, force)
    return Path(out)


# ---------------------------------------------------------------------------------------------------------- locks


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file of an output: ``.NAME.pelt-lock`` beside it (symbolic links resolved)."""
    p = Path(os.path.realpath(path))
    return p.parent / f".{p.name}.{LOCK_TAG}"


def _acquire(path: str | os.PathLike[str], pinned: bool) -> bool:
    """Take the output's lock; False when this process holds it already or no lock can be taken here (a read-only
    directory, a file system without ``flock``: the write then fails or goes on unlocked).

    Raises:
        OutputBusy: another process holds it.
    """
    lp = lock_path(path)
    if str(lp) in _locks:
        return False
    for _ in range(5):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusy(
                    f"{path}: in use by pelt process {holder}, which is writing it",
                    hint="wait for it to finish, or stop it (kill " + holder + ")",
                ) from None
            return False
        try:
            same = os.fstat(fd).st_ino == os.stat(lp).st_ino  # not a lock file its holder just removed
        except OSError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            _locks[str(lp)] = (fd, pinned)
            return True
        os.close(fd)
    return False


def claim(path: str | os.PathLike[str]) -> None:
    """Lock an output from a command's check until its commit (:class:`atomic_dir` releases it),
    :func:`release_claims` (the CLI calls it after each command) or the end of the process; leftovers of dead
    processes beside it are cleaned.

    Raises:
        OutputBusy: another process is writing it.
    """
    _acquire(path, pinned=False)
    clean_stale_temps(path)


def release(path: str | os.PathLike[str]) -> None:
    """Release this process's lock of an output (a no-op when it holds none)."""
    lp = lock_path(path)
    held = _locks.pop(str(lp), None)
    if held is None:
        return
    try:
        lp.unlink(missing_ok=True)  # while still held: a newcomer that opened it before sees another inode, retries
    except OSError:
        pass
    os.close(held[0])


def release_claims() -> None:
    """Release every lock :func:`claim` took and no commit released (a command that failed after its check)."""
    for key, (_, pinned) in list(_locks.items()):
        if not pinned:
            release(Path(key).parent / Path(key).name[1 : -len("." + LOCK_TAG)])


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an output's lock for a whole command (``pelt train``: every checkpoint of the run); leftovers of dead
    processes beside it are cleaned.

    Raises:
        OutputBusy: another process is writing it.
    """
    taken = _acquire(path, pinned=True)
    try:
        clean_stale_temps(path)
        yield
    finally:
        if taken:
            release(path)
