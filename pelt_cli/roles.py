"""Roles inferred from the model itself: layer index, block kind and attention/FFN role from names and the config.

The hand tables of :mod:`architectures` are overrides; everything they do not match is inferred here from the
module path alone (as it appears on disk), so ``pelt inspect`` (headers only, no torch) and recipe targets (a live
or ``meta`` model) agree. Fused QKV layouts (contiguous, per-head interleaved, grouped) come from the config.
"""

from __future__ import annotations

import re
from typing import Any

# A repeated block list: ``h.3``, ``layers.3``, ``layer.3``, ``block.3``, ``blocks.3``, ``albert_layers.3``, …
# (``conv_layers`` of audio feature extractors are not transformer blocks).
LAYER_LIST = re.compile(r"(?:^|\.)(?!conv)(h|[A-Za-z_]*layers?|[A-Za-z_]*blocks?)\.(\d+)(?=\.|$)")

Q_NAMES = {"q", "query", "q_proj", "q_lin", "wq", "query_proj", "q_linear", "to_q"}
K_NAMES = {"k", "key", "k_proj", "k_lin", "wk", "key_proj", "k_linear", "to_k"}
V_NAMES = {"v", "value", "v_proj", "v_lin", "wv", "value_proj", "v_linear", "to_v"}
QKV = {"c_attn", "query_key_value", "qkv_proj", "wqkv", "qkv", "in_proj", "w_pack", "to_qkv"}
O_NAMES = {"o", "o_proj", "out_proj", "dense", "wo", "out_lin", "c_proj", "out", "proj", "to_out", "out_linear"}
GATE = {"gate_proj", "wi_0", "w1"}
UP = {
    "up_proj",
    "fc1",
    "c_fc",
    "dense_h_to_4h",
    "lin1",
    "wi",
    "wi_1",
    "fc_in",
    "intermediate_dense",
    "ffn",
    "w3",
    "linear1",
    "gate_up_proj",
}
DOWN = {
    "down_proj",
    "fc2",
    "dense_4h_to_h",
    "lin2",
    "wo",
    "fc_out",
    "output_dense",
    "ffn_output",
    "w2",
    "linear2",
    "c_proj",
}
ROUTER = {"gate", "router", "shared_expert_gate"}
CROSS = re.compile(r"(encoder_attn|encdecattention|crossattention|cross_attn)", re.I)
VISION = re.compile(r"(vision|visual|image|(^|\.)vit(\.|$))", re.I)
AUDIO = re.compile(r"(audio|speech|wav2vec|hubert|wavlm)", re.I)
AUDIO_TYPES = {
    "wav2vec2",
    "hubert",
    "wavlm",
    "data2vec-audio",
    "unispeech",
    "unispeech-sat",
    "sew",
    "sew-d",
    "wav2vec2-conformer",
    "wav2vec2-bert",
}
ENCODER_TYPES = {
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "distilbert",
    "albert",
    "electra",
    "deberta",
    "deberta-v2",
    "mpnet",
    "xlm",
    "ernie",
    "modernbert",
    "nomic_bert",
    "esm",
    "layoutlm",
    "mobilebert",
    "funnel",
    "squeezebert",
    "roformer",
    "megatron-bert",
    "big_bird",
    "longformer",
    "xlnet",
}


def layer_index(path: str) -> int | None:
    """The index in the model's block list (the outermost numbered ``h``/``layers``/``block``… list), or None.

    T5's ``encoder.block.3.layer.1.SelfAttention.q`` is layer 3; BLOOM's ``transformer.h.2.…`` is 2.
    """
    m = LAYER_LIST.search(path)
    return int(m.group(2)) if m else None


def block_kind(path: str, config: dict[str, Any] | None = None) -> str:
    """encoder, decoder, cross-attention, vision or audio for a path inside a block list; ``-`` outside."""
    m = LAYER_LIST.search(path)
    if not m:
        return "-"
    prefix, inside = path[: m.start()], path[m.end() :]
    mt = str((config or {}).get("model_type") or "")
    if VISION.search(prefix) or mt.endswith("vision_model") or mt in {"vit", "siglip_vision_model", "dinov2"}:
        return "vision"
    if AUDIO.search(prefix) or mt in AUDIO_TYPES or mt.endswith("audio_encoder"):
        return "audio"
    if CROSS.search(inside):
        return "cross-attention"
    if re.search(r"(^|\.|_)encoder(\.|$)", prefix):
        return "encoder"
    if re.search(r"(^|\.|_)decoder(\.|$)", prefix):
        return "decoder"
    return "encoder" if mt in ENCODER_TYPES else "decoder"


