"""The shipping commands from the shell: ``pelt merge``, ``pelt export``, ``pelt apply-bundle``, ``pelt import-peft``
— what they print, their exit codes, and that bad input writes nothing.

The commands run in this process (``pelt_main``), except a tar stream piped to ``tar`` and an export killed midway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_run, outputs, pelt_main

from pelt_cli.run import load_base, load_run


@pytest.fixture(scope="module")
def lora_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run("lora", tiny_dir / "llama", tmp_path_factory.mktemp("ship") / "run")


def test_merge_verify_prints_the_error_and_the_path(lora_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    r = pelt_main("merge", str(lora_run), "-o", str(out), "--verify")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out}\n"
    assert "merged " in r.stderr and "folded" in r.stderr
    delta = float(r.stderr.split("max |Δ| = ")[1].split()[0])
    assert delta <= 1e-5
    assert torch.allclose(outputs(load_base(out), "llama"), outputs(load_run(lora_run)[0], "llama"), atol=1e-5)
    r = pelt_main("merge", str(lora_run), "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = pelt_main("-q", "merge", str(lora_run), "-o", str(tmp_path / "quiet"))
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{tmp_path / 'quiet'}\n", "")


def test_merge_bad_input_writes_nothing(tiny_dir: Path, lora_run: Path, tmp_path: Path) -> None:
    adapter = make_run("adapter", tiny_dir / "bert", tmp_path / "adapter")
    for args, needle in [
        ([str(adapter)], "cannot be folded"),
        ([str(lora_run), "--max-shard-size", "5 parsecs"], "5 parsecs"),
        ([str(lora_run), "--dtype", "int8"], "int8"),
        ([str(lora_run), "--freeze-gates", "median"], "median"),
        ([str(tmp_path / "nope")], "nope"),
    ]:
        r = pelt_main("merge", *args, "-o", str(tmp_path / "out"))
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) <= 2
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_directory_tar_and_peft(tiny_dir: Path, lora_run: Path, tmp_path: Path) -> None:
    import peft

    r = pelt_main("export", str(lora_run), "-o", str(tmp_path / "b"), "--peft")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'b'}\n" and "bundle " in r.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "bundle.safetensors",
        "manifest.json",
    ]
    pm = peft.PeftModel.from_pretrained(load_base(tiny_dir / "llama"), tmp_path / "b")
    ours = outputs(load_run(lora_run)[0], "llama")
    assert (outputs(pm, "llama") - ours).abs().max().item() <= 1e-6
    cmd = f"{sys.executable} -m pelt_cli.cli export {lora_run} -o - | tar -t"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    assert r.returncode == 0 and r.stdout.split() == ["manifest.json", "bundle.safetensors"], r.stderr
    adapter_run = make_run("adapter", tiny_dir / "bert", tmp_path / "adapter")
    r = pelt_main("export", str(adapter_run), "-o", str(tmp_path / "b2"), "--peft")
    assert r.returncode == 2 and "adapter" in r.stderr and not (tmp_path / "b2").exists()


def test_apply_bundle_refuses_another_base_and_merges(tiny_dir: Path, lora_run: Path, tmp_path: Path) -> None:
    assert pelt_main("export", str(lora_run), "-o", str(tmp_path / "b")).returncode == 0
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(tiny_dir / "llama"), str(other)], check=True)
    from safetensors.torch import load_file, save_file

    state = load_file(other / "model.safetensors")
    name = next(n for n in state if n.endswith("norm.weight"))
    state[name] = state[name] * 1.5
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    r = pelt_main("apply-bundle", str(tmp_path / "b"), str(other), "-o", str(tmp_path / "r1"))
    assert r.returncode == 2 and "differs from the bundle's base" in r.stderr and not (tmp_path / "r1").exists()
    r = pelt_main("apply-bundle", str(tmp_path / "b"), str(other), "-o", str(tmp_path / "r1"), "--force")
    assert r.returncode == 0 and "warning:" in r.stderr
    r = pelt_main("apply-bundle", str(tmp_path / "b"), str(tiny_dir / "llama"), "-o", str(tmp_path / "m"), "--merge")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'm'}\n"
    got = outputs(load_base(tmp_path / "m"), "llama")
    assert (got - outputs(load_run(lora_run)[0], "llama")).abs().max().item() <= 1e-5


def test_import_peft_round_trip(tiny_dir: Path, lora_run: Path, tmp_path: Path) -> None:
    from pelt_cli.peft_format import export_peft

    export_peft(lora_run, tmp_path / "peft")
    r = pelt_main("import-peft", str(tmp_path / "peft"), str(tiny_dir / "llama"), "-o", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'run'}\n"
    assert torch.equal(outputs(load_run(tmp_path / "run")[0], "llama"), outputs(load_run(lora_run)[0], "llama"))
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [i["method"] for i in meta["insertions"]] == ["lora"] * len(meta["insertions"])
    r = pelt_main("import-peft", str(tmp_path / "missing"), str(tiny_dir / "llama"), "-o", str(tmp_path / "r2"))
    assert r.returncode == 2 and "missing" in r.stderr and not (tmp_path / "r2").exists()


SLOW_EXPORT = """
import sys, time
from pelt_cli import bundle
orig = bundle.save_file
def slow(*a, **k):
    orig(*a, **k)
    time.sleep(30)
bundle.save_file = slow
bundle.export_bundle(sys.argv[1], sys.argv[2])
"""


def test_killed_export_leaves_no_bundle(lora_run: Path, tmp_path: Path) -> None:
    import hashlib
    import signal
    import time

    def digest(d: Path) -> dict[str, str]:
        return {
            str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))
            if p.is_file()
        }

    before = digest(lora_run)
    out = tmp_path / "bundle"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, str(lora_run), str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".bundle.pelt-tmp-*/bundle.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".bundle.pelt-tmp-*/bundle.safetensors")), "the export never started writing"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert not out.exists() and digest(lora_run) == before
    r = pelt_main("export", str(lora_run), "-o", str(out))  # a later export to the same path completes
    assert r.returncode == 0 and (out / "manifest.json").is_file()
    assert not list(tmp_path.glob(".bundle.pelt-tmp-*"))
