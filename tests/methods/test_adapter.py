"""Bottleneck adapter: identity at init, live hooks, exact parameter counts, meta skeleton, bf16, check messages."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import tiny_models
import torch
from conftest import assert_only_inserted_learn
from tiny_models import forward, model_inputs

from pelt_cli import recipe, surgery, targets
from pelt_cli.errors import RecipeError
from pelt_cli.methods import adapter as adapter_mod
from pelt_cli.methods import get

PLACEMENT_TARGETS = {"after_ffn": ("ffn.down",), "after_attn": ("attn.o",), "parallel": ("ffn.down",)}
CASES = [(fam, pl) for fam in tiny_models.FAMILIES for pl in adapter_mod.PLACEMENTS]


def n_sites(family: str, placement: str) -> int:
    """Sites in a 2-layer model: whisper has encoder + decoder (+ cross-attention attn.o), qwen2_audio audio + text."""
    if family == "whisper" and placement == "after_attn":
        return 6
    return 4 if family in ("whisper", "qwen2_audio") else 2


def build(family: str, placement: str, dtype: torch.dtype | None = None, **params):
    """A tiny model with adapters inserted at the placement's sites; returns (model, base, params, sites)."""
    base, model = tiny_models.build(family).eval(), tiny_models.build(family).eval()
    if dtype is not None:
        base, model = base.to(dtype), model.to(dtype)
    method = get("adapter")
    p = method.Params(placement=placement, **params)
    sites, problems = targets.select(targets.view(model), PLACEMENT_TARGETS[placement])
    assert problems == []
    assert method.check(model, p, sites) == []
    insertions = method.insert(model, p, sites)
    assert [i.site for i in insertions] == [s.module for s in sites]
    return model, base, p, sites


def expected_trainable(model: torch.nn.Module, sites: list, size: int | None, learn_scale: bool) -> int:
    """``d·r + r + r·d + d (+1)`` per site, d = the site's output width, r = size or d // 16."""
    total = 0
    for s in sites:
        mod = surgery.get_module(model, s.module)
        d = mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]  # Conv1D: (in, out)
        r = size if size is not None else d // 16
        total += d * r + r + r * d + d + (1 if learn_scale else 0)
    return total


