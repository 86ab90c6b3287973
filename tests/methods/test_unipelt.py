"""UniPELT: identity without prefix, exact parameter counts, gate wiring and statistics, both gate modes."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from tiny_models import FAMILIES, main_output, sample_inputs

from pelt_cli import recipe as rc
from pelt_cli import surgery
from pelt_cli.insert import insert_recipe
from pelt_cli.methods.unipelt import GateController, gate_controllers


def _recipe(family: str, **params: object) -> rc.Recipe:
    import yaml

    entry = {"method": "unipelt", "targets": ["attn.qkv" if family == "gpt2" else "attn.q"], "params": params}
    return rc.loads(yaml.safe_dump({"inserts": [entry]}), "test.yaml")


def _fresh(family: str) -> torch.nn.Module:
    return tiny_models.build(family).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_identity_without_prefix(family: str, gate: str) -> None:
    base = _fresh(family)
    model = copy.deepcopy(base)
    rows = insert_recipe(model, _recipe(family, modules=["lora", "adapter"], gate=gate))
    assert {r.method for r in rows} == {"unipelt.gate", "unipelt.lora", "unipelt.adapter"}
    x = sample_inputs(family)
    with torch.no_grad():
        diff = (main_output(model(**x)) - main_output(base(**x))).abs().max().item()
    assert diff <= 1e-6


@pytest.mark.parametrize("family", ["bert", "llama", "whisper"])
def test_parameter_counts(family: str) -> None:
    model = _fresh(family)
    rows = insert_recipe(model, _recipe(family))
    trainable, _ = surgery.freeze_base(model)
    assert trainable == sum(r.new_params for r in rows)
    d, r, ell = 32, 8, 10
    for row in rows:
        if row.method == "unipelt.gate":
            assert row.new_params == 3 * d + 3  # sigmoid: W (d→3) + bias
        elif row.method == "unipelt.lora":
            mod = surgery.get_module(model, row.site)
            in_f, out_f, _ = surgery.features(mod)
            assert row.new_params == r * (in_f + out_f)
        elif row.method == "unipelt.adapter":
            rr = d // 16
            assert row.new_params == d * rr + rr + rr * d + d
        elif row.method == "unipelt.prefix":
            kv = 16 if family == "llama" else 32
            assert row.new_params == ell * 2 * kv
    layers = {"bert": 2, "llama": 2, "whisper": 4}[family]  # Whisper: 2 encoder + 2 decoder layers
    assert sum(1 for row in rows if row.method == "unipelt.gate") == layers
    assert len(gate_controllers(model)) == layers


def test_softmax_gate_size_on_bert_base_width() -> None:
    ctl = GateController(768, ["lora", "prefix", "adapter"], mode="softmax", hidden=64)
    assert sum(p.numel() for p in ctl.parameters()) == 768 * 64 + 64 + 64 * 3 + 3 == 49_411  # the guide's "~49k"


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_gate_values_and_statistics(gate: str) -> None:
    model = _fresh("bert")
    insert_recipe(model, _recipe("bert", gate=gate, temperature=2.0))
    ctls = gate_controllers(model)
    with torch.no_grad():
        model(**sample_inputs("bert", batch=4, seed=9))  # not measuring: not counted
        assert all(c.stats()["lora"]["count"] == 0 for c in ctls.values())
        for c in ctls.values():
            c.start_measuring()
        for seed in range(3):
            model(**sample_inputs("bert", batch=4, seed=seed))
    for ctl in ctls.values():
        g = ctl.current
        assert g.shape == (4, 3)
        assert ((g > 0) & (g < 1)).all()
        if gate == "softmax":
            assert torch.allclose(g.sum(-1), torch.ones(4), atol=1e-6)
        stats = ctl.stats()
        assert set(stats) == {"lora", "prefix", "adapter"}
        for s in stats.values():
            assert s["count"] == 12 and 0 < s["min"] <= s["mean"] <= s["max"] < 1 and s["std"] >= 0
        assert ctl.stop_measuring()["lora"]["count"] == 12
    with torch.no_grad():
        model(**sample_inputs("bert", batch=4, seed=5))  # after stop_measuring: not counted
    for ctl in ctls.values():
        assert ctl.stats()["lora"]["count"] == 12
        ctl.reset_stats()
        assert ctl.stats()["lora"]["count"] == 0


def test_gates_scale_their_branches() -> None:
    """A gate forced to 0 removes its branch exactly; forced to 1 keeps it whole."""
    base = _fresh("llama")
    model = copy.deepcopy(base)
    insert_recipe(model, _recipe("llama", modules=["lora", "adapter"]))
    torch.manual_seed(0)
    for n, p in surgery.inserted_parameters(model).items():
        if n.endswith((".B", "up.weight")):
            torch.nn.init.normal_(p, std=0.3)
    x = sample_inputs("llama")
    ctls = list(gate_controllers(model).values())
    with torch.no_grad():
        for ctl in ctls:  # σ(-1e4) = 0
            ctl.net.weight.zero_()
            ctl.net.bias.fill_(-1e4)
        closed = main_output(model(**x))
        assert (closed - main_output(base(**x))).abs().max().item() <= 1e-6
        for ctl in ctls:
            ctl.net.bias.fill_(1e4)
        opened = main_output(model(**x))
        assert (opened - main_output(base(**x))).abs().max().item() > 1e-3


def test_gradients_reach_gates_and_modules_only() -> None:
    model = _fresh("bert")
    insert_recipe(model, _recipe("bert"))
    surgery.freeze_base(model)
    for n, p in surgery.inserted_parameters(model).items():
        if n.endswith((".B", "up.weight")):
            torch.nn.init.normal_(p, std=0.1)
    out = main_output(model(**sample_inputs("bert")))
    out.pow(2).mean().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(surgery.is_inserted(n) for n in got)
    assert any(".pelt_gate." in n for n in got) and any(".pelt_prefix." in n for n in got)


def test_whisper_gates_the_self_attention_not_cross() -> None:
    model = _fresh("whisper")
    rows = insert_recipe(model, _recipe("whisper"))
    gates = [r.site for r in rows if r.method == "unipelt.gate"]
    assert all("encoder_attn" not in g for g in gates)
    assert "model.decoder.layers.0.self_attn.q_proj" in gates


def test_bad_modules_rejected() -> None:
    with pytest.raises(rc.RecipeError, match="expected a non-empty list of distinct names"):
        _recipe("bert", modules=["lora", "lora"])
    with pytest.raises(rc.RecipeError, match="'lorra' is not one of lora, prefix, adapter"):
        _recipe("bert", modules=["lorra"])


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_gates_pool_over_real_tokens_only(gate: str) -> None:
    """A sequence's gates and outputs are the same alone and padded in a batch beside a longer one (≤ 1e-6)."""
    import transformers

    cfg = tiny_models.config("bert")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    insert_recipe(model, rc.load("unipelt-softmax" if gate == "softmax" else "unipelt"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "pelt_" in n:
                p.normal_(std=0.3)  # trained-looking modules and gates: padding would show if it leaked in
        short = torch.tensor([[5, 6, 7, 8]])
        alone = model(input_ids=short, attention_mask=torch.ones_like(short)).last_hidden_state
        gates_alone = {s: c.current.clone() for s, c in gate_controllers(model).items()}
        batch = torch.tensor([[5, 6, 7, 8, 0, 0, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15, 16, 17]])
        mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0], [1] * 9])
        padded = model(input_ids=batch, attention_mask=mask).last_hidden_state
        for site, ctl in gate_controllers(model).items():
            assert (ctl.current[0] - gates_alone[site][0]).abs().max().item() <= 1e-6, site
        assert (padded[0, :4] - alone[0]).abs().max().item() <= 1e-6
        unmasked = model(input_ids=batch).last_hidden_state  # without a mask the pads count: a real difference
        assert (unmasked[0, :4] - alone[0]).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", ["bert", "llama", "whisper"])
