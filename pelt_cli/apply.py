"""``pelt apply``: plan a recipe against a checkpoint, insert the modules, write a run directory; load runs back.

A run directory references its base (path + content fingerprint) instead of copying it:

* ``run.json``: format version, pelt version, base (path, fingerprints, family, class), the resolved recipe, and
  the insertions (site, role, method, parameter count);
* ``recipe.yaml``: the resolved recipe (every default filled in), for people;
* ``adapter.safetensors``: the inserted parameters only, named as in the live model (``…query.pelt_lora.A``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pelt_cli import __version__
from pelt_cli.checkpoint import Checkpoint, fingerprint, open_checkpoint, read_header, save_file, structure_fingerprint
from pelt_cli.errors import CheckpointError, OutputExistsError, PeltError, RecipeError
from pelt_cli.recipe import Recipe

RUN_FILE = "run.json"
ADAPTER_FILE = "adapter.safetensors"
RECIPE_FILE = "recipe.yaml"
RUN_FORMAT = 1


@dataclass
class PlanRow:
    """One insertion as the plan shows it."""

    entry: int
    method: str
    site: str
    disk_site: str
    role: str
    layer: int | None
    block: str
    new_params: int
    modules: list[str] = field(default_factory=list)


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
            "recipe": self.recipe.name, "base": self.base, "family": self.family, "model_class": self.model_class,
            "base_params": self.base_params, "new_params": self.new_params,
            "percent_of_base": round(100 * self.new_params / max(self.base_params, 1), 4),
            "insertions": [asdict(r) for r in self.rows],
        }


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
            rows.append(PlanRow(e.index, ins.method, ins.site, disk, ins.role, layer_of(disk),
                                block_of(disk, mv.family), _count(model, ins.modules), list(ins.modules)))
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
            tail = s.module[len(module):]
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


def plan(recipe: Recipe, base: str | os.PathLike[str]) -> Plan:
    """Validate a recipe against a checkpoint's header and config, on a ``meta`` skeleton (no weights loaded)."""
    from pelt_cli.keymap import skeleton
    from pelt_cli.sites import detect_family

    ckpt = open_checkpoint(base)
    _require_config(ckpt)
    model = skeleton(ckpt.directory)
    rows = insert_recipe(model, recipe)
    return Plan(recipe, str(ckpt.root), detect_family(ckpt), type(model).__name__, ckpt.total_params, rows)


def _require_config(ckpt: Checkpoint) -> None:
    if not ckpt.config:
        raise CheckpointError(f"{ckpt.directory}: no config.json beside the weights; pelt apply needs the model's "
                              "config to build it", hint="save the model with save_pretrained")


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings stay off stderr unless ``pelt -vv``."""
    import transformers

    if int(os.environ.get("PELT_VERBOSITY", "1")) < 3:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def load_base(directory: str | os.PathLike[str], device: str = "cpu") -> Any:
    """Load a base checkpoint with transformers, keeping its stored dtype."""
    import transformers

    from pelt_cli.keymap import model_class

    quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(str(directory))
    model = model_class(config, directory).from_pretrained(str(directory), dtype="auto")
    return model.to(device).eval()


def apply(recipe: Recipe, base: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> Path:
    """Insert a recipe's modules into a checkpoint and write a run directory (atomically).

    Returns:
        The run directory.
    """
    from pelt_cli.surgery import freeze_base, inserted_state

    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists", hint="choose another -o path or pass --force")
    the_plan = plan(recipe, base)  # every recipe problem surfaces here, before weights load
    ckpt = open_checkpoint(base)
    model = load_base(ckpt.directory)
    rows = insert_recipe(model, recipe)
    trainable, _ = freeze_base(model)
    if trainable != the_plan.new_params:
        raise PeltError(f"internal: plan counted {the_plan.new_params} new parameters, the model has {trainable}")
    meta = {
        "format": RUN_FORMAT, "pelt_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"path": str(Path(ckpt.root).resolve()), "fingerprint": fingerprint(ckpt),
                 "structure": structure_fingerprint(ckpt), "family": the_plan.family,
                 "model_class": type(model).__name__, "params": ckpt.total_params},
        "recipe": recipe.to_dict(),
        "new_params": trainable,
        "insertions": [asdict(r) for r in rows],
    }
    from pelt_cli.recipe import dump

    with atomic_dir(out, force) as tmp:
        save_file(inserted_state(model), tmp / ADAPTER_FILE, metadata={"pelt_run_format": str(RUN_FORMAT)})
        (tmp / RECIPE_FILE).write_text(f"# resolved from {recipe.source}\n" + dump(recipe), encoding="utf-8")
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


class atomic_dir:  # noqa: N801 - used as a context manager like open()
    """Fill a temporary sibling directory, rename it to ``out`` on success, remove it on failure."""

    def __init__(self, out: Path, force: bool = False) -> None:
        self.out, self.force = Path(out), force
        self.tmp = self.out.parent / f".{self.out.name}.pelt-tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        from pelt_cli.checkpoint import _commit_dir

        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _commit_dir(self.tmp, self.out, self.force)


def is_run(path: str | os.PathLike[str]) -> bool:
    """Whether a path is a pelt run directory."""
    return (Path(path) / RUN_FILE).is_file()


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``run.json`` of a run directory.

    Raises:
        CheckpointError: not a run directory, or an unreadable / newer-format run.
    """
    p = Path(run_dir) / RUN_FILE
    if not p.is_file():
        raise CheckpointError(f"{run_dir}: not a pelt run directory (no {RUN_FILE})",
                              hint="pelt apply RECIPE MODEL -o RUN creates one")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if meta.get("format", 0) > RUN_FORMAT:
        raise CheckpointError(f"{p}: run format {meta.get('format')} is newer than this pelt understands "
                              f"({RUN_FORMAT})", hint="upgrade pelt")
    return meta