def randomise(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    for name, mod in model.named_modules():
        if name.endswith("pelt_adapter"):
            torch.nn.init.normal_(mod.up.weight, std=0.5)
            torch.nn.init.normal_(mod.up.bias, std=0.1)


@pytest.mark.parametrize("family,placement", CASES)
def test_identity_at_init_and_default_counts(family: str, placement: str) -> None:
    model, base, _, sites = build(family, placement)
    assert len(sites) == n_sites(family, placement)
    x = model_inputs(family)
    with torch.no_grad():
        assert (forward(model, x) - forward(base, x)).abs().max().item() <= 1e-6
    trainable, total = surgery.freeze_base(model)
    assert trainable == expected_trainable(model, sites, None, False)
    assert trainable == len(sites) * (32 * 2 + 2 + 2 * 32 + 32)  # d = 32, default reduction 16 → r = 2
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    assert set(base.state_dict()) == {k for k in model.state_dict() if not surgery.is_inserted(k)}


@pytest.mark.parametrize("family,placement", CASES)
def test_randomised_adapter_is_live_and_only_it_learns(family: str, placement: str) -> None:
    model, base, _, sites = build(family, placement, size=4, learn_scale=True, dropout=0.1, activation="gelu")
    randomise(model)
    x = model_inputs(family)
    with torch.no_grad():
        assert (forward(model, x) - forward(base, x)).abs().max().item() > 1e-4
    trainable, _ = surgery.freeze_base(model)
    assert trainable == expected_trainable(model, sites, 4, True)
    assert trainable == len(sites) * adapter_mod.adapter_param_count(32, 4, True) == len(sites) * 293
    assert_only_inserted_learn(model, x, family)


@pytest.mark.parametrize("family,placement", CASES)
def test_insert_on_meta_skeleton_counts_match_cpu(family: str, placement: str) -> None:
    cpu, _, p, _ = build(family, placement, size=3)
    with torch.device("meta"):
        meta = type(cpu)(tiny_models.build(family).config)
    method = get("adapter")
    sites, problems = targets.select(targets.view(meta), PLACEMENT_TARGETS[placement])
    assert problems == [] and method.check(meta, p, sites) == []
    method.insert(meta, p, sites)
    assert all(t.device.type == "meta" for t in surgery.inserted_parameters(meta).values())
    assert surgery.freeze_base(meta) == surgery.freeze_base(cpu)


@pytest.mark.parametrize("family,placement", [(f, p) for f in tiny_models.FAMILIES for p in ("after_ffn", "parallel")])
def test_bf16_model_runs(family: str, placement: str) -> None:
    model, base, _, _ = build(family, placement, dtype=torch.bfloat16, size=4)
    x = model_inputs(family)
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}
    with torch.no_grad():
        out, ref = forward(model, x), forward(base, x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert (out.float() - ref.float()).abs().max().item() == 0  # W_up = 0: the branch adds exact zeros
        randomise(model)
        assert (forward(model, x).float() - ref.float()).abs().max().item() > 1e-3


def test_sequential_and_parallel_math_on_llama_layer() -> None:
    """after_ffn: down(x) + s·A(down(x)); parallel: mlp(h) + s·A(h) with h the MLP's input."""
    for placement in ("after_ffn", "parallel"):
        model, base, _, _ = build("llama", placement, size=4, scale=0.5)
        randomise(model)
        mlp, base_mlp = model.model.layers[0].mlp, base.model.layers[0].mlp
        ad = mlp.down_proj.pelt_adapter
        h = torch.randn(2, 5, 32)
        with torch.no_grad():
            if placement == "after_ffn":
                y = base_mlp(h)
                ref = y + 0.5 * (ad.up(torch.relu(ad.down(y))))
            else:
                ref = base_mlp(h) + 0.5 * (ad.up(torch.relu(ad.down(h))))
            assert (mlp(h) - ref).abs().max().item() <= 1e-6
            assert (mlp(h) - base_mlp(h)).abs().max().item() > 1e-3
        assert ad.captured is None  # the parallel input is released once used


def test_parallel_deepcopy_rebinds_the_capture_hook() -> None:
    model, _, _, _ = build("gpt2", "parallel", size=4)
    randomise(model)
    twin = copy.deepcopy(model)
    x = model_inputs("gpt2")
    with torch.no_grad():
        ref = forward(model, x)
        for mod in twin.modules():
            if isinstance(mod, adapter_mod.BottleneckAdapter):
                torch.nn.init.zeros_(mod.up.weight)
                torch.nn.init.zeros_(mod.up.bias)
        assert (forward(model, x) - ref).abs().max().item() == 0  # the copy's adapters are its own
        twin_out = forward(twin, x)
    assert (twin_out - ref).abs().max().item() > 1e-4


def _sites(family: str, target: str) -> tuple[torch.nn.Module, list]:
    model = tiny_models.build(family)
    sites, problems = targets.select(targets.view(model), [target])
    assert problems == []
    return model, sites


def test_check_size_larger_than_layer() -> None:
    model, sites = _sites("bert", "ffn.down")
    problems = get("adapter").check(model, adapter_mod.AdapterParams(size=64), sites)
    assert len(problems) == 2
    assert problems[0] == (
        "adapter size 64 is larger than the output width of bert.encoder.layer.0.output.dense "
        "(d = 32); expected size ≤ 32"
    )


def test_check_reduction_leaving_no_bottleneck() -> None:
    model, sites = _sites("llama", "ffn.down")
    problems = get("adapter").check(model, adapter_mod.AdapterParams(reduction=64.0), sites)
    assert len(problems) == 2 and "model.layers.0.mlp.down_proj (d = 32 → r = 0)" in problems[0]


def test_check_placement_role_and_kind() -> None:
    model, sites = _sites("bert", "ffn.down")
    problems = get("adapter").check(model, adapter_mod.AdapterParams(placement="after_attn"), sites)
    assert problems[0] == (
        "placement after_attn expects attn.o sites; bert.encoder.layer.0.output.dense has role "
        "ffn.down (set targets: [attn.o] or another placement)"
    )
    model, sites = _sites("bert", "bert.encoder.layer.0.output.LayerNorm")
    problems = get("adapter").check(model, adapter_mod.AdapterParams(), sites)
    assert problems == [
        "bert.encoder.layer.0.output.LayerNorm is a LayerNorm; adapter needs a Linear or Conv1D "
        "layer (its output is what the adapter transforms)"
    ]


def test_check_parallel_needs_ffn_up_sibling() -> None:
    model, sites = _sites("whisper", "ffn.down")
    lonely = [dataclasses.replace(sites[0], block="elsewhere")]
    problems = get("adapter").check(model, adapter_mod.AdapterParams(placement="parallel"), lonely)
    assert problems == [
        "placement parallel needs the FFN input: model.encoder.layers.0.fc2 has no ffn.up or "
        "ffn.gate module in its layer (elsewhere layer 0)"
    ]
    assert get("adapter").check(model, adapter_mod.AdapterParams(placement="parallel"), sites) == []


def test_recipe_rejects_size_and_reduction_together() -> None:
    with pytest.raises(RecipeError) as err:
        recipe.loads("inserts: [{method: adapter, params: {size: 8, reduction: 4}}]")
    (problem,) = err.value.problems
    assert "size (8)" in problem and "reduction (4.0)" in problem and "inserts[0].params" in problem
    entry = recipe.loads("inserts: [{method: adapter, params: {reduction: 8}}]").inserts[0]
    assert entry.targets == ("ffn.down",) and entry.params.reduction == 8.0 and entry.params.size is None
    with pytest.raises(RecipeError, match="'sideways' is not one of after_ffn, after_attn, parallel"):
        recipe.loads("inserts: [{method: adapter, params: {placement: sideways}}]")


def test_bottleneck_size_rules() -> None:
    assert adapter_mod.bottleneck_size(768, None, None) == 48
    assert adapter_mod.bottleneck_size(768, 64, None) == 64
    assert adapter_mod.bottleneck_size(768, None, 12.0) == 64
    assert adapter_mod.adapter_param_count(768, 48) == 768 * 48 * 2 + 48 + 768 == 74544
