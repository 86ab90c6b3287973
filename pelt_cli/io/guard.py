"""The input boundary: the one place where pelt opens a file the user gave and decides whether to trust it.

Every input kind (a recipe, a data file, a safetensors file, a shard index, ``config.json``, ``run.json``,
``adapter_config.json``) is opened through here:

- only a regular file is opened: a FIFO, a device or a socket is refused from its ``stat`` (and again from the
  opened descriptor's, which is opened non-blocking so a FIFO swapped in after the ``stat`` cannot hang the read);
- a missing path, a symlink loop, a directory or a file that cannot be read is one line naming the file;
- a file is read up to a size limit, decoded as strict UTF-8, and parsed (JSON, or YAML composed with limits on
  aliases, nodes and nesting) with every error of the parser turned into a :class:`~pelt_cli.errors.PeltError`.

Each helper takes ``err``, the error type (or a factory taking the message) to raise, so a recipe's problem is a
:class:`~pelt_cli.errors.RecipeError` and a checkpoint's a :class:`~pelt_cli.errors.CheckpointError`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable
from typing import IO, Any

import yaml

from pelt_cli.errors import BadInput, PeltError

ErrFactory = Callable[[str], PeltError]
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json, shard indexes, run.json, adapter_config.json
MAX_RECIPE_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 64
MAX_YAML_ALIASES = 1000
MAX_YAML_NODES = 20_000  # after alias expansion: a "billion laughs" recipe stops here
KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


def _kind(mode: int) -> str:
    return KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _os_problem(e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "no such file or directory"
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOTDIR:
        return "a path component is not a directory"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return e.strerror or str(e)


def stat_path(path: str | os.PathLike[str], err: ErrFactory = BadInput) -> os.stat_result:
    """``os.stat`` of an input path (symlinks followed) with every failure as one line naming the path.

    Raises:
        ``err``: missing, a symlink loop, permission denied, …
    """
    try:
        return os.stat(path)
    except OSError as e:
        raise err(f"{path}: {_os_problem(e)}") from None
    except ValueError as e:  # an embedded NUL byte
        raise err(f"{path}: not a usable path ({e})") from None


def kind_of(path: str | os.PathLike[str], err: ErrFactory = BadInput) -> str:
    """``"file"``, ``"dir"``, or raise: anything else (a FIFO, a device, a socket) is refused.

    Raises:
        ``err``: the path is missing, unreadable, or neither a regular file nor a directory.
    """
    mode = stat_path(path, err).st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    raise err(f"{path}: is {_kind(mode)}; expected a regular file or a directory")


def require_regular(path: str | os.PathLike[str], what: str, err: ErrFactory = BadInput) -> os.stat_result:
    """Stat ``path`` and refuse anything but a regular file.

    Raises:
        ``err``: missing, unreadable, a directory, a FIFO, a device or a socket.
    """
    st = stat_path(path, err)
    if not stat.S_ISREG(st.st_mode):
        raise err(f"{path}: is {_kind(st.st_mode)}; expected {what}")
    return st


def is_regular(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file (following symlinks); False for a FIFO, a device, a loop, a missing path."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: str | os.PathLike[str], what: str, err: ErrFactory = BadInput) -> IO[bytes]:
    """Open a regular file for binary reading, never blocking on a FIFO swapped in after the check.

    Raises:
        ``err``: see :func:`require_regular`.
    """
    require_regular(path, what, err)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise err(f"{path}: {_os_problem(e)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise err(f"{path}: is {_kind(st.st_mode)}; expected {what}")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | os.PathLike[str], what: str, limit: int, err: ErrFactory = BadInput) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes.

    Raises:
        ``err``: not a regular file, unreadable, or larger than ``limit``.
    """
    with open_regular(path, what, err) as f:
        try:
            raw = f.read(limit + 1)
        except OSError as e:
            raise err(f"{path}: {_os_problem(e)}") from None
    if len(raw) > limit:
        raise err(f"{path}: larger than {limit:,} bytes; expected {what} of at most that size")
    return raw


