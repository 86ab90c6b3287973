"""The Transformer domain adapter on tiny Qwen2-Audio (audio_tower → projector) and tiny LLaVA (vision → projector)."""

from __future__ import annotations

import copy
import math

import pytest
import tiny_models
import torch
from torch import nn

from pelt_cli import methods, surgery
from pelt_cli.errors import PeltError, RecipeError
from pelt_cli.methods.domain import (
    PRESETS,
    DomainAdapter,
    DomainParams,
    domain_param_count,
    resolve_module,
    sinusoidal_positions,
)
from pelt_cli.recipe import loads

AUDIO_TOKEN = 99
WIDTH = 32


def audio_inputs(batch: int = 2, seed: int = 1) -> dict:
    """Mel features (B, 16, 200) → 50 audio tokens; input_ids holding exactly 50 audio tokens per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat(
        [
            torch.randint(3, 90, (batch, 3), generator=g),
            torch.full((batch, 50), AUDIO_TOKEN),
            torch.randint(3, 90, (batch, 4), generator=g),
        ],
        dim=1,
    )
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": torch.randn(batch, 16, 200, generator=g),
        "feature_attention_mask": torch.ones(batch, 200, dtype=torch.long),
    }


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def insert(model: nn.Module, **kw: object) -> tuple[list, DomainAdapter]:
    method, params = methods.get("domain"), DomainParams(**kw)
    assert method.check(model, params, []) == []
    ins = method.insert(model, params, [])
    return ins, model.get_submodule(ins[0].modules[0])


def inserted_count(model: nn.Module) -> int:
    return sum(p.numel() for p in surgery.inserted_parameters(model).values())


def layer_formula(d: int, ff: int) -> int:
    # in_proj 3d²+3d, out_proj d²+d, linear1 d·ff+ff, linear2 ff·d+d, norm1/norm2 2·2d
    return 3 * d * d + 3 * d + d * d + d + d * ff + ff + ff * d + d + 4 * d


def tiny_llava() -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(**tiny_models.VISION, projection_dim=32),
        text_config=tiny_models.config("llama"),
        image_token_index=98,
        vision_feature_layer=-1,
    )
    return tf.LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_identity_at_init_and_param_count(preset: str) -> None:
    base = tiny_models.build("qwen2_audio").eval()
    model = copy.deepcopy(base)
    ins, adapter = insert(model, preset=preset)
    assert ins[0].modules == ["model.multi_modal_projector.pelt_domain"]
    inputs = audio_inputs()
    assert (logits(model, inputs) - logits(base, inputs)).abs().max().item() <= 1e-6
    assert adapter.last_gate.shape == (2, 50, 1)  # the pre-hook routed the 50 audio steps through the adapter
    n_layers, heads, ff = PRESETS[preset]
    assert len(adapter.layers) == n_layers and adapter.layers[0].self_attn.num_heads == heads
    expected = n_layers * layer_formula(WIDTH, ff) + (WIDTH * WIDTH + WIDTH) + 2 * WIDTH + (WIDTH + 1) + 1
    assert inserted_count(model) == expected == domain_param_count(WIDTH, n_layers, ff)
    assert adapter.scale.item() == pytest.approx(0.1)
    assert sorted(base.state_dict()) == sorted(k for k in model.state_dict() if not surgery.is_inserted(k))


def test_adapter_keeps_the_audio_tower_shape_and_is_identity_in_train_mode() -> None:
    model = tiny_models.build("qwen2_audio").eval()
    _, adapter = insert(model)
    inp = audio_inputs()
    with torch.no_grad():
        feats = model.model.audio_tower(inp["input_features"]).last_hidden_state
        out = adapter(feats)
        adapter.train()
        out_train = adapter(feats)
    assert feats.shape == out.shape == (2, 50, WIDTH)
    assert (out - feats).abs().max().item() <= 1e-6
    assert (out_train - feats).abs().max().item() <= 1e-6  # dropout is active, Δ is still exactly 0
    assert adapter.last_gate.shape == (2, 50, 1)


def test_one_step_changes_outputs_and_trains_only_the_adapter() -> None:
    torch.manual_seed(0)
    model = tiny_models.build("qwen2_audio")
    _, adapter = insert(model)
    trainable, total = surgery.freeze_base(model)
    assert trainable == domain_param_count(WIDTH, 1, 1024) and total > trainable
    inputs = audio_inputs()
    model.eval()
    before = logits(model, inputs)
    target = torch.randn_like(before)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = []
    for _ in range(2):
        model.train()
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(**inputs).logits, target)
        loss.backward()
        grads.append({n: p.grad.abs().max().item() for n, p in adapter.named_parameters()})
        opt.step()
    base_grads = [n for n, p in model.named_parameters() if not surgery.is_inserted(n) and p.grad is not None]
    assert base_grads == []
    # step 0: only the zero-initialised output LayerNorm gets a gradient (Δ = 0 blocks everything upstream) …
    assert grads[0]["norm.weight"] > 0 and grads[0]["norm.bias"] > 0
    assert grads[0]["scale"] == 0 and grads[0]["gate.weight"] == 0 and grads[0]["proj.weight"] == 0
    # … and once gamma moved, every adapter parameter learns
    assert min(grads[1].values()) > 0, {n: g for n, g in grads[1].items() if g == 0}
    model.eval()
    assert (logits(model, inputs) - before).abs().max().item() > 1e-6
    stats = adapter.gate_stats()
    assert set(stats) == {"mean", "std", "min", "max"} and all(math.isfinite(v) for v in stats.values())
    assert 0 < stats["min"] <= stats["mean"] <= stats["max"] < 1 and stats["std"] > 0


def test_disk_and_memory_names_give_the_same_insertion() -> None:
    a, b = tiny_models.build("qwen2_audio"), tiny_models.build("qwen2_audio")
    assert resolve_module(a, "audio_tower") == "model.audio_tower"
    assert resolve_module(a, "multi_modal_projector.linear") == "model.multi_modal_projector.linear"
    assert resolve_module(a, "no_such_tower") is None
    ins_disk, _ = insert(a, after="audio_tower", before="multi_modal_projector")
    ins_mem, _ = insert(b, after="model.audio_tower", before="model.multi_modal_projector")
    assert ins_disk[0].modules == ins_mem[0].modules == ["model.multi_modal_projector.pelt_domain"]
    assert ins_disk[0].site == ins_mem[0].site == "model.multi_modal_projector"
    assert sorted(surgery.inserted_parameters(a)) == sorted(surgery.inserted_parameters(b))


def test_check_names_missing_modules_bad_heads_and_width() -> None:
    model, method = tiny_models.build("qwen2_audio"), methods.get("domain")
    problems = method.check(model, DomainParams(after="audio_towr"), [])
    assert len(problems) == 1 and "'audio_towr' not found" in problems[0] and "model.audio_tower" in problems[0]
    problems = method.check(model, DomainParams(before="projektor"), [])
    assert len(problems) == 1 and problems[0].startswith("before: module 'projektor' not found")
    problems = method.check(model, DomainParams(heads=5), [])
    assert problems == [
        "heads 5 does not divide the width 32 of 'multi_modal_projector'; expected one of 1, 2, 4, 8, 16, 32"
    ]
    problems = method.check(model, DomainParams(width=48), [])
    assert len(problems) == 1 and "width 48" in problems[0] and "expected width 32" in problems[0]
    assert method.check(model, DomainParams(after="audio_tower", before="audio_tower"), [])[0].startswith(
        "after and before are the same module"
    )


def test_meta_skeleton_counts_like_cpu() -> None:
    cpu = tiny_models.build("qwen2_audio")
    with torch.device("meta"):
        meta = type(cpu)(cpu.config)
    for model in (cpu, meta):
        insert(model, preset="standard", pos="learned", max_len=64)
    expected = domain_param_count(WIDTH, 2, 2048, "learned", 64)
    assert inserted_count(meta) == inserted_count(cpu) == expected
    assert expected == 2 * layer_formula(WIDTH, 2048) + WIDTH * WIDTH + 4 * WIDTH + 2 + 64 * WIDTH
    assert next(iter(surgery.inserted_parameters(meta).values())).device.type == "meta"


def test_learned_positions_and_ffn_ratio() -> None:
    torch.manual_seed(0)
    adapter = DomainAdapter(WIDTH, 1, 4, 64, pos="learned", max_len=40).eval()
    x = torch.randn(2, 40, WIDTH)
    assert torch.equal(adapter(x), x)
    with pytest.raises(PeltError, match="longer than max_len 40"):
        adapter(torch.randn(1, 41, WIDTH))
    model = tiny_models.build("qwen2_audio")
    ins, adapter = insert(model, ffn_ratio=2.0, layers=3, heads=8)
    assert adapter.layers[0].linear1.out_features == 64 and len(adapter.layers) == 3
    assert inserted_count(model) == 3 * layer_formula(WIDTH, 64) + WIDTH * WIDTH + 4 * WIDTH + 2
    assert "3 layers, 8 heads, ffn 64" in ins[0].note


def test_sinusoidal_positions_match_the_formula() -> None:
    pe = sinusoidal_positions(7, 6)
    t, i = 5, 2
    assert pe.shape == (7, 6)
    assert pe[t, 2 * i].item() == pytest.approx(math.sin(t / 10000 ** (2 * i / 6)), abs=1e-6)
    assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(t / 10000 ** (2 * i / 6)), abs=1e-6)
    assert sinusoidal_positions(3, 5).shape == (3, 5)


def test_bf16_model_identity() -> None:
    base = tiny_models.build("qwen2_audio").to(torch.bfloat16).eval()
    model = copy.deepcopy(base)
    _, adapter = insert(model)
    feats = torch.randn(2, 50, WIDTH, dtype=torch.bfloat16)
    with torch.no_grad():
        out = adapter(feats)
        adapter.norm.bias.fill_(0.5)
        moved = adapter(feats)
    assert out.dtype == torch.bfloat16 and torch.equal(out, feats)
    assert moved.dtype == torch.bfloat16 and (moved.float() - feats.float()).abs().max().item() > 1e-3


def test_llava_vision_tower_to_projector() -> None:
    base = tiny_llava()
    model = copy.deepcopy(base)
    ins, adapter = insert(model, after="vision_tower", before="multi_modal_projector", preset="standard")
    assert ins[0].site == "model.multi_modal_projector"
    g = torch.Generator().manual_seed(2)
    ids = torch.cat(
        [torch.randint(3, 90, (2, 2), generator=g), torch.full((2, 4), 98), torch.randint(3, 90, (2, 3), generator=g)],
        dim=1,
    )
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=g),
    }
    assert (logits(model, inputs) - logits(base, inputs)).abs().max().item() <= 1e-6
    assert adapter.last_gate.shape == (2, 4, 1)  # the hook ran: 4 patch tokens per image (CLS dropped)
    with torch.no_grad():
        adapter.norm.bias.fill_(1.0)
    assert (logits(model, inputs) - logits(base, inputs)).abs().max().item() > 1e-4


class _EncoderProjector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.GELU())
        self.projector = nn.Sequential(nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def test_custom_module_and_sequential_before() -> None:
    torch.manual_seed(0)
    model = _EncoderProjector().eval()
    method = methods.get("domain")
    problems = method.check(model, DomainParams(after="encoder", before="projector"), [])
    assert len(problems) == 1 and "is a Sequential" in problems[0] and "projector.0" in problems[0]
    x = torch.randn(3, 5, 8)
    ref = model(x)
    ins, adapter = insert(model, after="encoder", before="projector.0", heads=2, ffn=32)
    assert ins[0].modules == ["projector.0.pelt_domain"] and adapter.width == 16
    assert torch.equal(model(x), ref)
    with torch.no_grad():
        adapter.norm.bias.fill_(1.0)
    assert (model(x) - ref).abs().max().item() > 1e-4
    with pytest.raises(PeltError, match="no forward has run yet"):
        DomainAdapter(16, 1, 2, 8).gate_stats()


def test_recipe_params_validation() -> None:
    text = "name: d\ninserts:\n  - method: domain\n    params: {preset: medium, ffn: 64, ffn_ratio: 2.0, pos: rope}\n"
    with pytest.raises(RecipeError) as e:
        loads(text, "d.yaml")
    msg = "\n".join(e.value.problems)
    assert "'medium' is not one of lightweight, standard, heavy" in msg
    assert "give ffn or ffn_ratio, not both" in msg and "'rope' is not one of" in msg
    ok = loads("name: d\ninserts:\n  - method: domain\n    params: {preset: heavy}\n", "d.yaml")
    assert ok.inserts[0].targets == () and ok.inserts[0].params.preset == "heavy"
