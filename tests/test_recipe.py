"""Recipes: every problem reported at once with file:line:column, overrides, one error line and nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import pelt_main

from pelt_cli import recipe as rc
from pelt_cli.errors import RecipeError

ASSETS = Path(__file__).parent / "assets" / "bad"

BAD = {
    "unknown-method.yaml": r"unknown-method.yaml:3:\d+: inserts\[0\]\.method: unknown method 'lroa' "
    r"\(did you mean 'lora'\?\)",
    "unknown-key.yaml": r"unknown-key.yaml:6:7: inserts\[0\]\.params\.rnak: unknown key \(did you mean 'rank'\?\)",
    "wrong-type.yaml": r"wrong-type.yaml:6:\d+: inserts\[0\]\.params\.rank: expected an integer, got 'eight'",
    "no-match.yaml": r"no-match.yaml:4:\d+: inserts\[0\]\.targets: glob '\*\*\.no_such_module' matches no module",
    "syntax.yaml": r"syntax.yaml:\d+:\d+: YAML syntax error",
    "rank-too-big.yaml": r"rank 512 is larger than the layer encoder\.layer\.0\.attention\.self\.query "
    r"\(in 384, out 384\)",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_recipe_one_report_exit_2_nothing_written(name: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = pelt_main("apply", str(ASSETS / name), "minilm", "-o", str(out))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert re.search(BAD[name], errors[0]), errors[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_all_problems_at_once() -> None:
    with pytest.raises(RecipeError) as e:
        rc.load(str(ASSETS / "many.yaml"))
    text = "\n".join(e.value.problems)
    for fragment in [
        "name: expected a string",
        "layers: layer range '9-2'",
        "rank: 0 is too small",
        "dropout: 2.0 is too large",
        "init: 'xavier' is not one of kaiming, gaussian",
        "blocks[0]: unknown block kind 'encodr' (did you mean 'encoder'?)",
    ]:
        assert fragment in text, (fragment, text)
    assert len(e.value.problems) == 6


def test_overrides() -> None:
    r = rc.load("lora", ["inserts.0.params.rank=4", "inserts[0].targets=[attn.k]", "~inserts.0.params.dropout"])
    assert r.inserts[0].params.rank == 4 and r.inserts[0].targets == ("attn.k",)
    assert r.inserts[0].params.dropout == 0.0  # deleted → default
    with pytest.raises(RecipeError, match="inserts\\[3\\].params.rank does not exist"):
        rc.load("lora", ["inserts.3.params.rank=4"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE or ~KEY"):
        rc.load("lora", ["rank"])
