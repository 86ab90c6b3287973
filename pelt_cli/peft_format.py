"""PEFT adapters out of and into pelt runs: ``pelt export --peft`` and ``pelt import-peft``.

A run whose modules all come from one method with a PEFT form (``peft_type``: LoRA, IA³) becomes
``adapter_config.json`` + ``adapter_model.safetensors`` with the key names HF peft expects for the base's
architecture, so ``peft.PeftModel.from_pretrained(base, DIR)`` gives pelt's outputs; a PEFT adapter of such a type
becomes a pelt run on its base. The tensors and the method's part of the config come from the method's
``to_peft`` / ``from_peft`` hooks; the rest is here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pelt_cli import methods
from pelt_cli.errors import CheckpointError, ExportRefused
from pelt_cli.io.atomic import atomic_dir, prepare_out
from pelt_cli.io.reader import load_file
from pelt_cli.io.writer import save_file
from pelt_cli.run import Base, Run

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _peft_method(run: Run) -> Any:
    """The one method with a PEFT form that made every row of the run.

    Raises:
        ExportRefused: other modules, a task head, two methods, or two modules on one layer.
    """
    bad = [f"{r.method} at {r.disk_site}" for r in run.insertions
           if methods.hook(methods.of_row(r.method), "to_peft") is None]
    if run.has_head_weights():
        bad.append("the task head pelt_head")
    if bad:
        raise ExportRefused(f"a PEFT adapter holds LoRA or IA³ only; this run also has {len(bad)} other module(s): "
                            f"{', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}",
                            hint="pelt export without --peft writes a bundle that keeps every module")
    kinds = sorted({r.method for r in run.insertions})
    if len(kinds) != 1:
        raise ExportRefused(f"this run mixes {' and '.join(kinds) or 'nothing'}; one PEFT adapter is either LoRA or "
                            "IA³", hint="export a bundle instead, or split the recipe into two runs")
    sites = [r.site for r in run.insertions]
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ExportRefused(f"{dup[0]} carries two {kinds[0]} modules; PEFT allows one per layer and adapter")
    return methods.get(kinds[0])


def peft_adapter(run_dir: str | os.PathLike[str] | Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run as PEFT adapter tensors (``base_model.model.<module>.…``, no adapter name) and config content.

    Raises:
        ExportRefused: the run holds modules without a PEFT form, mixes methods, or has two modules on one layer.
    """
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    method = _peft_method(run)
    model, _ = run.skeleton(head=False)
    tensors, part = method.to_peft(model, run.insertions, run.read_adapter(model))
    config: dict[str, Any] = {
        "peft_type": method.peft_type, "task_type": None, "inference_mode": True,
        "base_model_name_or_path": run.meta.base.path, "revision": None,
        "target_modules": [r.site for r in run.insertions], "exclude_modules": None, "modules_to_save": None,
        **part,
    }
    return {PEFT_PREFIX + n: t for n, t in tensors.items()}, config


def write_peft(d: Path, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """The two PEFT files into a directory."""
    save_file(tensors, d / PEFT_WEIGHTS, metadata={"format": "pt"})
    (d / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export_peft(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a run as a PEFT adapter directory (see :func:`peft_adapter`)."""
    out = Path(out)
    tensors, config = peft_adapter(run_dir)
    prepare_out(out, force)
    with atomic_dir(out, force) as tmp:
        write_peft(tmp, tensors, config)
    return out


def read_peft(pdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``adapter_config.json`` and the adapter's tensors, keys without the ``base_model.model.`` prefix.

    Raises:
        CheckpointError: no readable config; ExportRefused: keys without the prefix (not a PEFT adapter).
    """
    try:
        cfg = json.loads((pdir / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pdir}: no readable {PEFT_CONFIG} ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{pdir / PEFT_CONFIG}: expected a JSON object, got {type(cfg).__name__}")
    raw = load_file(pdir / PEFT_WEIGHTS)
    if any(not n.startswith(PEFT_PREFIX) for n in raw):
        raise ExportRefused(f"{pdir / PEFT_WEIGHTS}: keys without the {PEFT_PREFIX!r} prefix; not a PEFT adapter")
    return cfg, {n.removeprefix(PEFT_PREFIX): t for n, t in raw.items()}


def import_peft(peft_dir: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                force: bool = False) -> Path:
    """Bring a PEFT adapter (of a type a pelt method has the form of) into a pelt run directory on ``model``.

    The recipe names the adapter's modules exactly (from the method's ``from_peft``), is applied to the base like
    ``pelt apply``, and the adapter's weights replace the fresh ones.

    Raises:
        ExportRefused: an adapter type or option pelt's methods cannot express (DoRA, biases, modules_to_save, an
            IA³ vector on a side pelt's ia3 does not scale there, …).
    """
    from pelt_cli.apply import apply
    from pelt_cli.recipe import Recipe

    pdir, out = Path(peft_dir), Path(out)
    cfg, state = read_peft(pdir)
    ptype = cfg.get("peft_type")
    by_type = {getattr(methods.get(n), "peft_type", None): n for n in methods.names()}
    if ptype not in by_type or ptype is None:
        known = ", ".join(sorted(str(t) for t in by_type if t))
        raise ExportRefused(f"{pdir}: peft_type {ptype!r}; pelt imports {known} adapters")
    entries, fit = methods.get(by_type[ptype]).from_peft(cfg, state)
    recipe = Recipe.from_dict({"name": f"peft-{pdir.name}", "description": f"imported from {pdir}",
                               "inserts": entries}, str(pdir / PEFT_CONFIG))
    base = Base.open(model)
    skel, _ = Run.create(base, recipe, [], "", 0).skeleton(base)
    values = fit(skel)
    shapes = {n: tuple(t.shape) for n, t in values.items()}
    from pelt_cli.run import expected_state

    want = expected_state(skel)
    wrong = [n for n, s in shapes.items() if want.get(n) != s]
    if wrong:
        raise ExportRefused(f"{wrong[0]}: shape {shapes[wrong[0]]} does not fit the layer on this base")
    prepare_out(out, force)
    provenance = {"peft_dir": str(pdir.resolve()), "peft_type": ptype,
                  "base_model_name_or_path": cfg.get("base_model_name_or_path")}
    return apply(recipe, base, out, force=force, tensors=values, imported_from=provenance)
