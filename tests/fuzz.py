"""Seeded mutation helpers for the fuzz harness (tests/test_fuzz.py, tests/test_fuzz_bundles.py): generic over bytes,
text and parsed JSON/YAML trees, plus the checks every fuzz case makes (exit code, one error line, no traceback,
inputs unchanged, no temp files left).

Every mutator takes a :class:`random.Random`, so a case is reproduced from its seed alone: :func:`case_rng`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_N = 1000
MAX_LINE = 1000  # an error line names the bad value, it does not print a huge one whole


def fuzz_n(default: int = DEFAULT_N) -> int:
    """The harness size: ``PELT_FUZZ_N`` (the number of recipe cases; other kinds scale with it), else ``default``."""
    return int(os.environ.get("PELT_FUZZ_N", default))


def case_rng(kind: str, i: int) -> random.Random:
    """The generator of case ``i`` of ``kind``, from ``PELT_FUZZ_SEED`` (default 0): the same case every run."""
    return random.Random(f"{os.environ.get('PELT_FUZZ_SEED', '0')}/{kind}/{i}")


# ------------------------------------------------------------------------------------------------ values

INTERESTING: list[Any] = [
    None,
    "",
    " ",
    0,
    -1,
    1,
    2**31,
    2**63,
    -(2**63),
    10**30,
    0.5,
    -0.0,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    True,
    False,
    [],
    {},
    [[]],
    {"": None},
    "a" * 300,
    "é✓\u202e\u0000",
    "../../etc/passwd",
    "0-100000000000",
    "-1",
    "all",
    "1e-4",
    ".nan",
    "!!python/object:os.system",
    ["x", 1, None],
]


def interesting(rng: random.Random) -> Any:
    """A value chosen to break parsers and validators: wrong types, extremes, non-finite floats, odd strings."""
    return copy.deepcopy(rng.choice(INTERESTING))


# ------------------------------------------------------------------------------------------------ bytes and text


def mutate_bytes(rng: random.Random, data: bytes, protect: int = 0) -> bytes:
    """One to four random edits of ``data`` (bit flips, byte sets, inserts, deletes, duplicated or cut ranges);
    the first ``protect`` bytes are left alone (e.g. a length prefix) unless the data is shorter."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        lo = min(protect, len(buf))
        op = rng.randrange(7)
        i = rng.randint(lo, max(lo, len(buf) - 1)) if buf else 0
        if op == 0 and buf and i < len(buf):
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf and i < len(buf):
            buf[i] = rng.choice([0, 0x7F, 0x80, 0xFF, ord("{"), ord('"'), ord(":"), ord("\n"), ord("&"), ord("*")])
        elif op == 2:
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and buf:
            del buf[i : i + rng.randint(1, 32)]
        elif op == 4 and buf:
            j = rng.randint(i, min(len(buf), i + 64))
            buf[j:j] = buf[i:j]
        elif op == 5:
            del buf[max(i, lo) :]
        else:
            buf += rng.choice([b"\0" * 8, b"\xff\xfe", b"garbage", rng.randbytes(rng.randint(1, 64))])
    return bytes(buf)


TOKENS = [
    "&a ",
    "*a",
    "!!int ",
    "!!float ",
    "!!str ",
    "!!binary ",
    "!custom ",
    "!!set ",
    "!!python/name:os.system ",
    "? ",
    ": ",
    "- ",
    "\t",
    "{",
    "}",
    "[",
    "]",
    ",",
    "'",
    '"',
    "#",
    "|",
    ">",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "<<: *a\n",
    "~",
    "null",
    ".nan",
    ".inf",
    "0x1F",
    "0o17",
    "1_000",
    "1e400",
    "9" * 40,
    "\u00a0",
    "\ufeff",
]


def mutate_text(rng: random.Random, text: str) -> str:
    """One to three line-level or token edits of a text (YAML, CSV, JSONL): delete, duplicate, swap or indent lines,
    empty a value, insert a YAML/JSON/CSV token or an interesting value."""
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines)) if lines else 0
        op = rng.randrange(8)
        if not lines:
            lines = [""]
        if op == 0 and len(lines) > 1:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2 and len(lines) > 1:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            lines[i] = " " * rng.choice([1, 2, 3, 4, 8]) + lines[i] if rng.random() < 0.5 else lines[i].lstrip()
        elif op == 4 and ":" in lines[i]:
            lines[i] = lines[i].split(":", 1)[0] + ":"
        elif op == 5 and ":" in lines[i]:
            lines[i] = lines[i].split(":", 1)[0] + ": " + json.dumps(interesting(rng), ensure_ascii=False)
        else:
            at = rng.randint(0, len(lines[i]))
            lines[i] = lines[i][:at] + rng.choice(TOKENS) + lines[i][at:]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ trees


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a tree of dicts and lists (the root is ``()``)."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths(v, prefix + (i,))
    return out


