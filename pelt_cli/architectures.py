"""Per-family role maps, kept as data: which module paths are attention q/k/v/o, FFN, embeddings, norms, ….

Patterns are regular expressions searched in a module path as it appears **on disk** (safetensors keys without
the final ``.weight``/``.bias``). In-memory names, which can differ in transformers 5, are first mapped to disk
names by :mod:`pelt_cli.keymap` (transformers' own conversion mapping), so one table serves both views.

Roles: attn.q attn.k attn.v attn.qkv attn.o ffn.up ffn.gate ffn.down embed lm_head norm conv projector pooler head
(and ``unknown``). Block kinds: encoder decoder cross-attention audio vision projector (or ``-`` outside blocks).
"""

from __future__ import annotations

Rule = tuple[str, str]  # (regex searched in the module path, value)

# Attention and FFN names shared by BERT-style encoders (BERT, RoBERTa, ViT on disk).
BERT_ROLES: list[Rule] = [
    (r"attention\.(self|attention)\.query$", "attn.q"),
    (r"attention\.(self|attention)\.key$", "attn.k"),
    (r"attention\.(self|attention)\.value$", "attn.v"),
    (r"attention\.output\.dense$", "attn.o"),
    (r"intermediate\.dense$", "ffn.up"),
    (r"layer\.\d+\.output\.dense$", "ffn.down"),
]
# LLaMA-style decoders (LLaMA, Qwen2, and the text model of Qwen2-Audio).
LLAMA_ROLES: list[Rule] = [
    (r"self_attn\.q_proj$", "attn.q"),
    (r"self_attn\.k_proj$", "attn.k"),
    (r"self_attn\.v_proj$", "attn.v"),
    (r"self_attn\.o_proj$", "attn.o"),
    (r"mlp\.gate_proj$", "ffn.gate"),
    (r"mlp\.up_proj$", "ffn.up"),
    (r"mlp\.down_proj$", "ffn.down"),
]
# Whisper-style encoder/decoder layers (Whisper, the audio tower of Qwen2-Audio).
WHISPER_ROLES: list[Rule] = [
    (r"(self_attn|encoder_attn)\.q_proj$", "attn.q"),
    (r"(self_attn|encoder_attn)\.k_proj$", "attn.k"),
    (r"(self_attn|encoder_attn)\.v_proj$", "attn.v"),
    (r"(self_attn|encoder_attn)\.out_proj$", "attn.o"),
    (r"layers\.\d+\.fc1$", "ffn.up"),
    (r"layers\.\d+\.fc2$", "ffn.down"),
    (r"conv\d+$", "conv"),
]
GPT2_ROLES: list[Rule] = [
    (r"attn\.c_attn$", "attn.qkv"),
    (r"attn\.c_proj$", "attn.o"),
    (r"mlp\.c_fc$", "ffn.up"),
    (r"mlp\.c_proj$", "ffn.down"),
]
# Modules outside the attention/FFN blocks; shared by every known family.
COMMON_ROLES: list[Rule] = [
    (r"(^|\.)(word|position|token_type)_embeddings$", "embed"),
    (r"(^|\.)(embed_tokens|embed_positions|wte|wpe|shared|word_embeddings|embed_in)$", "embed"),
    (r"(^|\.)patch_embeddings\.projection$", "embed"),
    (r"(^|\.)embeddings$", "embed"),
    (r"(^|\.)(lm_head|proj_out|embed_out)$", "lm_head"),
    (r"^cls\.predictions\.decoder$", "lm_head"),
    (r"(LayerNorm|layer_norm\d*|layernorm\d*|_layernorm|layernorm_\w+|ln_\w+|_norm\d*|(^|\.)norm\d*)$", "norm"),
    (r"(^|\.)pooler\.dense$", "pooler"),
    (r"(^|\.)multi_modal_projector\.\w+$", "projector"),
    (r"(^|\.)(classifier|score|cls\.predictions\.transform\.dense|cls\.predictions)$", "head"),
]

FAMILIES: dict[str, dict] = {
    "bert": {
        "model_types": ["bert"],
        "roles": BERT_ROLES,
        "blocks": [(r"(^|\.)encoder\.layer\.\d+\.", "encoder")],
        # target -> source, on disk; applied when config ties word embeddings
        "ties": {
            "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias",
        },
    },
    "roberta": {
        "model_types": ["roberta", "xlm-roberta", "camembert"],
        "roles": BERT_ROLES,
        "blocks": [(r"(^|\.)encoder\.layer\.\d+\.", "encoder")],
        "ties": {
            "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
            "lm_head.decoder.bias": "lm_head.bias",
        },
    },
    "gpt2": {
        "model_types": ["gpt2"],
        "roles": GPT2_ROLES,
        "blocks": [(r"(^|\.)h\.\d+\.", "decoder")],
        "ties": {"lm_head.weight": "transformer.wte.weight"},
        "conv1d": True,  # weights stored (in, out): transposed relative to nn.Linear
    },
    "llama": {
        "model_types": ["llama", "mistral"],
        "roles": LLAMA_ROLES,
        "blocks": [(r"(^|\.)layers\.\d+\.", "decoder")],
        "ties": {"lm_head.weight": "model.embed_tokens.weight"},
    },
    "qwen2": {
        "model_types": ["qwen2"],
        "roles": LLAMA_ROLES,
        "blocks": [(r"(^|\.)layers\.\d+\.", "decoder")],
        "ties": {"lm_head.weight": "model.embed_tokens.weight"},
    },
    "whisper": {
        "model_types": ["whisper"],
        "roles": WHISPER_ROLES,
        "blocks": [
            (r"(^|\.)decoder\.layers\.\d+\.encoder_attn", "cross-attention"),
            (r"(^|\.)encoder\.layers\.\d+\.", "encoder"),
            (r"(^|\.)decoder\.layers\.\d+\.", "decoder"),
        ],
        "ties": {"proj_out.weight": "model.decoder.embed_tokens.weight"},
    },
    "vit": {
        "model_types": ["vit"],
        "roles": BERT_ROLES,
        "blocks": [(r"(^|\.)encoder\.layer\.\d+\.", "vision")],
        "ties": {},
    },
    "qwen2_audio": {
        "model_types": ["qwen2_audio"],
        "roles": WHISPER_ROLES + LLAMA_ROLES,
        "blocks": [
            (r"^audio_tower\.", "audio"),
            (r"^language_model\.model\.layers\.\d+\.", "decoder"),
            (r"^multi_modal_projector\.", "projector"),
        ],
        "ties": {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"},
        "tie_config": "text_config",
    },
}

# Key signatures to recognise a family when there is no config.json (a bare .safetensors file).
SIGNATURES: list[Rule] = [
    (r"^multi_modal_projector\.", "qwen2_audio"),
    (r"\bencoder_attn\.k_proj\.weight$", "whisper"),
    (r"\bh\.\d+\.attn\.c_attn\.weight$", "gpt2"),
    (r"\battention\.attention\.query\.weight$", "vit"),
    (r"^roberta\.", "roberta"),
    (r"\battention\.self\.query\.weight$", "bert"),
    (r"\bself_attn\.q_proj\.bias$", "qwen2"),
    (r"\bself_attn\.q_proj\.weight$", "llama"),
]
