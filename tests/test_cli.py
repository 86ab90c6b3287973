"""The pelt command line: formats, stdin, pipes, exit codes, import hygiene, completions, golden output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PELT, REPO, run_pelt

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PELT_UPDATE_GOLDEN") == "1"


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PELT_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from golden (PELT_UPDATE_GOLDEN=1 regenerates)"


def test_version() -> None:
    r = run_pelt("--version")
    assert r.returncode == 0 and r.stdout.strip() == "pelt 0.1.0"


def test_help_does_not_import_torch_or_transformers() -> None:
    code = ("import sys\nfrom pelt_cli.cli import main\nrc = main(['--help'])\n"
            "bad = [m for m in ('torch', 'transformers', 'safetensors.torch', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', bad, file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY []" in r.stderr, r.stderr
    assert "inspect" in r.stdout


def test_inspect_does_not_import_torch(minilm: Path) -> None:
    code = ("import sys\nfrom pelt_cli.cli import main\nrc = main(['inspect', sys.argv[1], '--format', 'json'])\n"
            "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code, str(minilm)], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY []" in r.stderr, r.stderr


def test_minilm_json(minilm: Path) -> None:
    r = run_pelt("inspect", "minilm", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["family"] == "bert" and doc["total_tensors"] == 104
    assert doc["total_params"] == 22_713_216 + 512  # 103 F32 tensors + the I64 position_ids buffer
    assert doc["summary"]["by_dtype"]["F32"]["params"] == 22_713_216
    t = {x["name"]: x for x in doc["tensors"]}
    q = t["encoder.layer.0.attention.self.query.weight"]
    assert (q["role"], q["layer"], q["dtype"], q["shape"], q["params"]) == ("attn.q", 0, "F32", [384, 384], 147456)
    assert t["encoder.layer.5.intermediate.dense.weight"]["shape"] == [1536, 384]
    assert t["encoder.layer.5.output.dense.weight"]["role"] == "ffn.down"
    assert sum(x["params"] for x in doc["tensors"]) == doc["total_params"]


def test_formats_agree(tiny_dir: Path) -> None:
    path = str(tiny_dir / "qwen2")
    as_json = json.loads(run_pelt("inspect", path, "--format", "json").stdout)
    lines = run_pelt("inspect", path, "--format", "jsonl").stdout.splitlines()
    tsv = run_pelt("inspect", path, "--format", "tsv").stdout.splitlines()
    table = run_pelt("inspect", path, "--format", "table", env={"COLUMNS": "200"})
    assert [json.loads(x) for x in lines] == as_json["tensors"]
    assert tsv[0].split("\t") == ["name", "role", "layer", "block", "dtype", "shape", "params", "bytes", "shard"]
    assert len(tsv) == len(as_json["tensors"]) + 1
    assert table.returncode == 0 and "model.layers.0.self_attn.q_proj.weight" in table.stdout
    assert "attn.q" in table.stdout


def test_default_format_in_pipe_is_tsv(tiny_dir: Path) -> None:
    r = run_pelt("inspect", str(tiny_dir / "llama"))
    assert r.stdout.startswith("name\trole\t") and "\x1b[" not in r.stdout


def test_stdin_dash(tiny_dir: Path) -> None:
    r = run_pelt("inspect", "-", "--json", stdin=f"{tiny_dir / 'gpt2'}\n")
    assert r.returncode == 0 and json.loads(r.stdout)["family"] == "gpt2"
    r = run_pelt("inspect", "-", stdin="")
    assert r.returncode == 2 and r.stderr.startswith("error: MODEL is '-'")


def test_filter_exclude_depth_sort_limit(tiny_dir: Path) -> None:
    path = str(tiny_dir / "llama")
    doc = json.loads(run_pelt("inspect", path, "--json", "-f", "model.layers.*.self_attn.{q,v}_proj.*").stdout)
    assert sorted(t["name"] for t in doc["tensors"]) == [
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"]
    assert doc["selected"]["params"] == 2 * (32 * 32 + 16 * 32)
    doc = json.loads(run_pelt("inspect", path, "--json", "-f", "attn.k", "-x", "model.layers.1").stdout)
    assert [t["name"] for t in doc["tensors"]] == ["model.layers.0.self_attn.k_proj.weight"]
    doc = json.loads(run_pelt("inspect", path, "--json", "--depth", "2", "--sort", "params:desc", "-n", "2").stdout)
    assert [m["name"] for m in doc["modules"]] == ["model.layers", "lm_head.weight"]  # ties keep name order
    assert doc["modules"][0]["params"] == sum(
        t["params"] for t in json.loads(run_pelt("inspect", path, "--json").stdout)["tensors"]
        if t["name"].startswith("model.layers."))


@pytest.mark.parametrize("args,fragment", [
    (["--depth", "0"], "--depth 0"),
    (["--sort", "size"], "--sort 'size'"),
    (["--format", "xml"], "xml"),
    (["--bogus"], "No such option: --bogus"),
])
def test_usage_errors_exit_2(tiny_dir: Path, args: list[str], fragment: str) -> None:
    r = run_pelt("inspect", str(tiny_dir / "llama"), *args)
    assert r.returncode == 2 and r.stdout == ""
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    r = run_pelt("inspect", str(tmp_path / "nope"), env={"PELT_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


@pytest.mark.parametrize("args", ["inspect minilm --format jsonl", "apply unipelt minilm --dry-run --format table"])
def test_broken_pipe_exits_0(minilm: Path, args: str) -> None:
    cmd = " ".join(PELT) + f" {args} | head -n 1; echo \"rc=${{PIPESTATUS[0]}}\""
    for _ in range(3):  # make the writer outlive the reader: repeat the output past the pipe buffer
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO)
        assert r.stdout.strip().endswith("rc=0"), r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "Broken pipe" not in r.stderr


def test_golden_tsv_and_summary(tiny_dir: Path) -> None:
    for fam in ("gpt2", "whisper", "qwen2_audio"):
        tsv = run_pelt("inspect", str(tiny_dir / fam), "--format", "tsv").stdout
        _golden(f"inspect-{fam}.tsv", tsv)
        summary = run_pelt("inspect", str(tiny_dir / fam), "--summary", "--format", "tsv").stdout
        _golden(f"inspect-{fam}-summary.tsv", summary)


# ------------------------------------------------------------------------------------------------ completion

@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_in_sync(shell: str) -> None:
    r = run_pelt("completion", shell)
    assert r.returncode == 0
    path = REPO / "completions" / {"bash": "pelt.bash", "zsh": "_pelt", "fish": "pelt.fish"}[shell]
    assert path.read_text() == r.stdout, f"{path} is stale: bash scripts/gen-completions.sh regenerates it"


def test_completion_runtime_completes_commands_and_short_names() -> None:
    env = {"_PELT_COMPLETE": "complete_bash", "COMP_WORDS": "pelt ins", "COMP_CWORD": "1"}
    r = run_pelt(env=env)
    assert r.stdout.split() == ["inspect"]
    env = {"_PELT_COMPLETE": "complete_bash", "COMP_WORDS": "pelt inspect min", "COMP_CWORD": "2"}
    assert "minilm" in run_pelt(env=env).stdout.split()