def _get(tree: Any, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def mutate_tree(rng: random.Random, tree: Any, *, keys: list[str] | None = None) -> Any:
    """One to three structural edits of a parsed JSON/YAML tree (a deep copy is returned): replace a node with an
    interesting value, delete or add a key or item, wrap a node in a list or a map, duplicate a node elsewhere,
    nest it deeply, or change a number by a small amount. ``keys``: names worth adding (the schema's own)."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        target = rng.choice(paths(tree))
        node = _get(tree, target)
        new = _edit(rng, node, keys or [])
        if target:
            parent = _get(tree, target[:-1])
            if new is _DELETE:
                del parent[target[-1]]
            else:
                parent[target[-1]] = new
        elif new is not _DELETE:
            tree = new
    return tree


_DELETE = object()


def _edit(rng: random.Random, node: Any, keys: list[str]) -> Any:
    op = rng.randrange(9)
    if op == 0:
        return interesting(rng)
    if op == 1:
        return _DELETE
    if op == 2 and isinstance(node, dict):
        node[rng.choice([*keys, "x", "", "__metadata__"] or ["x"])] = interesting(rng)
        return node
    if op == 3 and isinstance(node, list):
        node.insert(rng.randint(0, len(node)), interesting(rng) if rng.random() < 0.5 else copy.deepcopy(node))
        return node
    if op == 4:
        return [node]
    if op == 5:
        return {rng.choice([*keys, "x"]): node}
    if op == 6 and isinstance(node, (int, float)) and not isinstance(node, bool):
        return rng.choice([node + 1, node - 1, -node, node * 1000, node / 3 if node else 0.1, str(node)])
    if op == 7 and isinstance(node, str):
        return rng.choice([node.upper(), node[::-1], node + node, node[: len(node) // 2], node + "\x00", 0])
    if rng.random() < 0.6:
        return interesting(rng)
    nested: Any = node
    for _ in range(rng.choice([2, 3, 10, 80])):
        nested = [nested]
    return nested


# ------------------------------------------------------------------------------------------------ safetensors


def split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    """``(header JSON, data bytes)`` of a safetensors file's bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header: Any, data: bytes) -> bytes:
    """A safetensors file from a header (any JSON value: mutated ones too) and data bytes, with the right length."""
    head = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(head)) + head + data


# ------------------------------------------------------------------------------------------------ speed


@contextlib.contextmanager
def built_once() -> Iterator[None]:
    """While active, ``pelt_cli.cli.main`` reuses one click command instead of building it from the Typer app on
    every call (building costs more than validating a recipe). For harness loops whose cases change only files, not
    the working directory or the environment."""
    import typer

    real = typer.main.get_command
    memo: dict[int, Any] = {}

    def once(app: Any) -> Any:
        if id(app) not in memo:
            memo[id(app)] = real(app)
        return memo[id(app)]

    typer.main.get_command = once
    try:
        yield
    finally:
        typer.main.get_command = real


# ------------------------------------------------------------------------------------------------ checks


def snapshot(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root`` (FIFOs and other non-files are listed, not read)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or not p.is_file():
            out[rel] = "dir" if p.is_dir() else "special"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(before: dict[str, str], root: Path) -> list[str]:
    """Files under ``root`` that were not there in ``before`` (temp files, partial outputs)."""
    return sorted(set(snapshot(root)) - set(before))


def cli_problem(r: Any, *, multi: bool = False) -> str | None:
    """What is wrong with one CLI result (``subprocess.CompletedProcess`` from ``pelt_main``), or None: the exit code
    must be 0 or 2, no traceback, and on 2 exactly one ``error:`` line (``multi``: one or more, a recipe's problems)."""
    text = r.stdout + r.stderr
    if "Traceback" in text:
        return "traceback: " + r.stderr[-400:]
    if r.returncode not in (0, 2):
        return f"exit {r.returncode}: {r.stderr[-300:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    if r.returncode == 2 and not (errors if multi else len(errors) == 1):
        return f"exit 2 with {len(errors)} error lines: {r.stderr[-300:]}"
    if r.returncode == 0 and errors:
        return f"exit 0 with error lines: {r.stderr[-300:]}"
    if any(len(line) > MAX_LINE for line in errors):
        return f"an error line over {MAX_LINE} characters: {max(errors, key=len)[:300]}…"
    return None


def checked(call: Callable[[], Any], check: Callable[[Any], str | None]) -> tuple[Any, str | None]:
    """Run one case: ``(result, problem)``. An exception escaping ``call`` is a problem (the result is then None),
    as is whatever ``check`` finds in the result."""
    try:
        result = call()
    except Exception as e:  # noqa: BLE001 - a fuzz case must never raise: report it with the case
        return None, f"raised {type(e).__name__}: {str(e)[:300]}"
    return result, check(result)


def run_case(call: Callable[[], Any], check: Callable[[Any], str | None]) -> str | None:
    """:func:`checked`, the problem only."""
    return checked(call, check)[1]
