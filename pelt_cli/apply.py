"""``pelt apply``: plan a recipe against a checkpoint, insert the modules, write a run directory.

The run directory's layout is :mod:`pelt_cli.run`'s.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pelt_cli.errors import PeltError, RecipeError
from pelt_cli.insert import PlanRow, insert_recipe
from pelt_cli.io.atomic import guard_output
from pelt_cli.io.header import read_header
from pelt_cli.recipe import Recipe
from pelt_cli.run import ADAPTER_FILE, Base, Run

MAX_GROWTH, MAX_NEW_PARAMS = 10, 50_000_000  # a recipe inserting more than 10× the base (+50M) is a typo, not PEFT


@dataclass
class Plan:
    """What applying a recipe to a checkpoint inserts, computed on a ``meta`` skeleton (no weights read)."""

    recipe: Recipe
    base: str
    family: str | None
    model_class: str
    base_params: int
    rows: list[PlanRow]

    @property
    def new_params(self) -> int:
        """Parameters inserted in all."""
        return sum(r.new_params for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan."""
        return {
            "recipe": self.recipe.name,
            "base": self.base,
            "family": self.family,
            "model_class": self.model_class,
            "base_params": self.base_params,
            "new_params": self.new_params,
            "percent_of_base": round(100 * self.new_params / max(self.base_params, 1), 4),
            "insertions": [asdict(r) for r in self.rows],
        }


def plan(recipe: Recipe, base: str | os.PathLike[str] | Base) -> Plan:
    """Validate a recipe against a checkpoint's header and config, on a ``meta`` skeleton (no weights loaded)."""
    b = base if isinstance(base, Base) else Base.open(base)
    b.verify()  # every tensor the config's model needs is on disk with its shape, before anything is planned
    model = b.skeleton()
    check_layers(recipe, model)
    rows = insert_recipe(model, recipe)
    the_plan = Plan(recipe, str(b.root), b.family, type(model).__name__, b.ckpt.total_params, rows)
    if the_plan.new_params > MAX_GROWTH * the_plan.base_params + MAX_NEW_PARAMS:
        raise RecipeError(
            [
                f"{recipe.source}: the recipe inserts {the_plan.new_params:,} parameters into a model of "
                f"{the_plan.base_params:,}; expected an adapter smaller than that (check the sizes in params:)"
            ]
        )
    return the_plan


def check_layers(recipe: Recipe, model: Any) -> None:
    """Refuse layer indices the model does not have, counted from its own parameters (no weights read).

    Raises:
        RecipeError: each entry whose ``layers`` name a layer outside ``-n … n-1``.
    """
    from pelt_cli.sites import layer_of

    found = [layer_of(name) for name, _ in model.named_parameters()]
    n = 1 + max((i for i in found if i is not None), default=-1)
    problems = []
    for e in recipe.inserts:
        bad = [i for i in e.layers or () if not -n <= i < n]
        if bad:
            have = f"{n} layers (0 to {n - 1}, or -{n} to -1 from the end)" if n else "no numbered layers"
            problems.append(f"{e.at('layers')}: layer {bad[0]} is out of range: the model has {have}")
    if problems:
        raise RecipeError(problems, hint="pelt inspect MODEL --depth 3 shows the model's layers")


def apply(
    recipe: Recipe,
    base: str | os.PathLike[str] | Base,
    out: str | os.PathLike[str],
    force: bool = False,
    tensors: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    """Insert a recipe's modules into a checkpoint and write a run directory (atomically).

    Args:
        recipe: the validated recipe.
        base: the base checkpoint (a path, or an opened :class:`Base`).
        out: the run directory to create.
        force: replace an existing ``out``.
        tensors: weights that replace the freshly initialised ones (same names and shapes), e.g. an imported adapter.
        extra: more ``run.json`` keys (provenance).

    Returns:
        The run directory.
    """
    from pelt_cli.surgery import freeze_base, inserted_state

    out = Path(out)
    guard_output(out, force, [base.root if isinstance(base, Base) else base])
    b = base if isinstance(base, Base) else Base.open(base)
    the_plan = plan(recipe, b)  # every recipe problem surfaces here, before weights load
    model = b.load()
    rows = insert_recipe(model, recipe)
    trainable, _ = freeze_base(model)
    if trainable != the_plan.new_params:
        raise PeltError(f"internal: plan counted {the_plan.new_params} new parameters, the model has {trainable}")
    state = inserted_state(model)
    for name, t in (tensors or {}).items():
        state[name] = t.to(state[name].dtype).contiguous()
    run = Run.create(b, recipe, rows, type(model).__name__, trainable, **extra)
    return run.write(out, state, force=force)


def run_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``pelt inspect RUN``: the inserted tensors (from the adapter's header), their sites and trainability."""
    run = Run.open(run_dir)
    header = read_header(run.path(ADAPTER_FILE))
    owner = {m: ins for ins in run.insertions for m in ins.modules}
    tensors = []
    for name, info in header.tensors.items():
        ins = next((owner[m] for m in owner if name.startswith(m + ".")), None)
        tensors.append(
            {
                "name": name,
                "method": ins.method if ins else None,
                "site": ins.disk_site if ins else None,
                "role": ins.role if ins else None,
                "dtype": info.dtype,
                "shape": list(info.shape),
                "params": info.numel,
                "trainable": True,
            }
        )
    meta = run.meta
    return {
        "run": str(run_dir),
        "base": asdict(meta.base),
        "recipe": run.recipe.name,
        "new_params": meta.new_params,
        "percent_of_base": round(100 * meta.new_params / max(meta.base.params, 1), 4),
        "insertions": [asdict(r) for r in run.insertions],
        "tensors": tensors,
    }
