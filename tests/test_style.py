"""Code rules that keep the CLI fast and the layers apart, checked rather than hoped for.

The structural rules (function length, command length, import cycles, private imports) read the package's syntax
trees once per session and list every offender in the assertion message.
"""

from __future__ import annotations

import ast
import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "pelt_cli"
PACKAGE = "pelt_cli"
MAX_FUNCTION_LINES = 60
MAX_COMMAND_BODY_LINES = 25
RUFF_PATHS = ["pelt_cli", "tests", "bench"]


def test_only_console_imports_rich() -> None:
    offenders = [
        p.name
        for p in SRC.rglob("*.py")
        if re.search(r"^\s*(import rich|from rich)", p.read_text(), re.M) and p.name != "console.py"
    ]
    assert offenders == []


def test_cli_imports_no_torch_at_module_level() -> None:
    io_files = tuple(f"io/{p.name}" for p in sorted((SRC / "io").glob("*.py")))
    for name in ("cli.py", "console.py", "report.py", "sites.py", "architectures.py", "errors.py", *io_files):
        top = [ln for ln in (SRC / name).read_text().splitlines() if re.match(r"(import|from) ", ln)]
        assert not [ln for ln in top if re.search(r"\b(torch|transformers|numpy)\b", ln)], name


def test_library_never_prints_or_exits() -> None:
    for p in SRC.rglob("*.py"):
        if p.name in ("cli.py", "console.py"):
            continue
        text = p.read_text()
        assert not re.search(r"^\s*print\(", text, re.M), p.name
        assert not re.search(r"sys\.exit\(|raise SystemExit", text), p.name


# ----------------------------------------------------------------------------------------------------------------
# The package's syntax trees


def _module_name(path: Path) -> str:
    """``pelt_cli/io/reader.py`` → ``pelt_cli.io.reader``; a package's ``__init__.py`` → the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def _trees() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package: dotted name → (path, parsed tree)."""
    return {_module_name(p): (p, ast.parse(p.read_text(), filename=str(p))) for p in sorted(SRC.rglob("*.py"))}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function and method, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _is_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with ``@<typer app>.command(...)`` (the main app or a sub-app such as ``recipes``)."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "command":
            return True
    return False


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's end."""
    body = fn.body
    if (
        len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    return (fn.end_lineno or fn.lineno) - body[0].lineno + 1


def test_no_function_over_60_lines() -> None:
    offenders = []
    for path, tree in _trees().values():
        for fn in _functions(tree):
            n = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if n > MAX_FUNCTION_LINES:
                offenders.append(f"{_rel(path)}:{fn.lineno} {fn.name} ({n} lines)")
    assert not offenders, f"{len(offenders)} functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_no_cli_command_body_over_25_lines() -> None:
    path, tree = _trees()[f"{PACKAGE}.cli"]
    commands = [fn for fn in _functions(tree) if _is_command(fn)]
    assert len(commands) >= 10, "the command decorator was not recognised"  # guards the check itself
    offenders = [
        f"{_rel(path)}:{fn.lineno} {fn.name} (body {_body_lines(fn)} lines)"
        for fn in commands
        if _body_lines(fn) > MAX_COMMAND_BODY_LINES
    ]
    assert not offenders, f"command bodies over {MAX_COMMAND_BODY_LINES} lines:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------------------------------------------
# Imports between the package's modules


def _package_of(module: str) -> str:
    """The package a module's relative imports resolve against."""
    path, _ = _trees()[module]
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module named by ``from X import …`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> Iterator[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` for every import of the package, at any depth.

    ``from pelt_cli import merge`` names the submodule ``pelt_cli.merge``; ``from pelt_cli.methods import
    register`` names the package ``pelt_cli.methods`` and the name ``register``.
    """
    _, tree = _trees()[module]
    modules = _trees()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, None, node.lineno) if sub in modules else (target, alias.name, node.lineno)


def _import_graph() -> dict[str, dict[str, int]]:
    """importer → {imported module: first line}. A package's ``__init__`` importing its own submodules (to
    register them, as ``pelt_cli.methods`` does) is left out: the submodules import the package for the registry,
    and that pair is the registration pattern, not a layering cycle."""
    graph: dict[str, dict[str, int]] = {m: {} for m in _trees()}
    for module, (path, _) in _trees().items():
        for target, _name, line in _imports(module):
            if target not in graph or target == module:
                continue
            if path.name == "__init__.py" and target.startswith(module + "."):
                continue
            graph[module].setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles() -> None:
    graph = _import_graph()
    lines = []
    for comp in _cycles(graph):
        lines.append("cycle among " + ", ".join(comp) + ":")
        members = set(comp)
        for m in comp:
            path, _ = _trees()[m]
            lines += [f"  {_rel(path)}:{line} imports {t}" for t, line in sorted(graph[m].items()) if t in members]
    assert not lines, "import cycles between pelt_cli modules:\n" + "\n".join(lines)


def test_cycle_finder_sees_a_cycle() -> None:
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def _module_aliases(module: str) -> dict[str, str]:
    """Local names bound to package modules (``from pelt_cli import merge``, ``import pelt_cli.x as y``)."""
    _, tree = _trees()[module]
    modules = _trees()
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({a.asname: a.name for a in node.names if a.asname and a.name in modules})
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names.update(
                {a.asname or a.name: f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            )
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_imported_across_modules() -> None:
    offenders = []
    for module, (path, tree) in _trees().items():
        for target, name, line in _imports(module):
            if name and _is_private(name) and target != module:
                offenders.append(f"{_rel(path)}:{line} imports {name} from {target}")
        aliases = _module_aliases(module)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _is_private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != module
            ):
                offenders.append(f"{_rel(path)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not offenders, "private names used across modules:\n" + "\n".join(sorted(set(offenders)))


# ----------------------------------------------------------------------------------------------------------------
# Repeated code

DUP_LINES = 6
MAX_DUP_PAIRS = 2


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, stripped text)`` of a file's code lines: blank lines, comments, docstrings and imports left out
    (as pylint's similarity checker does), so that only repeated logic counts."""
    text = path.read_text()
    skip: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            skip.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                skip.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return [
        (i, s)
        for i, line in enumerate(text.splitlines(), 1)
        if (s := line.strip()) and not s.startswith("#") and i not in skip
    ]