def infer_role(path: str) -> str:
    """The attention/FFN role a module's own naming means, or ``unknown``.

    Ambiguous leaves are read in context: ``dense``/``wo``/``c_proj`` inside an attention module (a path segment
    naming ``attn``/``attention``) are ``attn.o``, outside it the FFN output; BERT's ``intermediate.dense`` is
    ``ffn.up`` and ``output.dense`` ``ffn.down``.
    """
    parts = path.split(".")
    m = LAYER_LIST.search(path)
    inner = path[m.end() :].strip(".").split(".") if m else parts
    leaf = parts[-1].lower()
    parent = inner[-2].lower() if len(inner) >= 2 else ""
    attn = any("attn" in p.lower() or "attention" in p.lower() for p in inner[:-1])
    if attn:
        for names, role in (
            (QKV, "attn.qkv"),
            (Q_NAMES, "attn.q"),
            (K_NAMES, "attn.k"),
            (V_NAMES, "attn.v"),
            (O_NAMES, "attn.o"),
        ):
            if leaf in names:
                return role
        return "unknown"
    if m is None:
        return "unknown"
    if leaf == "dense" and parent == "intermediate":
        return "ffn.up"
    if leaf == "dense" and parent == "output":
        return "ffn.down"
    for names, role in ((GATE, "ffn.gate"), (UP, "ffn.up"), (DOWN, "ffn.down"), (ROUTER, "router")):
        if leaf in names:
            return role
    return "unknown"


def _first(cfg: dict[str, Any], *names: str) -> Any:
    return next((cfg[n] for n in names if cfg.get(n) is not None), None)


def _configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config and its sub-configs (text, vision, audio, …), the root first."""
    subs = [v for v in config.values() if isinstance(v, dict) and "model_type" in v]
    return [config] + subs


def qkv_ranges(config: dict[str, Any] | None, out_features: int) -> dict[str, list[tuple[int, int]]]:
    """Output ranges of q, k and v inside a fused QKV projection with ``out_features`` outputs.

    Head counts come from the config (``num_attention_heads``/``n_head``, ``num_key_value_heads``/``num_kv_heads``,
    ``multi_query``); the layout from the family: per-head interleaved (GPT-NeoX, BLOOM, Falcon's original
    layout), grouped (Falcon's new decoder architecture) or contiguous ``[q | k | v]`` (GPT-2, Phi-3, …).
    The first config (root, then sub-configs) whose sizes add up to ``out_features`` wins; equal thirds otherwise.

    Raises:
        ValueError: no config explains the width and it is not divisible by 3.
    """
    for cfg in _configs(config or {}):
        ranges = _ranges_for(cfg, out_features)
        if ranges:
            return ranges
    if out_features % 3:
        raise ValueError(f"cannot split a fused QKV projection of {out_features} outputs into q, k and v")
    d = out_features // 3
    return {"q": [(0, d)], "k": [(d, 2 * d)], "v": [(2 * d, 3 * d)]}


def _ranges_for(cfg: dict[str, Any], out: int) -> dict[str, list[tuple[int, int]]] | None:
    nh = _first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", "dim")
    if not nh or not hidden:
        return None
    hd = cfg.get("head_dim") or hidden // nh
    mt = cfg.get("model_type")
    if cfg.get("multi_query") and not cfg.get("new_decoder_architecture"):
        nkv = 1
    else:
        nkv = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "kv_n_heads") or nh
    if nh * hd + 2 * nkv * hd != out:
        return None
    if mt == "falcon" and cfg.get("new_decoder_architecture"):
        per = nh // nkv
        g = (per + 2) * hd
        return {
            "q": [(i * g, i * g + per * hd) for i in range(nkv)],
            "k": [(i * g + per * hd, i * g + (per + 1) * hd) for i in range(nkv)],
            "v": [(i * g + (per + 1) * hd, (i + 1) * g) for i in range(nkv)],
        }
    if mt in {"gpt_neox", "bloom", "persimmon"} or (mt == "falcon" and nkv == nh):
        return {p: [(h * 3 * hd + j * hd, h * 3 * hd + (j + 1) * hd) for h in range(nh)] for j, p in enumerate("qkv")}
    return {"q": [(0, nh * hd)], "k": [(nh * hd, (nh + nkv) * hd)], "v": [((nh + nkv) * hd, out)]}


def fused_slices(
    config: dict[str, Any] | None, out_features: int, parts: list[str] | tuple[str, ...]
) -> list[tuple[int, int]]:
    """The sorted output ranges of ``parts`` (q, k, v) of a fused QKV projection, adjacent ranges joined."""
    ranges = qkv_ranges(config, out_features)
    spans = sorted(r for p in parts for r in ranges[p])
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out
