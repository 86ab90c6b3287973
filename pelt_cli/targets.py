"""Recipe targets → sites of a live (or ``meta``) model: roles, module-path globs, layers and block kinds.

Every module that owns parameters becomes a candidate site. Its on-disk path comes from the key map
(transformers' own conversion mapping), and its role, layer and block from the on-disk role tables, so one
recipe that says ``attn.q`` works on BERT, LLaMA and Whisper alike, and a glob may use either naming.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .architectures import FAMILIES
from .keymap import KeyMap, key_map
from .methods import ModelSite
from .sites import ROLES, TARGET_SETS, UNKNOWN, block_of, expand_braces, layer_of, role_how
from .surgery import is_inserted, is_linear

FUSED_PARTS = {"attn.q": "q", "attn.k": "k", "attn.v": "v"}


@dataclass
class ModelView:
    """A model with its key map and family, and every candidate site."""

    model: Any
    keymap: KeyMap
    family: str | None
    sites: list[ModelSite]


def family_of(model: Any) -> str | None:
    """The role-table family of a transformers model, from its config's ``model_type``."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for fam, spec in FAMILIES.items():
        if mt in spec["model_types"]:
            return fam
    return None


def view(model: Any, family: str | None = None) -> ModelView:
    """Index a model's candidate sites (modules owning parameters, pelt's own excluded), each with its role (from
    the family's table where there is one, else inferred from its naming), layer index and block kind."""
    km = key_map(model)
    fam = family or family_of(model)
    cfg = config_dict(model)
    out = []
    for name, mod in model.named_modules():
        if not name or is_inserted(name) or not any(True for _ in mod.parameters(recurse=False)):
            continue
        try:
            disk = km.disk_module(name)
        except KeyError:
            disk = name
        role, how = role_how(disk, fam)
        out.append(ModelSite(name, disk, role, layer_of(disk), block_of(disk, fam, cfg), how=how))
    return ModelView(model, km, fam, out)


