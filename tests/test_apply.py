"""``pelt apply``: plans, run directories, save/load bit-identical for every method, identity on MiniLM."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import pelt_main
from tiny_models import main_output, sample_inputs

from pelt_cli import recipe as rc
from pelt_cli import surgery
from pelt_cli.apply import apply, plan
from pelt_cli.insert import insert_recipe
from pelt_cli.run import ADAPTER_FILE, RUN_FILE, load_run


def test_apply_save_load_bit_identical(tiny_dir: Path, tmp_path: Path) -> None:
    from pelt_cli.io.writer import save_file

    run = apply(rc.load("lora"), tiny_dir / "llama", tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == [ADAPTER_FILE, "recipe.yaml", RUN_FILE]
    meta = json.loads((run / RUN_FILE).read_text())
    assert meta["base"]["fingerprint"].startswith("blake2b:") and meta["new_params"] == 4 * 8 * (32 + 32) - 2 * 8 * 16
    # give the adapter non-trivial weights, then load twice: outputs must be bit-identical
    from safetensors.torch import load_file

    state = load_file(run / ADAPTER_FILE)
    g = torch.Generator().manual_seed(3)
    save_file({k: torch.randn(v.shape, generator=g) for k, v in state.items()}, run / ADAPTER_FILE)
    m1, _ = load_run(run)
    m2, _ = load_run(run)
    x = sample_inputs("llama")
    with torch.no_grad():
        a, b = m1(**x).logits, m2(**x).logits
    assert torch.equal(a, b)
    trainable = {n for n, p in m1.named_parameters() if p.requires_grad}
    assert trainable == set(state)


def test_load_run_refuses_other_base(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    from pelt_cli.errors import CheckpointError

    run = apply(rc.load("lora"), tiny_dir / "llama", tmp_path / "run")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir / "llama", other)
    from pelt_cli.io.checkpoint import open_checkpoint

    info = open_checkpoint(other).tensors["model.norm.weight"]
    with open(info.file, "r+b") as f:
        f.seek(info.begin)
        f.write(b"\x00\x00\x00\x40")  # 2.0 where the norm holds 1.0
    with pytest.raises(CheckpointError, match="not the base this run was made on"):
        load_run(run, base=other)


def test_minilm_plan_matches_peft_count(minilm: Path) -> None:
    p = plan(rc.load("lora"), minilm)
    assert p.new_params == 73_728  # HF peft LoRA r=8 on query/value of all-MiniLM-L6-v2 reports the same
    assert len(p.rows) == 12 and {r.role for r in p.rows} == {"attn.q", "attn.v"}
    assert p.base_params == 22_713_728


def test_dry_run_writes_nothing_and_prints_plan(tiny_dir: Path, tmp_path: Path) -> None:
    r = pelt_main("apply", "lora", str(tiny_dir / "bert"), "--dry-run", "--format", "json", "-o", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["new_params"] == 4 * 8 * 64 and len(doc["insertions"]) == 4
    assert doc["insertions"][0]["disk_site"] == "bert.encoder.layer.0.attention.self.query"
    assert list(tmp_path.iterdir()) == []


def test_apply_prints_run_path_and_pipes_into_inspect(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = pelt_main("apply", "lora", str(tiny_dir / "vit"), "-o", str(out), "inserts.0.params.rank=4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    r2 = pelt_main("inspect", "-", "--json", stdin=r.stdout)
    doc = json.loads(r2.stdout)
    assert doc["new_params"] == 4 * 4 * 64 and all(t["trainable"] for t in doc["tensors"])
    # ViT: the recipe's roles resolve through the in-memory names; the plan reports on-disk sites
    assert {t["site"] for t in doc["tensors"]} >= {"encoder.layer.0.attention.attention.query"}
    r3 = pelt_main("apply", "lora", str(tiny_dir / "vit"), "-o", str(out))
    assert r3.returncode == 2 and "already exists" in r3.stderr


def test_stray_flag_is_an_error(tiny_dir: Path) -> None:
    r = pelt_main("apply", "lora", str(tiny_dir / "bert"), "--dry-run", "--rnak", "8")
    assert r.returncode == 2 and "No such option: --rnak" in r.stderr


@pytest.mark.parametrize(
    "recipe_name,family",
    [
        ("unipelt", "bert"),
        ("adapter", "gpt2"),
        ("ia3", "whisper"),
        ("prefix", "llama"),
        ("qwen2-audio-domain-adapter", "qwen2_audio"),
        ("unipelt-softmax", "vit"),
    ],
)
def test_save_load_bit_identical_every_method(tiny_dir: Path, tmp_path: Path, recipe_name: str, family: str) -> None:
    from safetensors.torch import load_file

    from pelt_cli.io.writer import save_file

    run = apply(rc.load(recipe_name), tiny_dir / family, tmp_path / "run")
    state = load_file(run / ADAPTER_FILE)
    g = torch.Generator().manual_seed(5)
    save_file(
        {k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in state.items()}, run / ADAPTER_FILE
    )
    saved = load_file(run / ADAPTER_FILE)
    m1, meta = load_run(run)
    m2, _ = load_run(run)
    assert meta["new_params"] == sum(v.numel() for v in saved.values())
    for k, v in surgery.inserted_state(m1).items():
        assert torch.equal(v, saved[k]), k
    x = sample_inputs(family)
    with torch.no_grad():
        assert torch.equal(main_output(m1(**x)), main_output(m2(**x)))


@pytest.mark.parametrize(
    "recipe_name,overrides",
    [
        ("lora", []),
        ("adapter", []),
        ("ia3", []),
        ("unipelt", ["inserts.0.params.modules=[lora,adapter]"]),
        ("unipelt-softmax", ["inserts.0.params.modules=[lora,adapter]"]),
    ],
)
def test_identity_at_init_on_real_minilm(minilm: Path, recipe_name: str, overrides: list[str]) -> None:
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm).eval()
    model = copy.deepcopy(base)
    rows = insert_recipe(model, rc.load(recipe_name, overrides))
    trainable, _ = surgery.freeze_base(model)
    assert trainable == sum(r.new_params for r in rows) > 0
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(1000, 20000, (2, 16), generator=g), "attention_mask": torch.ones(2, 16)}
    x["attention_mask"][1, 10:] = 0
    with torch.no_grad():
        diff = (model(**x).last_hidden_state - base(**x).last_hidden_state).abs().max().item()
    assert diff <= 1e-6
