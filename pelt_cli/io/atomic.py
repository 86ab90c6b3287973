"""Atomic writes: the one write-to-temp-then-rename implementation of pelt.

Every output is first written under a temporary sibling name ``.NAME.pelt-tmp-PID`` and renamed into place only
when complete, so a reader never sees half a file and a crash leaves the old output untouched. A replaced directory
is moved aside as ``.NAME.pelt-old-PID`` for the instant of the swap. :func:`clean_stale_temps` removes what a
killed process left behind.

Standard library only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pelt_cli.errors import OutputExistsError

TMP_TAG = "pelt-tmp"
OLD_TAG = "pelt-old"


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
        p.unlink(missing_ok=True)


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
        os.replace(out, old)
        os.replace(tmp, out)
        _remove(old)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


class atomic_dir:  # noqa: N801 - used as a context manager like open()
    """Fill a temporary sibling directory, rename it to ``out`` on success, remove it on failure.

    Example:
        with atomic_dir(out, force) as tmp:
            (tmp / "run.json").write_text(text)
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False) -> None:
        self.out, self.force = Path(out), force
        self.tmp = temp_sibling(self.out)

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        commit_dir(self.tmp, self.out, self.force)


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` on success and is removed on failure.

    For writers that want a path (``torch.save``, ``savefig``). The body may fsync its own file descriptor.

    Args:
        path: the destination file; replaced if it exists.

    Yields:
        The temporary path (``.NAME.pelt-tmp-PID`` beside ``path``).
    """
    p = Path(path)
    tmp = temp_sibling(p)
    try:
        yield tmp
        os.replace(tmp, p)
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


def clean_stale_temps(out: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.OUT.pelt-tmp-PID`` / ``.OUT.pelt-old-PID`` left beside ``out`` by processes that no longer run.

    Args:
        out: the output path whose leftovers to remove.

    Returns:
        The paths removed.
    """
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    head = f".{out.name}."
    for p in out.parent.iterdir():
        kind, _, pid = p.name[len(head) :].rpartition("-")
        if not p.name.startswith(head) or kind not in (TMP_TAG, OLD_TAG) or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        _remove(p)
        removed.append(p)
    return removed


def prepare_out(out: str | os.PathLike[str], force: bool) -> None:
    """Refuse an existing output unless ``force``, and clear stale temporaries of killed runs beside it.

    Args:
        out: the output path.
        force: an existing output will be replaced.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists", hint="choose another -o path or pass --force")
    clean_stale_temps(out)
