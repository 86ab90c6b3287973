"""Sites and roles: every tensor and module of a checkpoint, with its role, layer index and block kind.

Works from safetensors headers and ``config.json`` only (no torch). Patterns live in :mod:`architectures`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .architectures import COMMON_ROLES, FAMILIES, SIGNATURES
from .io.checkpoint import Checkpoint
from .io.header import TensorInfo
from .roles import block_kind, infer_role, layer_index

UNKNOWN = "unknown"
ROLES = [
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.qkv",
    "attn.o",
    "ffn.up",
    "ffn.gate",
    "ffn.down",
    "embed",
    "lm_head",
    "norm",
    "conv",
    "projector",
    "pooler",
    "head",
    "router",
    UNKNOWN,
]
# Target sets a recipe may name besides roles and globs (``all-linear``: peft's semantics).
TARGET_SETS = ("all-linear", "all-attention", "all-ffn")


@dataclass(frozen=True)
class Site:
    """One tensor placed in its model: module path, role, layer and block kind.

    ``tied_to`` is set for a tensor that the model ties to another one and that is absent from disk
    (``save_pretrained`` drops tied targets); such a site has no ``info``. ``how`` says how the role was found:
    ``table`` (a family's hand table), ``inferred`` (from the naming in its block) or empty (unknown).
    """

    name: str
    module: str
    role: str
    layer: int | None
    block: str
    info: TensorInfo | None
    tied_to: str | None = None
    how: str = ""

    @property
    def params(self) -> int:
        """Elements stored on disk (0 for a tied target that is not stored)."""
        return self.info.numel if self.info else 0

    @property
    def nbytes(self) -> int:
        """Bytes stored on disk."""
        return self.info.nbytes if self.info else 0


def module_of(name: str) -> str:
    """The module path of a tensor key: ``a.b.weight`` → ``a.b``; ``embeddings.cls_token`` → ``embeddings``."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def detect_family(ckpt: Checkpoint) -> str | None:
    """The family of a checkpoint: from ``config.json``'s ``model_type``, else from key signatures.

    Returns:
        A key of :data:`architectures.FAMILIES`, or ``None`` for an unknown family.
    """
    mt = (ckpt.config or {}).get("model_type")
    if mt:
        for fam, spec in FAMILIES.items():
            if mt in spec["model_types"]:
                return fam
        return None
    for pattern, fam in SIGNATURES:
        rx = re.compile(pattern)
        if any(rx.search(k) for k in ckpt.tensors):
            return fam
    return None


Rules = list[tuple[re.Pattern[str], str]]
_COMMON: Rules = [(re.compile(p), r) for p, r in COMMON_ROLES]


@lru_cache(maxsize=64)
def _compiled(family: str) -> tuple[Rules, Rules]:
    spec = FAMILIES[family]
    roles = [(re.compile(p), r) for p, r in spec["roles"]]
    blocks = [(re.compile(p), b) for p, b in spec["blocks"]]
    return roles, blocks


@lru_cache(maxsize=65536)
def role_how(module: str, family: str | None) -> tuple[str, str]:
    """``(role, how)`` of a module path (on-disk naming): the family's table first, then the role the module's
    own naming means in its block (``inferred``), then the names shared by every model (embeddings, norms, heads).
    """
    if family is not None:
        for rx, role in _compiled(family)[0]:
            if rx.search(module):
                return role, "table"
    role = infer_role(module)
    if role != UNKNOWN:
        return role, "inferred"
    for rx, role in _COMMON:
        if rx.search(module):
            return role, "table" if family else "inferred"
    return UNKNOWN, ""


def role_of(module: str, family: str | None) -> str:
    """The role of a module path (on-disk naming) in ``family``; ``unknown`` when nothing matches."""
    return role_how(module, family)[0]


def block_of(name: str, family: str | None, config: dict[str, Any] | None = None) -> str:
    """The block kind of a tensor or module path: encoder, decoder, cross-attention, audio, vision, projector or -.

    A known family's table decides; otherwise the kind follows the block list's path and the config's model type.
    """
    if family is None:
        return block_kind(name, config)
    _, blocks = _compiled(family)
    for rx, block in blocks:
        if rx.search(name + "."):
            return block
    return "-"


def layer_of(name: str) -> int | None:
    """The index in the model's block list (``…layers.3.…`` → 3, T5 ``block.3.layer.1`` → 3), or ``None``."""
    return layer_index(name)


def ties_enabled(config: dict[str, Any] | None, family: str) -> bool:
    """Whether the config ties output embeddings to input embeddings (transformers' default: yes)."""
    cfg = config or {}
    sub = FAMILIES[family].get("tie_config")
    if sub and isinstance(cfg.get(sub), dict):
        cfg = cfg[sub]
    return bool(cfg.get("tie_word_embeddings", True))


def tied_keys(ckpt: Checkpoint, family: str | None) -> dict[str, str]:
    """Tied parameters of the model as ``target → source`` (on-disk names), where the source is on disk.

    The target is usually absent from disk (``save_pretrained`` drops it); if a writer kept it, it is still tied.

    BERT's decoder bias is always tied to ``cls.predictions.bias``; the other ties follow ``tie_word_embeddings``.
    """
    if family is None:
        return {}
    enabled = ties_enabled(ckpt.config, family)
    out = {}
    for target, source in FAMILIES[family]["ties"].items():
        always = target.endswith(".bias")
        if source in ckpt.tensors and (enabled or always):
            out[target] = source
    return out


def sites(ckpt: Checkpoint) -> list[Site]:
    """Every tensor of the checkpoint as a :class:`Site`, plus tied targets absent from disk, in key order."""
    family = detect_family(ckpt)
    ties = tied_keys(ckpt, family)
    cfg = ckpt.config
    out = [_site(name, info, family, cfg, ties.get(name)) for name, info in ckpt.tensors.items()]
    for target, source in ties.items():
        if target not in ckpt.tensors:
            out.append(_site(target, None, family, cfg, tied_to=source))
    out.sort(key=lambda s: natural_key(s.name))
    return out


def _site(
    name: str, info: TensorInfo | None, family: str | None, config: dict[str, Any] | None, tied_to: str | None = None
) -> Site:
    module = module_of(name)
    role, how = role_how(module, family)
    return Site(name, module, role, layer_of(name), block_of(name, family, config), info, tied_to, how)


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def matches(name: str, patterns: list[str]) -> bool:
    """Whether a dotted name matches any glob pattern (``*`` any run of characters, ``?``, ``[..]``, ``{a,b}``).

    A pattern without a wildcard also matches as a dotted prefix (``encoder.layer.0`` matches its tensors).
    """
    for pat in patterns:
        for alt in expand_braces(pat):
            if fnmatch.fnmatchcase(name, alt):
                return True
            if not any(c in alt for c in "*?[") and (name == alt or name.startswith(alt + ".")):
                return True
    return False


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{q,v}_proj`` → ``q_proj``, ``v_proj``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for alt in m.group(1).split(",") for x in expand_braces(head + alt + tail)]
