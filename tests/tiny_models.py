"""Tiny models of eight families built from transformers configs (hidden 32, 2 layers), no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ["bert", "roberta", "gpt2", "llama", "qwen2", "whisper", "vit", "qwen2_audio"]


SEQ2SEQ = dict(  # an encoder-decoder's tiny sizes (Whisper, BART, …)
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
)
WHISPER = dict(
    SEQ2SEQ,
    vocab_size=100,
    num_mel_bins=16,
    max_source_positions=100,
    max_target_positions=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)


SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
VISION = dict(SHAPE, image_size=16, patch_size=8)  # a tiny vision tower (CLIP, SigLIP, ViT)
CONFIGS = {  # family: (transformers config class, its tiny settings beyond SHAPE)
    "bert": ("BertConfig", dict(vocab_size=100, max_position_embeddings=64)),
    "roberta": ("RobertaConfig", dict(vocab_size=100, max_position_embeddings=64)),
    "llama": ("LlamaConfig", dict(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64)),
    "qwen2": ("Qwen2Config", dict(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64)),
    "vit": ("ViTConfig", dict(VISION, num_channels=3)),
}


def config(family: str, **overrides: Any) -> Any:
    """The tiny transformers config of ``family`` (hidden 32, 2 layers, 4 heads), with ``overrides`` on top."""
    import transformers as tf

    name, settings = CONFIGS[family]
    return getattr(tf, name)(**{**SHAPE, **settings, **overrides})


def build(family: str) -> Any:
    """Return a freshly initialised tiny model of ``family`` (seeded: the same weights every call)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForMaskedLM(config("bert"))
    if family == "roberta":
        return tf.RobertaModel(config("roberta"))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    if family == "llama":
        return tf.LlamaForCausalLM(config("llama"))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(config("qwen2"))
    if family == "whisper":
        return tf.WhisperForConditionalGeneration(tf.WhisperConfig(**WHISPER))
    if family == "vit":
        return tf.ViTModel(config("vit"))
    if family == "qwen2_audio":
        cfg = tf.Qwen2AudioConfig(
            audio_config=dict(
                model_type="qwen2_audio_encoder",
                d_model=32,
                encoder_layers=2,
                encoder_attention_heads=4,
                encoder_ffn_dim=64,
                num_mel_bins=16,
                max_source_positions=100,
            ),
            text_config=dict(model_type="qwen2", **SHAPE, **CONFIGS["qwen2"][1]),
            audio_token_index=99,
        )
        return tf.Qwen2AudioForConditionalGeneration(cfg)
    raise ValueError(f"unknown family {family!r}")


def save(family: str, out: Path, max_shard_size: str | None = None) -> Path:
    """Build and ``save_pretrained`` a tiny model; returns ``out``."""
    model = build(family)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return out


def sample_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """Model inputs of the right kind for a tiny model of ``family`` (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if family == "whisper":
        return {"input_features": torch.randn(batch, 16, 200, generator=g), "decoder_input_ids": ids}
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": ids, "attention_mask": mask}


def model_inputs(family: str) -> dict:
    """A forward input for each tiny family (batch 2, seeded), the second row's last two tokens padded."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 90 if family == "qwen2_audio" else 100, (2, 7), generator=g)
    if family == "whisper":
        return {"input_features": torch.randn(2, 16, 200, generator=g), "decoder_input_ids": ids}
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def forward(model: Any, inputs: dict) -> Any:
    """The model's logits on ``inputs``, or its last hidden state when it has no head."""
    return main_output(model(**inputs))


def main_output(out) -> torch.Tensor:  # noqa: F821
    """The tensor to compare between two runs of a model: logits when present, else last_hidden_state."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise ValueError(f"no logits or last_hidden_state in {type(out).__name__}")