def load_run(run_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None,
             check_fingerprint: bool = True) -> tuple[Any, dict[str, Any]]:
    """Rebuild a run: load its base, insert its recipe, load the inserted weights.

    Args:
        run_dir: the run directory.
        base: another location of the same base (default: the path recorded in the run).
        check_fingerprint: refuse a base whose content differs from the one the run was made on.

    Returns:
        ``(model, run_meta)`` with exactly the inserted parameters trainable.
    """
    from safetensors.torch import load_file

    from pelt_cli.recipe import loads
    from pelt_cli.surgery import freeze_base, inserted_state

    meta = read_run(run_dir)
    base_path = Path(base or meta["base"]["path"])
    ckpt = open_checkpoint(base_path)
    if check_fingerprint:
        if structure_fingerprint(ckpt) != meta["base"]["structure"] or fingerprint(ckpt) != meta["base"]["fingerprint"]:
            raise CheckpointError(f"{base_path}: not the base this run was made on (fingerprint differs from "
                                  f"{meta['base']['fingerprint']})", hint="pass the right base")
    import yaml

    recipe = loads(yaml.safe_dump(meta["recipe"], sort_keys=False), str(Path(run_dir) / RUN_FILE))
    model = load_base(ckpt.directory)
    insert_recipe(model, recipe)
    if meta.get("head"):
        from pelt_cli.heads import attach_head

        attach_head(model, meta["head"])
    state = load_file(str(Path(run_dir) / ADAPTER_FILE))
    expected = set(inserted_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise CheckpointError(f"{run_dir}/{ADAPTER_FILE}: does not match the recipe (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    model.load_state_dict(state, strict=False)
    freeze_base(model)
    return model, meta


def run_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``pelt inspect RUN``: the inserted tensors (from the adapter's header), their sites and trainability."""
    meta = read_run(run_dir)
    header = read_header(Path(run_dir) / ADAPTER_FILE)
    owner = {}
    for ins in meta["insertions"]:
        for m in ins["modules"]:
            owner[m] = ins
    tensors = []
    for name, info in header.tensors.items():
        ins = next((owner[m] for m in owner if name.startswith(m + ".")), None)
        tensors.append({"name": name, "method": ins["method"] if ins else None, "site": ins["disk_site"] if ins
                        else None, "role": ins["role"] if ins else None, "dtype": info.dtype,
                        "shape": list(info.shape), "params": info.numel, "trainable": True})
    return {"run": str(run_dir), "base": meta["base"], "recipe": meta["recipe"]["name"],
            "new_params": meta["new_params"],
            "percent_of_base": round(100 * meta["new_params"] / max(meta["base"]["params"], 1), 4),
            "insertions": meta["insertions"], "tensors": tensors}
