"""Recipes and ``pelt apply``: validation, plans, run directories, LoRA invariants on every family and MiniLM."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import pelt_main
from tiny_models import FAMILIES, main_output, sample_inputs

from pelt_cli import recipe as rc
from pelt_cli import surgery
from pelt_cli.apply import apply, plan
from pelt_cli.errors import RecipeError
from pelt_cli.insert import insert_recipe
from pelt_cli.run import ADAPTER_FILE, RUN_FILE, load_run

ASSETS = Path(__file__).parent / "assets" / "bad"
LORA = {"gpt2": "lora-gpt2"}


def _lora_recipe(family: str) -> rc.Recipe:
    return rc.load(LORA.get(family, "lora"))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_identity_counts_and_trainable(tiny_models_built: dict, family: str) -> None:
    base = tiny_models_built[family].eval()
    model = copy.deepcopy(base)
    rows = insert_recipe(model, _lora_recipe(family))
    trainable, total = surgery.freeze_base(model)
    # LoRA adds r·(in + out) per site (out = the sliced width for a fused QKV)
    expected = 0
    for r in rows:
        mod = surgery.get_module(model, r.site)
        in_f, out_f, _ = surgery.features(mod)
        width = out_f // 3 * 2 if family == "gpt2" else out_f
        assert r.new_params == 8 * (in_f + width)
        expected += r.new_params
    assert trainable == expected and len(rows) >= 2
    assert set(surgery.inserted_parameters(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        x = sample_inputs(family)
        diff = (main_output(model(**x)) - main_output(base(**x))).abs().max().item()
    assert diff <= 1e-6
    # base state dict names are untouched
    assert {k for k in model.state_dict() if not surgery.is_inserted(k)} == set(base.state_dict())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2_audio"])
def test_lora_is_live(tiny_models_built: dict, family: str) -> None:
    base = tiny_models_built[family].eval()
    model = copy.deepcopy(base)
    insert_recipe(model, _lora_recipe(family))
    surgery.freeze_base(model)
    torch.manual_seed(1)
    for n, p in surgery.inserted_parameters(model).items():
        if n.endswith(".B"):
            torch.nn.init.normal_(p, std=0.5)
    x = sample_inputs(family)
    out = main_output(model(**x))
    with torch.no_grad():
        assert (out - main_output(base(**x))).abs().max().item() > 1e-4
    out.float().pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(surgery.is_inserted(n) for n in grads)


def test_gpt2_fused_slices_only_touch_q_and_v(tiny_models_built: dict) -> None:
    model = copy.deepcopy(tiny_models_built["gpt2"]).eval()
    insert_recipe(model, rc.load("lora-gpt2"))
    attn = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        attn.pelt_lora.B.normal_()
        x = torch.randn(2, 5, 32)
        delta = attn(x) - (x @ attn.weight + attn.bias)
    assert delta[..., 32:64].abs().max().item() == 0.0  # k third untouched
    assert delta[..., :32].abs().max().item() > 0 and delta[..., 64:].abs().max().item() > 0


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


# ------------------------------------------------------------------------------------------------ bad recipes

BAD = {
    "unknown-method.yaml":
        r"unknown-method.yaml:3:\d+: inserts\[0\]\.method: unknown method 'lroa' \(did you mean 'lora'\?\)",
    "unknown-key.yaml": r"unknown-key.yaml:6:7: inserts\[0\]\.params\.rnak: unknown key \(did you mean 'rank'\?\)",
    "wrong-type.yaml": r"wrong-type.yaml:6:\d+: inserts\[0\]\.params\.rank: expected an integer, got 'eight'",
    "no-match.yaml": r"no-match.yaml:4:\d+: inserts\[0\]\.targets: glob '\*\*\.no_such_module' matches no module",
    "syntax.yaml": r"syntax.yaml:\d+:\d+: YAML syntax error",
    "rank-too-big.yaml":
        r"rank 512 is larger than the layer encoder\.layer\.0\.attention\.self\.query \(in 384, out 384\)",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_recipe_one_report_exit_2_nothing_written(name: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = pelt_main("apply", str(ASSETS / name), "minilm", "-o", str(out))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert re.search(BAD[name], errors[0]), errors[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_all_problems_at_once() -> None:
    with pytest.raises(RecipeError) as e:
        rc.load(str(ASSETS / "many.yaml"))
    text = "\n".join(e.value.problems)
    for fragment in ["name: expected a string", "layers: layer range '9-2'", "rank: 0 is too small",
                     "dropout: 2.0 is too large", "init: 'xavier' is not one of kaiming, gaussian",
                     "blocks[0]: unknown block kind 'encodr' (did you mean 'encoder'?)"]:
        assert fragment in text, (fragment, text)
    assert len(e.value.problems) == 6


def test_overrides() -> None:
    r = rc.load("lora", ["inserts.0.params.rank=4", "inserts[0].targets=[attn.k]", "~inserts.0.params.dropout"])
    assert r.inserts[0].params.rank == 4 and r.inserts[0].targets == ("attn.k",)
    assert r.inserts[0].params.dropout == 0.0  # deleted → default
    with pytest.raises(RecipeError, match="inserts\\[3\\].params.rank does not exist"):
        rc.load("lora", ["inserts.3.params.rank=4"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE or ~KEY"):
        rc.load("lora", ["rank"])


def test_stray_flag_is_an_error(tiny_dir: Path) -> None:
    r = pelt_main("apply", "lora", str(tiny_dir / "bert"), "--dry-run", "--rnak", "8")
    assert r.returncode == 2 and "No such option: --rnak" in r.stderr


def test_recipes_ls_cat_cp(tmp_path: Path) -> None:
    r = pelt_main("recipes", "ls")
    names = [ln.split("\t")[0] for ln in r.stdout.splitlines()]
    assert {"lora", "lora-gpt2", "lora-all-linear"} <= set(names)
    cat = pelt_main("recipes", "cat", "lora").stdout
    assert cat.startswith("# pelt apply lora ")
    r = pelt_main("recipes", "cp", "lora", str(tmp_path))
    assert r.returncode == 0 and (tmp_path / "lora.yaml").read_text() == cat
    assert pelt_main("recipes", "cp", "lora", str(tmp_path)).returncode == 2
    r = pelt_main("recipes", "cat", "lroa")
    assert r.returncode == 2 and "did you mean 'lora'" in r.stderr


def test_every_bundled_recipe_opens_with_its_command() -> None:
    from pelt_cli.bundled import bundled

    for name, path in bundled().items():
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# pelt apply {name} "), (name, first)


def test_every_bundled_recipe_applies_to_its_families(tiny_models_built: dict) -> None:
    from pelt_cli.bundled import bundled

    for name, path in bundled().items():
        recipe = rc.load(path)
        assert recipe.families, f"{name}: no families listed"
        for fam in recipe.families:
            if fam not in tiny_models_built:
                continue
            base = tiny_models_built[fam].eval()
            model = copy.deepcopy(base)
            rows = insert_recipe(model, recipe)
            assert rows, (name, fam)
            with torch.no_grad():
                x = sample_inputs(fam)
                assert main_output(model(**x)).shape == main_output(base(**x)).shape, (name, fam)


@pytest.mark.parametrize("recipe_name,family", [
    ("unipelt", "bert"), ("adapter", "gpt2"), ("ia3", "whisper"), ("prefix", "llama"),
    ("qwen2-audio-domain-adapter", "qwen2_audio"), ("unipelt-softmax", "vit"),
])
def test_save_load_bit_identical_every_method(tiny_dir: Path, tmp_path: Path, recipe_name: str, family: str) -> None:
    from safetensors.torch import load_file

    from pelt_cli.io.writer import save_file

    run = apply(rc.load(recipe_name), tiny_dir / family, tmp_path / "run")
    state = load_file(run / ADAPTER_FILE)
    g = torch.Generator().manual_seed(5)
    save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in state.items()},
              run / ADAPTER_FILE)
    saved = load_file(run / ADAPTER_FILE)
    m1, meta = load_run(run)
    m2, _ = load_run(run)
    assert meta["new_params"] == sum(v.numel() for v in saved.values())
    for k, v in surgery.inserted_state(m1).items():
        assert torch.equal(v, saved[k]), k
    x = sample_inputs(family)
    with torch.no_grad():
        assert torch.equal(main_output(m1(**x)), main_output(m2(**x)))


@pytest.mark.parametrize("recipe_name,overrides", [
    ("lora", []), ("adapter", []), ("ia3", []), ("unipelt", ["inserts.0.params.modules=[lora,adapter]"]),
    ("unipelt-softmax", ["inserts.0.params.modules=[lora,adapter]"]),
])
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
