"""(IA)³: identity at init, live hooks, exact counts (GQA, fused QKV), exact merge folds, meta, bf16, check."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from conftest import assert_only_inserted_learn
from tiny_models import forward, model_inputs

from pelt_cli import recipe, surgery, targets
from pelt_cli.errors import RecipeError
from pelt_cli.methods import get
from pelt_cli.methods import ia3 as ia3_mod

CASES = [(fam, pl) for fam in tiny_models.FAMILIES for pl in ia3_mod.FFN_PLACEMENTS]


def targets_for(family: str, placement: str) -> tuple[str, ...]:
    """IA3's default targets; GPT-2's k and v live in the fused c_attn; up_output targets ffn.up."""
    out = list(ia3_mod.IA3Method.default_targets)
    if family == "gpt2":
        out = ["attn.qkv", "ffn.down"]
    if placement == "up_output":
        out = [t if t != "ffn.down" else "ffn.up" for t in out]
    return tuple(out)


def build(family: str, placement: str, dtype: torch.dtype | None = None):
    """A tiny model with ia3 inserted; returns (model, base, sites)."""
    base, model = tiny_models.build(family).eval(), tiny_models.build(family).eval()
    if dtype is not None:
        base, model = base.to(dtype), model.to(dtype)
    method = get("ia3")
    p = ia3_mod.IA3Params(ffn_placement=placement)
    sites, problems = targets.select(targets.view(model), targets_for(family, placement))
    assert problems == []
    assert method.check(model, p, sites) == []
    method.insert(model, p, sites)
    return model, base, sites


def expected_trainable(model: torch.nn.Module, sites: list) -> int:
    """k: out_k, v: out_v, fused qkv: 2·out/3, ffn down_input: in of down, up_output: out of up."""
    total = 0
    for s in sites:
        mod = surgery.get_module(model, s.module)
        w = mod.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if type(mod).__name__ == "Conv1D" else (w.shape[1], w.shape[0])
        total += {"attn.k": out_f, "attn.v": out_f, "attn.qkv": 2 * out_f // 3, "ffn.down": in_f, "ffn.up": out_f}[
            s.role
        ]
    return total


def randomise(model: torch.nn.Module, seed: int = 3) -> None:
    torch.manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, ia3_mod.IA3Vector):
            torch.nn.init.uniform_(mod.l, 0.5, 1.5)


@pytest.mark.parametrize("family,placement", CASES)
def test_identity_at_init_and_counts(family: str, placement: str) -> None:
    model, base, sites = build(family, placement)
    x = model_inputs(family)
    with torch.no_grad():
        assert (forward(model, x) - forward(base, x)).abs().max().item() <= 1e-6
    trainable, total = surgery.freeze_base(model)
    assert trainable == expected_trainable(model, sites)
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    assert set(base.state_dict()) == {k for k in model.state_dict() if not surgery.is_inserted(k)}


def test_counts_by_hand() -> None:
    """LLaMA (GQA: k, v 16 wide; down in 64) and GPT-2 (c_attn: 2·32 of 96; c_proj in 128, c_fc out 128)."""
    assert surgery.freeze_base(build("llama", "down_input")[0])[0] == 2 * (16 + 16 + 64)
    assert surgery.freeze_base(build("llama", "up_output")[0])[0] == 2 * (16 + 16 + 64)
    assert surgery.freeze_base(build("bert", "down_input")[0])[0] == 2 * (32 + 32 + 64)
    assert surgery.freeze_base(build("gpt2", "down_input")[0])[0] == 2 * (64 + 128)
    assert surgery.freeze_base(build("gpt2", "up_output")[0])[0] == 2 * (64 + 128)
    assert surgery.freeze_base(build("whisper", "down_input")[0])[0] == 4 * (32 + 32 + 64) + 2 * (32 + 32)


@pytest.mark.parametrize("family,placement", CASES)
def test_randomised_vectors_are_live_and_only_they_learn(family: str, placement: str) -> None:
    model, base, _ = build(family, placement)
    randomise(model)
    x = model_inputs(family)
    with torch.no_grad():
        assert (forward(model, x) - forward(base, x)).abs().max().item() > 1e-4
    surgery.freeze_base(model)
    assert_only_inserted_learn(model, x, family)


def test_gpt2_fused_qkv_scales_only_k_and_v() -> None:
    model, base, _ = build("gpt2", "down_input")
    randomise(model)
    c_attn, base_attn = model.transformer.h[0].attn.c_attn, base.transformer.h[0].attn.c_attn
    vec = c_attn.pelt_ia3
    assert vec.l.shape == (64,) and vec.ones.shape == (32,) and not vec.ones.requires_grad
    assert "transformer.h.0.attn.c_attn.pelt_ia3.ones" in model.state_dict()
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        y, ref = c_attn(h), base_attn(h)
    assert (y[..., :32] - ref[..., :32]).abs().max().item() == 0
    assert (y[..., 32:] - ref[..., 32:] * vec.l).abs().max().item() <= 1e-6
    assert (y[..., 32:] - ref[..., 32:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family,placement", CASES)
def test_insert_on_meta_skeleton_counts_match_cpu(family: str, placement: str) -> None:
    cpu, _, _ = build(family, placement)
    with torch.device("meta"):
        meta = type(cpu)(tiny_models.build(family).config)
    method, p = get("ia3"), ia3_mod.IA3Params(ffn_placement=placement)
    sites, problems = targets.select(targets.view(meta), targets_for(family, placement))
    assert problems == [] and method.check(meta, p, sites) == []
    method.insert(meta, p, sites)
    assert all(t.device.type == "meta" for t in surgery.inserted_parameters(meta).values())
    assert surgery.freeze_base(meta) == surgery.freeze_base(cpu)


@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_bf16_model_runs(family: str) -> None:
    model, base, _ = build(family, "down_input", dtype=torch.bfloat16)
    x = model_inputs(family)
    x = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}
    with torch.no_grad():
        out, ref = forward(model, x), forward(base, x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        assert (out.float() - ref.float()).abs().max().item() == 0  # multiplying by exact ones
        randomise(model)
        assert (forward(model, x).float() - ref.float()).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------------ merge folds


def test_fold_output_scale_formula() -> None:
    torch.manual_seed(0)
    w, b, v, x = torch.randn(5, 3), torch.randn(5), torch.rand(5) + 0.5, torch.randn(4, 3)
    w2, b2 = ia3_mod.fold_output_scale(w, b, v, transposed=False)
    assert torch.allclose(w2, torch.diag(v) @ w) and torch.allclose(b2, v * b)
    assert (x @ w2.t() + b2 - (x @ w.t() + b) * v).abs().max().item() <= 1e-6
    w3, b3 = ia3_mod.fold_output_scale(w.t().contiguous(), b, v, transposed=True)  # Conv1D: (in, out)
    assert torch.equal(w3, w2.t()) and torch.equal(b3, b2)
    assert ia3_mod.fold_output_scale(w, None, v, False)[1] is None
    wh, bh = ia3_mod.fold_output_scale(w.to(torch.bfloat16), b.to(torch.bfloat16), v, False)
    assert wh.dtype == bh.dtype == torch.bfloat16


def test_fold_input_scale_formula() -> None:
    torch.manual_seed(0)
    w, v, x = torch.randn(5, 3), torch.rand(3) + 0.5, torch.randn(4, 3)
    w2 = ia3_mod.fold_input_scale(w, v, transposed=False)
    assert torch.allclose(w2, w @ torch.diag(v))
    assert (x @ w2.t() - (x * v) @ w.t()).abs().max().item() <= 1e-6
    assert torch.equal(ia3_mod.fold_input_scale(w.t().contiguous(), v, transposed=True), w2.t())


def merged_copy(model: torch.nn.Module, base: torch.nn.Module, sites: list) -> torch.nn.Module:
    """``base`` with every site's vector folded into its weights (no hooks)."""
    with torch.no_grad():
        for s in sites:
            mod, target = surgery.get_module(model, s.module), surgery.get_module(base, s.module)
            vec, transposed = mod.pelt_ia3, surgery.features(mod)[2]
            if vec.side == "input":
                target.weight.copy_(ia3_mod.fold_input_scale(mod.weight, vec.vector(), transposed))
            else:
                w, b = ia3_mod.fold_output_scale(mod.weight, mod.bias, vec.vector(), transposed)
                target.weight.copy_(w)
                if b is not None:
                    target.bias.copy_(b)
    return base


