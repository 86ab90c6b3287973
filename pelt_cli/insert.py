"""Insert a recipe into a model (real or on ``meta``): select each entry's sites, check, then let each method
attach its modules. The same code plans (on a skeleton, for ``--dry-run`` and validation) and applies."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pelt_cli.errors import RecipeError
from pelt_cli.recipe import Recipe


@dataclass
class PlanRow:
    """One insertion: the recipe entry, the method's module name, the site (in memory and on disk) and its size."""

    entry: int
    method: str
    site: str
    disk_site: str
    role: str
    layer: int | None
    block: str
    new_params: int
    modules: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanRow:
        """A row from ``run.json`` (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def key(self) -> tuple[str, str]:
        """``(site, method)``: what identifies a row when two plans are compared."""
        return self.site, self.method


def insert_recipe(model: Any, recipe: Recipe) -> list[PlanRow]:
    """Check every entry of a recipe against a model, then insert them all (seeded by ``recipe.seed``).

    Raises:
        RecipeError: every target that matches nothing and every method check that fails, all at once.
    """
    import torch

    from pelt_cli import methods
    from pelt_cli.sites import block_of, layer_of
    from pelt_cli.targets import view

    mv = view(model)
    chosen, problems = [], []
    for e in recipe.inserts:
        method = methods.get(e.method)
        sites, target_problems = select_for(mv, e)
        problems += [f"{e.at('targets')}: {p}" for p in target_problems]
        if not target_problems:
            problems += [f"{e.at('params')} ({e.method}): {p}" for p in dedupe(method.check(model, e.params, sites))]
        chosen.append((e, method, sites))
    if problems:
        raise RecipeError(problems, hint="pelt inspect MODEL shows the roles and module paths a recipe can target")
    torch.manual_seed(recipe.seed)
    rows = []
    by_module = {s.module: s for s in mv.sites}
    for e, method, sites in chosen:
        for ins in method.insert(model, e.params, sites):
            s = by_module.get(ins.site)
            disk = s.disk_module if s else _disk_path(mv, ins.site)
            rows.append(
                PlanRow(
                    e.index,
                    ins.method,
                    ins.site,
                    disk,
                    ins.role,
                    layer_of(disk),
                    block_of(disk, mv.family),
                    _count(model, ins.modules),
                    list(ins.modules),
                )
            )
    return rows


def dedupe(problems: list[str]) -> list[str]:
    """Collapse problems that differ only in the module path they name ("… (and N more sites)")."""
    import re

    groups: dict[str, list[str]] = {}
    for p in problems:
        groups.setdefault(re.sub(r"\b[\w]+(\.[\w]+){2,}\b", "<site>", p), []).append(p)
    return [g[0] + (f" (and {len(g) - 1} more site(s) alike)" if len(g) > 1 else "") for g in groups.values()]


def select_for(mv: Any, entry: Any) -> tuple[list, list[str]]:
    """Sites of one recipe entry (no targets → no sites: the method places itself, e.g. ``domain``)."""
    from pelt_cli.targets import select

    if not entry.targets:
        return [], []
    return select(mv, entry.targets, entry.layers, entry.blocks)


def _disk_path(mv: Any, module: str) -> str:
    """The on-disk path of a non-leaf module (e.g. ``model.multi_modal_projector`` → ``multi_modal_projector``)."""
    for s in mv.sites:
        if s.module.startswith(module + "."):
            tail = s.module[len(module) :]
            if s.disk_module.endswith(tail):
                return s.disk_module[: -len(tail)]
    return module


def _count(model: Any, module_paths: list[str]) -> int:
    seen, total = set(), 0
    for path in module_paths:
        for p in model.get_submodule(path).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
