"""The key map between in-memory module names and on-disk tensor names, for every family and through ties."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import FAMILIES

from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.keymap import check_against, key_map, skeleton


@pytest.mark.parametrize("family", FAMILIES)
def test_key_map_matches_disk(tiny_dir: Path, family: str) -> None:
    km = key_map(skeleton(tiny_dir / family))
    missing, unexpected = check_against(km, open_checkpoint(tiny_dir / family))
    assert missing == [] and unexpected == []
    assert km.converted == []
    for mem, disk in km.to_disk.items():
        assert km.memory_name(disk) == mem


def test_key_map_vit_and_qwen2_audio(tiny_dir: Path) -> None:
    vit = key_map(skeleton(tiny_dir / "vit"))
    assert vit.disk_name("layers.0.attention.q_proj.weight") == "encoder.layer.0.attention.attention.query.weight"
    assert vit.memory_name("encoder.layer.1.attention.output.dense.bias") == "layers.1.attention.o_proj.bias"
    assert vit.disk_module("layers.0.mlp.fc1") == "encoder.layer.0.intermediate.dense"
    qa = key_map(skeleton(tiny_dir / "qwen2_audio"))
    assert (
        qa.disk_name("model.audio_tower.layers.0.self_attn.q_proj.weight")
        == "audio_tower.layers.0.self_attn.q_proj.weight"
    )
    assert qa.disk_name("model.multi_modal_projector.linear.weight") == "multi_modal_projector.linear.weight"
    assert (
        qa.disk_name("model.language_model.layers.0.mlp.up_proj.weight")
        == "language_model.model.layers.0.mlp.up_proj.weight"
    )
    assert qa.disk_name("lm_head.weight") == "language_model.lm_head.weight"
    assert qa.memory_name("language_model.model.norm.weight") == "model.language_model.norm.weight"


def test_key_map_follows_ties(tiny_dir: Path) -> None:
    km = key_map(skeleton(tiny_dir / "gpt2"))
    assert km.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert km.disk_name("lm_head.weight") == "transformer.wte.weight"
