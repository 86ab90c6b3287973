"""Code rules that keep the CLI fast and the layers apart, checked rather than hoped for."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "pelt_cli"


def test_only_console_imports_rich() -> None:
    offenders = [p.name for p in SRC.rglob("*.py")
                 if re.search(r"^\s*(import rich|from rich)", p.read_text(), re.M) and p.name != "console.py"]
    assert offenders == []


def test_cli_imports_no_torch_at_module_level() -> None:
    for name in ("cli.py", "console.py", "report.py", "sites.py", "architectures.py", "checkpoint.py", "errors.py"):
        top = [ln for ln in (SRC / name).read_text().splitlines() if re.match(r"(import|from) ", ln)]
        assert not [ln for ln in top if re.search(r"\b(torch|transformers|numpy)\b", ln)], name


def test_library_never_prints_or_exits() -> None:
    for p in SRC.rglob("*.py"):
        if p.name in ("cli.py", "console.py"):
            continue
        text = p.read_text()
        assert not re.search(r"^\s*print\(", text, re.M), p.name
        assert not re.search(r"sys\.exit\(|raise SystemExit", text), p.name


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(REPO / ".venv" / "bin" / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff not installed (scripts/setup.sh installs it)")
    r = subprocess.run([ruff, "check", "pelt_cli", "tests", "bench"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
