"""Bundled recipes: the YAML files in the repository's ``recipes/``, shipped as package data ``pelt_cli.recipes``."""

from __future__ import annotations

import difflib
from pathlib import Path

from .errors import RecipeError


def recipes_dir() -> Path:
    """Where the bundled recipes are: the source tree's ``recipes/`` or the installed package data."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "recipes", here / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    from importlib.resources import files

    return Path(str(files("pelt_cli.recipes")))


def bundled() -> dict[str, Path]:
    """Bundled recipe name (file stem) → path."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def find_recipe(name: str) -> Path:
    """A recipe path: an existing file, else a bundled recipe by name (with or without ``.yaml``).

    Raises:
        RecipeError: neither a file nor a bundled name; lists the closest bundled names.
    """
    p = Path(name)
    if p.is_file():
        return p
    table = bundled()
    stem = p.name.removesuffix(".yaml").removesuffix(".yml")
    if stem in table and not p.parent.parts:
        return table[stem]
    close = difflib.get_close_matches(stem, table, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise RecipeError(
        [f"recipe {name!r}: no such file and no bundled recipe of that name{hint}"],
        hint="pelt recipes ls lists the bundled recipes",
    )


def description(path: Path) -> str:
    """The first comment line after the run-command line, or the ``description`` key, for listings."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return "(invalid YAML)"
    return str(doc.get("description", "")) if isinstance(doc, dict) else ""
