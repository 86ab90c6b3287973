"""Recipe targets → sites of a live (or ``meta``) model: roles, module-path globs, layers and block kinds.

Every module that owns parameters becomes a candidate site. Its on-disk path comes from the key map
(transformers' own conversion mapping), and its role, layer and block from the on-disk role tables, so one
recipe that says ``attn.q`` works on BERT, LLaMA and Whisper alike, and a glob may use either naming.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .architectures import FAMILIES
from .keymap import KeyMap, key_map
from .methods import ModelSite
from .sites import ROLES, block_of, expand_braces, layer_of, role_of
from .surgery import is_inserted


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
    """Index a model's candidate sites (modules owning parameters, pelt's own excluded)."""
    km = key_map(model)
    fam = family or family_of(model)
    out = []
    for name, mod in model.named_modules():
        if not name or is_inserted(name) or not any(True for _ in mod.parameters(recurse=False)):
            continue
        try:
            disk = km.disk_module(name)
        except KeyError:
            disk = name
        out.append(ModelSite(name, disk, role_of(disk, fam), layer_of(disk), block_of(disk, fam)))
    return ModelView(model, km, fam, out)


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
        if t in ROLES:
            hits = [s for s in pool if s.role == t]
        else:
            rx = glob_regex(t)
            hits = [s for s in pool if rx.match(s.disk_module) or rx.match(s.module)]
        if not hits:
            problems.append(_no_match(mv, t, layers, blocks))
        for s in hits:
            chosen.setdefault(s.module, s)
    order = {s.module: i for i, s in enumerate(mv.sites)}
    return sorted(chosen.values(), key=lambda s: order[s.module]), problems


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
    fam = mv.family or "unknown-family"
    where = []
    if layers is not None:
        where.append(f"layers {list(layers)}")
    if blocks:
        where.append(f"blocks {list(blocks)}")
    scope = f" within {' and '.join(where)}" if where else ""
    if target in ROLES:
        have = sorted({s.role for s in mv.sites if s.role.startswith(("attn.", "ffn."))})
        return f"role {target!r} matches no module of this {fam} model{scope}; its roles are {', '.join(have)}"
    return f"glob {target!r} matches no module of this {fam} model{scope} (pelt inspect MODEL lists module paths)"
