"""A zoo of tiny models of common transformers families beyond the eight role tables (hidden 16-32, 1-2 layers).

Each entry builds a model from its config class alone (no download), seeded. ``peft`` names the family's key in
peft's default LoRA target mapping (None where peft has none).
"""

from __future__ import annotations

from typing import Any

from tiny_models import SEQ2SEQ, VISION

D = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=100,
    max_position_embeddings=64,
)
LLAMA_LIKE = dict(D, num_key_value_heads=2)

# family: (config class, model class, config kwargs, input kind)
ZOO: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA_LIKE, head_dim=8), "text"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(LLAMA_LIKE, head_dim=8), "text"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_LIKE, head_dim=8), "text"),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE, "text"),
    "phi": ("PhiConfig", "PhiForCausalLM", D, "text"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(LLAMA_LIKE, pad_token_id=0), "text"),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
        "text",
    ),
    "falcon-new": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            vocab_size=100,
            new_decoder_architecture=True,
        ),
        "text",
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", D, "text"),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            vocab_size=100,
            max_position_embeddings=64,
        ),
        "text",
    ),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=100), "text"),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, vocab_size=100),
        "text",
    ),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", LLAMA_LIKE, "text"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", LLAMA_LIKE, "text"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", LLAMA_LIKE, "text"),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
        "text",
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            LLAMA_LIKE,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        ),
        "text",
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=100, decoder_start_token_id=0),
        "seq2seq",
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(SEQ2SEQ, vocab_size=100, max_position_embeddings=64),
        "seq2seq",
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertModel",
        dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100, max_position_embeddings=64),
        "text",
    ),
    "albert": ("AlbertConfig", "AlbertModel", dict(D, embedding_size=16), "text"),
    "electra": ("ElectraConfig", "ElectraModel", dict(D, embedding_size=16), "text"),
    "deberta-v2": (
        "DebertaV2Config",
        "DebertaV2Model",
        dict(D, relative_attention=True, pos_att_type=["p2c", "c2p"]),
        "text",
    ),
    "mpnet": ("MPNetConfig", "MPNetModel", D, "text"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", D, "text"),
    "clip": (
        "CLIPVisionConfig",
        "CLIPVisionModel",
        VISION,
        "image",
    ),
    "siglip": (
        "SiglipVisionConfig",
        "SiglipVisionModel",
        VISION,
        "image",
    ),
    "wav2vec2": (
        "Wav2Vec2Config",
        "Wav2Vec2Model",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            do_stable_layer_norm=True,
        ),
        "audio",
    ),
}


def build(family: str) -> Any:
    """A freshly initialised tiny model of a zoo family (seeded)."""
    import torch
    import transformers as tf

    cfg_cls, model_cls, kw, _ = ZOO[family]
    torch.manual_seed(0)
    cfg = getattr(tf, cfg_cls)(**kw)
    return getattr(tf, model_cls)(cfg)


def inputs(family: str, batch: int = 2, seq: int = 7) -> dict:
    """Forward inputs of the right kind for a zoo family (seeded)."""
    import torch

    g = torch.Generator().manual_seed(0)
    kind = ZOO[family][3]
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(batch, 400, generator=g)}
    ids = torch.randint(3, 90, (batch, seq), generator=g)
    if kind == "seq2seq":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main_output(out: Any) -> Any:
    """The main tensor of a model output (logits or last hidden state)."""
    for name in ("logits", "last_hidden_state"):
        t = getattr(out, name, None)
        if t is not None:
            return t
    return out[0]