MERGE_CASES = [(f, p) for f in ("llama", "bert", "gpt2") for p in ia3_mod.FFN_PLACEMENTS]


@pytest.mark.parametrize("family,placement", MERGE_CASES)
def test_merged_weights_equal_hooked_model(family: str, placement: str) -> None:
    model, base, sites = build(family, placement)
    randomise(model)
    layer_sites = [s for s in sites if s.layer == 0]
    x = model_inputs(family)
    with torch.no_grad():
        before = (forward(model, x) - forward(base, x)).abs().max().item()
        merged = merged_copy(model, base, sites)
        for s in layer_sites:  # each merged Linear alone
            mod, folded = surgery.get_module(model, s.module), surgery.get_module(merged, s.module)
            h = torch.randn(3, surgery.features(mod)[0])
            assert (mod(h) - folded(h)).abs().max().item() <= 1e-6, s.module
        after = (forward(model, x) - forward(merged, x)).abs().max().item()
    assert before > 1e-3 and after <= 1e-6


# ------------------------------------------------------------------------------------------------ check


def _check(family: str, target: str, placement: str) -> list[str]:
    model = tiny_models.build(family)
    sites, problems = targets.select(targets.view(model), [target])
    assert problems == []
    return get("ia3").check(model, ia3_mod.IA3Params(ffn_placement=placement), sites)


def test_check_ffn_site_must_fit_placement() -> None:
    assert _check("llama", "ffn.down", "up_output")[0] == (
        "ffn_placement up_output scales the FFN hidden at ffn.up; model.layers.0.mlp.down_proj has role ffn.down "
        "(target ffn.up, or set ffn_placement: down_input)"
    )
    assert _check("bert", "ffn.up", "down_input")[0] == (
        "ffn_placement down_input scales the FFN hidden at ffn.down; bert.encoder.layer.0.intermediate.dense has "
        "role ffn.up (target ffn.down, or set ffn_placement: up_output)"
    )
    assert _check("llama", "ffn.gate", "up_output") == [
        f"ffn_placement up_output scales the FFN hidden at ffn.up; model.layers.{i}.mlp.gate_proj has role ffn.gate "
        "(target ffn.up)"
        for i in (0, 1)
    ]
    assert _check("llama", "ffn.up", "up_output") == [] and _check("gpt2", "attn.qkv", "down_input") == []


def test_check_non_linear_site() -> None:
    assert _check("llama", "model.layers.0.input_layernorm", "down_input") == [
        "model.layers.0.input_layernorm is a LlamaRMSNorm; ia3 needs a Linear or Conv1D layer"
    ]


def test_recipe_defaults_and_choices() -> None:
    entry = recipe.loads("inserts: [{method: ia3}]").inserts[0]
    assert entry.targets == ("attn.k", "attn.v", "ffn.down") and entry.params.ffn_placement == "down_input"
    with pytest.raises(RecipeError, match="'up_input' is not one of down_input, up_output"):
        recipe.loads("inserts: [{method: ia3, params: {ffn_placement: up_input}}]")