def repeated_blocks(paths: list[Path], n: int = DUP_LINES) -> list[str]:
    """Pairs of places whose next ``n`` code lines are the same, each maximal run reported once with its length."""
    lines = {p: _code_lines(p) for p in paths}
    seen: dict[tuple[str, ...], list[tuple[Path, int]]] = {}
    for p, ls in lines.items():
        for k in range(len(ls) - n + 1):
            seen.setdefault(tuple(s for _, s in ls[k : k + n]), []).append((p, k))
    pairs = {
        (a, ka, b, kb)
        for locs in seen.values()
        for i, (a, ka) in enumerate(locs)
        for b, kb in locs[i + 1 :]
        if a != b or abs(ka - kb) >= n
    }
    out = []
    for a, ka, b, kb in sorted(pairs, key=lambda t: (str(t[0]), t[1], str(t[2]), t[3])):
        if (a, ka - 1, b, kb - 1) in pairs:
            continue  # inside a run already reported
        length = next(m for m in range(1, 10**6) if (a, ka + m, b, kb + m) not in pairs) + n - 1
        out.append(f"{_rel(a)}:{lines[a][ka][0]} = {_rel(b)}:{lines[b][kb][0]} ({length} code lines)")
    return out


def test_at_most_two_repeated_blocks() -> None:
    paths = [p for d in ("pelt_cli", "tests", "bench") for p in sorted((REPO / d).rglob("*.py"))]
    found = repeated_blocks(paths)
    assert len(found) <= MAX_DUP_PAIRS, (
        f"{len(found)} pairs of repeated {DUP_LINES}-line blocks (at most {MAX_DUP_PAIRS}):\n" + "\n".join(found)
    )


def test_repeated_blocks_finder(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = f({i})\n" for i in range(7))
    (tmp_path / "a.py").write_text(f'import os\n\n\ndef a():\n    """Doc."""\n{body}')
    (tmp_path / "b.py").write_text(f"import os\n\n\ndef b():\n    # comment\n{body}    return 1\n")
    (tmp_path / "c.py").write_text(body.replace("    ", "").replace("f(", "g("))  # other code: no match
    found = repeated_blocks(sorted(tmp_path.glob("*.py")))
    assert found == [f"{tmp_path / 'a.py'}:6 = {tmp_path / 'b.py'}:6 (7 code lines)"]


# ----------------------------------------------------------------------------------------------------------------
# ruff


def _ruff() -> str:
    ruff = shutil.which("ruff") or str(REPO / ".venv" / "bin" / "ruff")
    assert Path(ruff).exists(), "ruff is not installed: scripts/setup.sh installs the pinned ruff (requirements.txt)"
    return ruff


def test_ruff_clean() -> None:
    r = subprocess.run(
        [_ruff(), "check", "--output-format", "concise", *RUFF_PATHS], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, "ruff check found problems:\n" + r.stdout + r.stderr


def test_ruff_format_clean() -> None:
    r = subprocess.run(
        [_ruff(), "format", "--check", "--output-format", "concise", *RUFF_PATHS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, (
        "files ruff format would change (run `ruff format pelt_cli tests bench`):\n" + r.stdout + r.stderr
    )
