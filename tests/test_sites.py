"""Roles, layers and blocks of every family, from headers only; globs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES

from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.keymap import key_map
from pelt_cli.sites import ROLES, detect_family, expand_braces, matches, sites

# On-disk module path (layer 0), role and block that every family must get: one site a line.
TABLES = {
    "bert": """
        bert.encoder.layer.0.attention.self.query    attn.q    encoder
        bert.encoder.layer.0.attention.self.key      attn.k    encoder
        bert.encoder.layer.0.attention.self.value    attn.v    encoder
        bert.encoder.layer.0.attention.output.dense  attn.o    encoder
        bert.encoder.layer.0.intermediate.dense      ffn.up    encoder
        bert.encoder.layer.0.output.dense            ffn.down  encoder
        bert.encoder.layer.0.output.LayerNorm        norm      encoder
        bert.embeddings.word_embeddings              embed     -
        cls.predictions.decoder                      lm_head   -
    """,
    "roberta": """
        encoder.layer.0.attention.self.query    attn.q    encoder
        encoder.layer.0.attention.self.key      attn.k    encoder
        encoder.layer.0.attention.self.value    attn.v    encoder
        encoder.layer.0.attention.output.dense  attn.o    encoder
        encoder.layer.0.intermediate.dense      ffn.up    encoder
        encoder.layer.0.output.dense            ffn.down  encoder
        pooler.dense                            pooler    -
    """,
    "gpt2": """
        transformer.h.0.attn.c_attn  attn.qkv  decoder
        transformer.h.0.attn.c_proj  attn.o    decoder
        transformer.h.0.mlp.c_fc     ffn.up    decoder
        transformer.h.0.mlp.c_proj   ffn.down  decoder
        transformer.h.0.ln_1         norm      decoder
        transformer.wte              embed     -
        lm_head                      lm_head   -
    """,
    "llama": """
        model.layers.0.self_attn.q_proj  attn.q    decoder
        model.layers.0.self_attn.k_proj  attn.k    decoder
        model.layers.0.self_attn.v_proj  attn.v    decoder
        model.layers.0.self_attn.o_proj  attn.o    decoder
        model.layers.0.mlp.gate_proj     ffn.gate  decoder
        model.layers.0.mlp.up_proj       ffn.up    decoder
        model.layers.0.mlp.down_proj     ffn.down  decoder
        model.layers.0.input_layernorm   norm      decoder
        model.embed_tokens               embed     -
        lm_head                          lm_head   -
    """,
    "whisper": """
        model.encoder.layers.0.self_attn.q_proj       attn.q    encoder
        model.encoder.layers.0.self_attn.k_proj       attn.k    encoder
        model.encoder.layers.0.self_attn.v_proj       attn.v    encoder
        model.encoder.layers.0.self_attn.out_proj     attn.o    encoder
        model.encoder.layers.0.fc1                    ffn.up    encoder
        model.encoder.layers.0.fc2                    ffn.down  encoder
        model.decoder.layers.0.self_attn.q_proj       attn.q    decoder
        model.decoder.layers.0.encoder_attn.q_proj    attn.q    cross-attention
        model.decoder.layers.0.encoder_attn.k_proj    attn.k    cross-attention
        model.decoder.layers.0.encoder_attn.out_proj  attn.o    cross-attention
        model.decoder.layers.0.fc1                    ffn.up    decoder
        model.encoder.conv1                           conv      -
        proj_out                                      lm_head   -
    """,
    "vit": """
        encoder.layer.0.attention.attention.query  attn.q    vision
        encoder.layer.0.attention.attention.key    attn.k    vision
        encoder.layer.0.attention.attention.value  attn.v    vision
        encoder.layer.0.attention.output.dense     attn.o    vision
        encoder.layer.0.intermediate.dense         ffn.up    vision
        encoder.layer.0.output.dense               ffn.down  vision
        encoder.layer.0.layernorm_before           norm      vision
        embeddings.patch_embeddings.projection     embed     -
    """,
    "qwen2_audio": """
        audio_tower.layers.0.self_attn.q_proj           attn.q    audio
        audio_tower.layers.0.self_attn.k_proj           attn.k    audio
        audio_tower.layers.0.self_attn.out_proj         attn.o    audio
        audio_tower.layers.0.fc1                        ffn.up    audio
        audio_tower.layers.0.fc2                        ffn.down  audio
        multi_modal_projector.linear                    projector projector
        language_model.model.layers.0.self_attn.q_proj  attn.q    decoder
        language_model.model.layers.0.self_attn.v_proj  attn.v    decoder
        language_model.model.layers.0.mlp.gate_proj     ffn.gate  decoder
        language_model.model.layers.0.mlp.down_proj     ffn.down  decoder
        language_model.lm_head                          lm_head   -
    """,
}
EXPECTED = {
    fam: {m: (role, block) for m, role, block in map(str.split, t.strip().splitlines())} for fam, t in TABLES.items()
}
EXPECTED["qwen2"] = EXPECTED["llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_and_blocks(tiny_dir: Path, family: str) -> None:
    by_module = {s.module: s for s in sites(open_checkpoint(tiny_dir / family))}
    for module, (role, block) in EXPECTED[family].items():
        assert module in by_module, f"{family}: {module} missing"
        s = by_module[module]
        assert (s.role, s.block) == (role, block), f"{family}: {module} → {(s.role, s.block)}"
    # every attention/FFN projection in every layer has a role; layer indices cover both layers
    projections = [s for s in by_module.values() if s.role.startswith(("attn.", "ffn."))]
    assert {s.layer for s in projections} == {0, 1}
    assert all(s.role in ROLES for s in by_module.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_in_a_layer_gets_a_role(tiny_dir: Path, tiny_models_built: dict, family: str) -> None:
    """Each nn.Linear / Conv1D inside a repeated block maps (via the key map) to an attention or FFN role."""
    from transformers.pytorch_utils import Conv1D

    from pelt_cli.sites import layer_of

    model = tiny_models_built[family]
    km = key_map(model)
    by_module = {s.module: s for s in sites(open_checkpoint(tiny_dir / family))}
    count = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and layer_of(name) is not None:
            role = by_module[km.disk_module(name)].role
            assert role.startswith(("attn.", "ffn.")), (family, name, role)
            count += 1
    assert count >= 8


def test_gqa_and_biases_visible(tiny_dir: Path) -> None:
    llama = {s.name: s for s in sites(open_checkpoint(tiny_dir / "llama"))}
    qwen = {s.name: s for s in sites(open_checkpoint(tiny_dir / "qwen2"))}
    assert llama["model.layers.0.self_attn.q_proj.weight"].info.shape == (32, 32)
    assert llama["model.layers.0.self_attn.k_proj.weight"].info.shape == (16, 32)  # 2 kv heads of 4
    assert "model.layers.0.self_attn.q_proj.bias" not in llama
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= set(qwen)
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen
    whisper = {s.name for s in sites(open_checkpoint(tiny_dir / "whisper"))}
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in whisper
    assert "model.encoder.layers.0.self_attn.q_proj.bias" in whisper
    gpt2 = {s.name: s for s in sites(open_checkpoint(tiny_dir / "gpt2"))}
    assert gpt2["transformer.h.0.attn.c_attn.weight"].info.shape == (32, 96)  # Conv1D: (in, 3·out)


def test_family_from_keys_without_config(tiny_dir: Path) -> None:
    for fam in FAMILIES:
        ck = open_checkpoint(tiny_dir / fam / "model.safetensors")
        ck.config = None
        # a bare RobertaModel has BERT's key layout exactly (same roles); a "roberta." prefix tells them apart
        assert detect_family(ck) == ("bert" if fam == "roberta" else fam), fam


def test_globs() -> None:
    assert expand_braces("a.{q,v}_proj") == ["a.q_proj", "a.v_proj"]
    assert matches("model.layers.0.self_attn.q_proj.weight", ["*.{q,v}_proj.*"])
    assert not matches("model.layers.0.self_attn.k_proj.weight", ["*.{q,v}_proj.*"])
    assert matches("encoder.layer.0.output.dense.bias", ["encoder.layer.0"])
    assert not matches("encoder.layer.10.output.dense.bias", ["encoder.layer.1"])
