"""Bundled recipes: pelt recipes ls/cat/cp, each opens with its command and applies to the families it lists."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from conftest import pelt_main
from tiny_models import main_output, sample_inputs

from pelt_cli import recipe as rc
from pelt_cli.insert import insert_recipe


def test_recipes_ls_cat_cp(tmp_path: Path) -> None:
    r = pelt_main("recipes", "ls")
    names = [ln.split("\t")[0] for ln in r.stdout.splitlines()]
    assert {"lora", "lora-gpt2", "lora-all-linear"} <= set(names)
    cat = pelt_main("recipes", "cat", "lora").stdout
    assert cat.startswith("# pelt apply lora ")
    r = pelt_main("recipes", "cp", "lora", str(tmp_path))
    assert r.returncode == 0 and (tmp_path / "lora.yaml").read_text() == cat
    assert pelt_main("recipes", "cp", "lora", str(tmp_path)).returncode == 2
    r = pelt_main("recipes", "cat", "lroa")
    assert r.returncode == 2 and "did you mean 'lora'" in r.stderr


def test_every_bundled_recipe_opens_with_its_command() -> None:
    from pelt_cli.bundled import bundled

    for name, path in bundled().items():
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# pelt apply {name} "), (name, first)


def test_every_bundled_recipe_applies_to_its_families(tiny_models_built: dict) -> None:
    from pelt_cli.bundled import bundled

    for name, path in bundled().items():
        recipe = rc.load(path)
        assert recipe.families, f"{name}: no families listed"
        for fam in recipe.families:
            if fam not in tiny_models_built:
                continue
            base = tiny_models_built[fam].eval()
            model = copy.deepcopy(base)
            rows = insert_recipe(model, recipe)
            assert rows, (name, fam)
            with torch.no_grad():
                x = sample_inputs(fam)
                assert main_output(model(**x)).shape == main_output(base(**x)).shape, (name, fam)
