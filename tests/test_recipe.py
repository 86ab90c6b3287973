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


TRAIN_BAD = """name: t
inserts:
  - method: lora
train:
  lr: 1e-4
  shedule: cosine
  batch_size: two
  epochs: 0
  early_stop_on: los
  min_delta: -1
  device: cuda
"""


def test_train_section_every_problem_with_its_line() -> None:
    with pytest.raises(RecipeError) as e:
        rc.loads(TRAIN_BAD, "t.yaml")
    assert sorted(e.value.problems) == [
        "t.yaml:10:3: train.min_delta: -1.0 is too small: expected ≥ 0.0",
        "t.yaml:11:3: train.device: not a recipe setting: give it to pelt train (--device)",
        "t.yaml:6:3: train.shedule: unknown key (did you mean 'schedule'?)",
        "t.yaml:7:3: train.batch_size: expected an integer, got 'two'",
        "t.yaml:8:3: train.epochs: 0 is too small: expected ≥ 1",
        "t.yaml:9:3: train.early_stop_on: 'los' is not one of metric, loss (did you mean 'loss'?)",
    ]
    with pytest.raises(RecipeError, match=r"t\.yaml:3:1: train: expected a mapping"):
        rc.loads("inserts:\n  - method: lora\ntrain: 3\n", "t.yaml")


def test_train_section_round_trips() -> None:
    text = "inserts:\n  - method: lora\ntrain:\n  lr: 1e-4\n  warmup: 500\n  class_weights: auto\n"
    r = rc.loads(text, "t.yaml")
    assert r.train == {"lr": 1e-4, "warmup": 500.0, "class_weights": "auto"}  # 1e-4: YAML 1.1 reads a string
    assert rc.Recipe.from_dict(r.to_dict()).train == r.train
    assert rc.loads(rc.dump(r), "again.yaml").train == r.train
    assert "train" not in rc.load("lora").to_dict()  # a recipe without the section resolves as before
    r = rc.loads(text, "t.yaml", ["train.lr=0.01", "~train.class_weights"])
    assert r.train == {"lr": 0.01, "warmup": 500.0}


def test_bundled_recipes_carry_the_guides_training_settings() -> None:
    paper = rc.load("unipelt-paper")
    assert paper.train == {
        "lr": 1e-3,
        "warmup": 500.0,
        "schedule": "cosine",
        "gate_warmup": 500,
        "gate_sparsity": "entropy",
        "gate_lambda": 0.01,
        "early_stop_on": "loss",
        "patience": 3,
        "min_delta": 1e-3,
    }
    params = paper.inserts[0].params
    assert (params.gate_init, params.temperature, params.gate) == (0.1, 0.8, "sigmoid")
    domain = rc.load("qwen2-audio-domain-adapter")
    assert domain.train == {"lr": 1e-4, "scale_lr": 1e-3, "epochs": 3, "batch_size": 2, "grad_accum": 8}


def test_train_fields_are_the_train_config() -> None:
    """The train: section takes every TrainConfig field but the per-invocation ones, with TrainConfig's types, and
    its ranges accept TrainConfig's defaults."""
    import dataclasses
    import typing

    from pelt_cli.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(rc.TRAIN_FIELDS) == fields - set(rc.TRAIN_EXCLUDED)
    assert {k: tp for k, (tp, _) in rc.TRAIN_FIELDS.items()} == {k: hints[k] for k in rc.TRAIN_FIELDS}
    defaults = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k in rc.TRAIN_FIELDS}
    r = rc.loads(rc.dump(rc.Recipe("x", rc.load("lora").inserts, train=defaults)), "x.yaml")
    assert r.train == defaults and dataclasses.replace(TrainConfig(), **r.train).check() is None
