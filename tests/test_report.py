"""``pelt inspect``'s report: parameter totals equal the state on disk and the model, ties, unknown families."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from tiny_models import FAMILIES

from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.keymap import key_map
from pelt_cli.report import inspect_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_total_params_equal_state_on_disk(tiny_dir: Path, family: str) -> None:
    from safetensors import safe_open

    for variant in (family, f"{family}-sharded"):
        report = inspect_checkpoint(tiny_dir / variant)
        ckpt = open_checkpoint(tiny_dir / variant)
        on_disk = 0
        for f in ckpt.files:
            with safe_open(f, "pt") as h:
                on_disk += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
        assert report["total_params"] == on_disk
        assert report["family"] == family
        assert report["sharded"] == variant.endswith("sharded")


@pytest.mark.parametrize("family", FAMILIES)
def test_total_params_equal_model(tiny_dir: Path, tiny_models_built: dict, family: str) -> None:
    model = tiny_models_built[family]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    expected = sum(t.numel() for k, t in model.state_dict().items() if k not in tied)
    assert inspect_checkpoint(tiny_dir / family)["total_params"] == expected


@pytest.mark.parametrize(
    "family,target,source",
    [
        ("gpt2", "lm_head.weight", "transformer.wte.weight"),
        ("bert", "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
        ("bert", "cls.predictions.decoder.bias", "cls.predictions.bias"),
        ("whisper", "proj_out.weight", "model.decoder.embed_tokens.weight"),
    ],
)
def test_tied_keys_reported(tiny_dir: Path, family: str, target: str, source: str) -> None:
    report = inspect_checkpoint(tiny_dir / family)
    row = next(r for r in report["tensors"] if r["name"] == target)
    assert row["tied_to"] == source and row["shard"] is None and row["params"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_tie_table_agrees_with_transformers(tiny_dir: Path, tiny_models_built: dict, family: str) -> None:
    model = tiny_models_built[family]
    km = key_map(model)
    theirs = {t: km.disk_name(s) for t, s in (model.all_tied_weights_keys or {}).items()}
    ours = {r["name"]: r["tied_to"] for r in inspect_checkpoint(tiny_dir / family)["tensors"] if r["tied_to"]}
    assert ours == theirs


def test_unknown_family_still_inspects(tmp_path: Path) -> None:
    header = {
        "blob.alpha": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
        "blob.beta": {"dtype": "F16", "shape": [8], "data_offsets": [48, 64]},
    }
    raw = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    report = inspect_checkpoint(tmp_path / "m.safetensors")
    assert report["family"] is None and report["total_params"] == 20 and report["total_bytes"] == 64
    assert {r["role"] for r in report["tensors"]} == {"unknown"}
