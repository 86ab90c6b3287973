"""PEFT export and import: adapters that reload in HF peft with the same outputs, refusals, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_run, outputs
from safetensors.torch import load_file

from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.errors import ExportRefused
from pelt_cli.peft_format import export_peft, import_peft
from pelt_cli.run import ADAPTER_FILE, RUN_FILE, load_base, load_run

peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "family,recipe",
    [
        ("bert", "lora"),
        ("llama", "lora"),
        ("gpt2", "lora-gpt2"),
        ("bert", "ia3"),
        ("llama", "ia3"),
        ("gpt2", "ia3-gpt2"),
    ],
)
def test_peft_export_reloads_in_peft(tiny_dir: Path, tmp_path: Path, family: str, recipe: str) -> None:
    run = make_run(recipe, tiny_dir / family, tmp_path / "run")
    out = export_peft(run, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    meta = json.loads((run / RUN_FILE).read_text())
    assert cfg["target_modules"] == [i["site"] for i in meta["insertions"]]
    assert cfg["fan_in_fan_out"] is (family == "gpt2")
    keys = load_file(out / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".default" not in k for k in keys)
    if recipe == "lora-gpt2":  # full-width B, zero rows for the untouched k third
        b = keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        assert b.shape == (96, 8) and b[32:64].abs().max() == 0 and b[:32].abs().max() > 0
    ours, _ = load_run(run)
    theirs = peft.PeftModel.from_pretrained(load_base(tiny_dir / family), out)
    base = load_base(tiny_dir / family)
    assert (outputs(ours, family) - outputs(base, family)).abs().max().item() > 1e-4  # not a no-op
    assert (outputs(ours, family) - outputs(theirs, family)).abs().max().item() <= 1e-6
    back = import_peft(out, tiny_dir / family, tmp_path / "back")  # the round trip
    again, _ = load_run(back)
    if recipe != "lora-gpt2":  # a sliced LoRA comes back full-width on c_attn: same function, other tensors
        a, b = load_file(run / ADAPTER_FILE), load_file(back / ADAPTER_FILE)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (outputs(again, family) - outputs(ours, family)).abs().max().item() <= 1e-6


def test_peft_export_refusals(tiny_dir: Path, tmp_path: Path) -> None:
    mixed = rc.loads(
        "name: mix\ninserts:\n  - method: lora\n    targets: [attn.q]\n  - method: ia3\n    targets: [attn.v]\n"
    )
    apply(mixed, tiny_dir / "bert", tmp_path / "mixed")
    with pytest.raises(ExportRefused, match="mixes ia3 and lora"):
        export_peft(tmp_path / "mixed", tmp_path / "p1")
    apply(rc.load("adapter"), tiny_dir / "bert", tmp_path / "adapter")
    with pytest.raises(ExportRefused) as e:
        export_peft(tmp_path / "adapter", tmp_path / "p2")
    assert "adapter at bert.encoder.layer.0.output.dense" in str(e.value) and e.value.exit_code == 2
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_import_peft_matches_peft(tiny_dir: Path, tmp_path: Path, kind: str) -> None:
    base = load_base(tiny_dir / "llama")
    if kind == "lora":
        cfg = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"model.layers.1.mlp.down_proj": 2},
            alpha_pattern={"v_proj": 3},
            use_rslora=True,
        )
    else:
        cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    pm = peft.get_peft_model(base, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
            elif "ia3_l" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    run = import_peft(tmp_path / "peft", tiny_dir / "llama", tmp_path / "run")
    ours, meta = load_run(run)
    assert meta["imported_from"]["peft_type"] == kind.upper()
    assert len(meta["insertions"]) == 6
    assert (outputs(ours, "llama") - outputs(load_base(tiny_dir / "llama"), "llama")).abs().max().item() > 1e-4
    assert (outputs(ours, "llama") - outputs(pm, "llama")).abs().max().item() <= 1e-6