@pytest.mark.parametrize("gate_init,weight_init", [(0.1, "auto"), (0.1, "normal"), (0.3, "zeros"), (0.7, "normal")])
def test_gate_init_sets_the_mean_gate(family: str, gate_init: float, weight_init: str) -> None:
    """The mean sigmoid gate at initialisation, over random inputs, is gate_init ± 0.02 (any temperature); each
    gate is within ± 0.05 with N(0, 0.02) weights (its random weights see the tokens' common direction), exact
    with zero weights."""
    model = _fresh(family)
    recipe = _recipe(family, gate_init=gate_init, gate_weight_init=weight_init, temperature=0.8)
    insert_recipe(model, recipe)
    for c in gate_controllers(model).values():
        c.start_measuring()
    with torch.no_grad():
        for seed in range(4):
            model(**sample_inputs(family, batch=4, seed=seed))
    means = [s["mean"] for ctl in gate_controllers(model).values() for s in ctl.stats().values()]
    assert len(means) >= 6 and abs(sum(means) / len(means) - gate_init) <= 0.02, means
    assert max(abs(m - gate_init) for m in means) <= (1e-6 if weight_init == "zeros" else 0.05), means


def test_gate_init_default_keeps_pytorch_initialisation() -> None:
    """Without gate_init the controllers are those of earlier pelt runs (PyTorch's default init, same RNG use)."""
    torch.manual_seed(3)
    ctl = GateController(32, ["lora", "prefix", "adapter"])
    torch.manual_seed(3)
    ref = torch.nn.Linear(32, 3)
    assert torch.equal(ctl.net.weight, ref.weight) and torch.equal(ctl.net.bias, ref.bias)
    model = _fresh("bert")
    insert_recipe(model, _recipe("bert"))
    for c in gate_controllers(model).values():
        c.start_measuring()
    with torch.no_grad():
        model(**sample_inputs("bert", batch=4))
    means = [s["mean"] for c in gate_controllers(model).values() for s in c.stats().values()]
    assert all(0.3 < m < 0.7 for m in means) and max(abs(m - 0.1) for m in means) > 0.2


def test_gate_weight_inits() -> None:
    x = torch.randn(2, 5, 32)
    for kind in ("normal", "xavier", "zeros"):
        ctl = GateController(32, ["lora", "adapter"], weight_init=kind)
        w = ctl.net.weight
        assert torch.equal(ctl.net.bias, torch.zeros(2))
        if kind == "zeros":
            assert torch.equal(w, torch.zeros_like(w)) and torch.equal(ctl.compute(x), torch.full((2, 2), 0.5))
        elif kind == "normal":
            assert 0.01 < w.std().item() < 0.03
        else:
            assert w.abs().max().item() <= (6 / (32 + 2)) ** 0.5
    soft = GateController(32, ["lora", "prefix", "adapter"], mode="softmax", weight_init="zeros")
    assert torch.allclose(soft.compute(x), torch.full((2, 3), 1 / 3), atol=1e-7)  # exactly uniform at start


def test_gate_init_validated() -> None:
    with pytest.raises(rc.RecipeError, match=r"params: gate_init: softmax gates sum to 1"):
        _recipe("bert", gate="softmax", gate_init=0.1)
    with pytest.raises(rc.RecipeError, match=r"params\.gate_init: 1\.5 is too large"):
        _recipe("bert", gate_init=1.5)
    with pytest.raises(
        rc.RecipeError, match=r"params\.gate_weight_init: 'xavir' is not one of .*did you mean 'xavier'"
    ):
        _recipe("bert", gate_weight_init="xavir")
