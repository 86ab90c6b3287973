"""LoRA on every family: identity at init, parameter counts, only the branch trains, fused QKV slices."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, main_output, sample_inputs

from pelt_cli import recipe as rc
from pelt_cli import surgery
from pelt_cli.insert import insert_recipe

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