def decode_utf8(raw: bytes, where: str, what: str, err: ErrFactory = BadInput) -> str:
    """Strict UTF-8 text (a UTF-8 byte-order mark is dropped); UTF-16 and binary files are named as such.

    Raises:
        ``err``: the bytes are not UTF-8 text.
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise err(f"{where}: is UTF-16 text; expected {what} in UTF-8 (save it as UTF-8)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise err(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); expected {what} in UTF-8") from None
    if "\x00" in text:
        raise err(f"{where}: holds NUL bytes (a binary file?); expected {what} as UTF-8 text")
    return text


def read_text(path: str | os.PathLike[str], what: str, limit: int, err: ErrFactory = BadInput) -> str:
    """A regular file of at most ``limit`` bytes as strict UTF-8 text (see :func:`decode_utf8`)."""
    return decode_utf8(read_bytes(path, what, limit, err), str(path), what, err)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return out


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(
    text: str | bytes,
    where: str,
    what: str,
    err: ErrFactory = BadInput,
    expect: type | None = dict,
    strict: bool = False,
) -> Any:
    """Parse JSON, every parser failure (syntax, nesting too deep, a huge integer) as one line.

    Args:
        expect: the type the document must have (``dict`` by default; None for any).
        strict: also refuse what Python's parser allows but the JSON standard (and Rust's serde, which the
            safetensors library parses headers with) does not: ``NaN``/``Infinity`` and a key given twice.

    Raises:
        ``err``: not JSON, or not of the type expected.
    """
    hooks: dict[str, Any] = {"parse_constant": _no_constant, "object_pairs_hook": _no_duplicates} if strict else {}
    try:
        doc = json.loads(text, **hooks)
    except json.JSONDecodeError as e:
        raise err(f"{where}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise err(f"{where}: {what} is not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise err(f"{where}: {what} is nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise err(f"{where}: {what} is not valid JSON ({e})") from None
    if expect is not None and not isinstance(doc, expect):
        raise err(f"{where}: {what} is a JSON {_json_type(doc)}, expected a JSON {_json_type(expect())}")
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    if SURROGATE_ESCAPE.search(raw):  # a pair decodes to a character; a lone one is valid JSON but no text
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            lone = e.object[e.start : e.end].encode("unicode_escape").decode()
            raise err(f"{where}: {what} holds {lone!r}, a lone surrogate escape that is not text") from None
    return doc


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def load_json(
    path: str | os.PathLike[str],
    what: str,
    err: ErrFactory = BadInput,
    expect: type | None = dict,
    limit: int = MAX_JSON_BYTES,
) -> Any:
    """A JSON file checked at the boundary: a regular file, at most ``limit`` bytes, UTF-8, of type ``expect``."""
    return parse_json(read_text(path, what, limit, err), str(path), what, err, expect)


# ------------------------------------------------------------------------------------------------ YAML with limits


class LimitedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer refuses deep nesting and many aliases (raised as ``yaml.YAMLError``)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose one node, counting nesting depth and aliases."""
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name)")
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def compose_yaml(text: str) -> yaml.Node | None:
    """Compose YAML text into nodes with :class:`LimitedLoader` (one document).

    Raises:
        yaml.YAMLError: a syntax error, or a limit passed.
    """
    loader = LimitedLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


class ScalarBuilder:
    """Builds scalar values as ``yaml.safe_load`` would, reusing one loader (a fresh one after a failure)."""

    def __init__(self) -> None:
        self.loader: LimitedLoader | None = None

    def __call__(self, node: yaml.ScalarNode) -> Any:
        """The value of one scalar node.

        Raises:
            yaml.YAMLError: an unknown tag (``!custom``); ValueError: a value its tag cannot convert (``!!int 1.5``).
        """
        if self.loader is None:
            self.loader = LimitedLoader("")
        try:
            return self.loader.construct_object(node, deep=True)
        except Exception:
            self.loader = None
            raise