def config_dict(model: Any) -> dict[str, Any]:
    """A model's config as a plain dict (empty without one)."""
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else {}


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A module-path glob: ``*`` one segment (no dots), ``**`` any number of segments, ``{a,b}`` alternatives."""
    alts = []
    for alt in expand_braces(pattern):
        rx = ""
        i = 0
        while i < len(alt):
            if alt.startswith("**", i):
                rx += ".*"
                i += 2
            elif alt[i] == "*":
                rx += "[^.]*"
                i += 1
            elif alt[i] == "?":
                rx += "[^.]"
                i += 1
            else:
                rx += re.escape(alt[i])
                i += 1
        alts.append(rx)
    return re.compile("^(?:" + "|".join(alts) + ")$")


def select(
    mv: ModelView,
    targets: list[str] | tuple[str, ...],
    layers: tuple[int, ...] | None = None,
    blocks: tuple[str, ...] = (),
) -> tuple[list[ModelSite], list[str]]:
    """Sites matching any target (a role or a glob on the disk or memory path), restricted by layers and blocks.

    Layer indices may be negative (counted from the end of each block kind's layers).

    Returns:
        ``(sites, problems)``: problems name each target that matched nothing, with what the model offers.
    """
    problems = []
    chosen: dict[str, ModelSite] = {}
    pool = [s for s in mv.sites if not blocks or s.block in blocks]
    if layers is not None:
        pool = _filter_layers(pool, layers)
    for t in targets:
        hits, parted = _hits(mv, pool, t)
        if not hits:
            problems.append(_no_match(mv, t, layers, blocks))
        for s in hits:
            _choose(chosen, s, FUSED_PARTS[t] if s.module in parted else None)
    order = {s.module: i for i, s in enumerate(mv.sites)}
    return sorted(chosen.values(), key=lambda s: order[s.module]), problems


def _hits(mv: ModelView, pool: list[ModelSite], target: str) -> tuple[list[ModelSite], set[str]]:
    """Sites one target names, and which of them are fused QKV layers it selects a part of."""
    if target in TARGET_SETS:
        return target_set(mv, pool, target), set()
    if target in ROLES:
        hits = [s for s in pool if s.role == target]
        if target in FUSED_PARTS:
            fused = [s for s in pool if s.role == "attn.qkv"]
            return sorted(hits + fused, key=lambda s: s.module), {s.module for s in fused}
        return hits, set()
    rx = glob_regex(target)
    return [s for s in pool if rx.match(s.disk_module) or rx.match(s.module)], set()


def _choose(chosen: dict[str, ModelSite], s: ModelSite, part: str | None) -> None:
    """Add a site; a fused QKV layer gathers the parts its targets name (a whole-layer target wins)."""
    old = chosen.get(s.module)
    if part is None:
        chosen[s.module] = replace(s, parts=None)
    elif old is None:
        chosen[s.module] = replace(s, parts=(part,))
    elif old.parts is not None and part not in old.parts:
        chosen[s.module] = replace(old, parts=tuple(p for p in "qkv" if p in old.parts or p == part))


def target_set(mv: ModelView, pool: list[ModelSite], name: str) -> list[ModelSite]:
    """``all-linear``: every Linear/Conv1D but the output head (peft's ``all-linear``); ``all-attention`` and
    ``all-ffn``: every site whose role is an attention or FFN projection."""
    if name == "all-attention":
        return [s for s in pool if s.role.startswith("attn.")]
    if name == "all-ffn":
        return [s for s in pool if s.role.startswith("ffn.")]
    get_out = getattr(mv.model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    mods = dict(mv.model.named_modules())
    return [s for s in pool if is_linear(mods[s.module]) and mods[s.module] is not head]


def _filter_layers(pool: list[ModelSite], layers: tuple[int, ...]) -> list[ModelSite]:
    count: dict[str, int] = {}
    for s in pool:
        if s.layer is not None:
            count[s.block] = max(count.get(s.block, 0), s.layer + 1)
    keep = []
    for s in pool:
        if s.layer is None:
            continue
        n = count[s.block]
        if any((i if i >= 0 else n + i) == s.layer for i in layers):
            keep.append(s)
    return keep


def _no_match(mv: ModelView, target: str, layers: tuple[int, ...] | None, blocks: tuple[str, ...]) -> str:
    fam = mv.family or getattr(getattr(mv.model, "config", None), "model_type", None) or "unknown-family"
    where = []
    if layers is not None:
        where.append(f"layers {list(layers)}")
    if blocks:
        where.append(f"blocks {list(blocks)}")
    scope = f" within {' and '.join(where)}" if where else ""
    if target in ROLES or target in TARGET_SETS:
        kind = "role" if target in ROLES else "target set"
        have = sorted({s.role for s in mv.sites if s.role != UNKNOWN})
        roles = f"its roles are {', '.join(have)}" if have else "it has no recognised roles"
        return f"{kind} {target!r} matches no module of this {fam} model{scope}; {roles}; {_glob_hint(mv)}"
    return (
        f"glob {target!r} matches no module of this {fam} model{scope} (pelt inspect MODEL lists module paths); "
        f"{_glob_hint(mv)}"
    )


def _glob_hint(mv: ModelView) -> str:
    """A glob that matches layers of this model: the Linear layers in its blocks, by their own names."""
    mods = dict(mv.model.named_modules())
    leaves = sorted(
        {s.disk_module.rsplit(".", 1)[-1] for s in mv.sites if s.layer is not None and is_linear(mods.get(s.module))}
    )
    if not leaves:
        leaves = sorted({s.disk_module.rsplit(".", 1)[-1] for s in mv.sites if is_linear(mods.get(s.module))})
    if not leaves:
        return "pelt inspect MODEL lists its module paths"
    glob = "**." + (leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves[:8]) + "}")
    return f"a glob that matches its linear layers: {glob!r} (or targets: all-linear)"
