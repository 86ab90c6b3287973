"""``pelt_cli.run``: a base and a run, each opened once; typed run.json; the methods' hooks as merge/prune see them."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_run

from pelt_cli import keymap, methods
from pelt_cli import recipe as rc
from pelt_cli.errors import CheckpointError, PeltError
from pelt_cli.io import checkpoint as io_checkpoint
from pelt_cli.peft_format import import_peft
from pelt_cli.run import RUN_FILE, Base, Run, RunMeta, load_base


def test_run_meta_round_trip_keeps_unknown_keys(tiny_dir: Path, tmp_path: Path) -> None:
    run_dir = make_run("lora", tiny_dir / "bert", tmp_path / "run")
    doc = json.loads((run_dir / RUN_FILE).read_text())
    doc["later_key"] = {"x": [1, 2]}
    meta = RunMeta.from_dict(doc, "x")
    assert meta.extra == {"later_key": {"x": [1, 2]}}
    assert meta.insertions[0].method == "lora" and meta.insertions[0].layer == 0
    assert meta.base.params == doc["base"]["params"] > 0
    assert meta.to_dict() == doc


def test_run_open_parses_the_recipe_once_and_refuses_bad_json(tiny_dir: Path, tmp_path: Path) -> None:
    run_dir = make_run("lora", tiny_dir / "bert", tmp_path / "run")
    run = Run.open(run_dir)
    assert run.recipe.to_dict() == rc.load("lora").to_dict()
    assert [r.key for r in run.insertions] == [(r.site, r.method) for r in run.skeleton()[1]]
    (run_dir / RUN_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="run.json is a JSON array, expected a JSON object"):
        Run.open(run_dir)
    (run_dir / RUN_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="newer than this pelt understands"):
        Run.open(run_dir)
    (run_dir / RUN_FILE).write_text(json.dumps({"format": 1, "base": {"path": "x"}}))
    with pytest.raises(CheckpointError, match="not a valid run.json"):
        Run.open(run_dir)


def test_base_is_checked_by_content(tiny_dir: Path, tmp_path: Path) -> None:
    run = Run.open(make_run("lora", tiny_dir / "bert", tmp_path / "run"))
    assert run.base().matches(run.meta.base)
    other = Base.open(tiny_dir / "roberta")
    assert not other.matches(run.meta.base, content=False)
    with pytest.raises(CheckpointError, match="not the base this run was made on"):
        run.base(tiny_dir / "roberta")


def test_import_peft_opens_the_base_once_and_builds_one_skeleton(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = peft.get_peft_model(load_base(tiny_dir / "llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    opened, built = [], []
    real_open, real_skeleton = io_checkpoint.open_checkpoint, keymap.skeleton

    def counting_open(path: object) -> object:
        opened.append(Path(path))
        return real_open(path)

    def counting_skeleton(*a: object, **k: object) -> object:
        built.append(a[0])
        return real_skeleton(*a, **k)

    monkeypatch.setattr("pelt_cli.run.open_checkpoint", counting_open)
    monkeypatch.setattr(keymap, "skeleton", counting_skeleton)
    import_peft(tmp_path / "peft", tiny_dir / "llama", tmp_path / "run")
    assert [p for p in opened if p == tiny_dir / "llama"] == [tiny_dir / "llama"]
    assert len(built) == 1


def test_registry_refuses_a_second_method_of_the_same_name() -> None:
    methods.names()

    class Other:
        name = "lora"

    with pytest.raises(PeltError, match="registered twice"):
        methods.register(Other)
    assert methods.get("lora").__class__.__name__ == "LoRAMethod"


def test_foldable_methods_come_from_the_registry() -> None:
    assert methods.foldable() == ["ia3", "lora", "unipelt"]
    lora = methods.get("lora")
    assert methods.hook(lora, "fold") is not None and methods.hook(methods.get("adapter"), "fold") is None


def test_fold_tensor_applies_input_scales_last() -> None:
    w = torch.ones(2, 3)
    ops = [methods.FoldOp(lambda t: t * torch.tensor([1.0, 2.0, 3.0]), late=True), methods.FoldOp(lambda t: t + 1.0)]
    assert torch.equal(methods.fold_tensor(w, ops), torch.tensor([[2.0, 4.0, 6.0], [2.0, 4.0, 6.0]]))


def test_gate_units_of_unipelt_and_domain(tiny_dir: Path, tmp_path: Path) -> None:
    run = Run.open(make_run("unipelt", tiny_dir / "bert", tmp_path / "uni"))
    units = run.gate_units()
    layers = {run.insertions[u.row].layer for u in units}
    assert layers == {0, 1} and len(units) == 6
    assert {u.module for u in units} == {"lora", "prefix", "adapter"}
    lora = next(u for u in units if u.module == "lora")
    assert [run.insertions[i].method for i in lora.members] == ["unipelt.lora", "unipelt.lora"]
    assert lora.stats == ("layers", run.insertions[lora.row].site, "lora")
    dom = Run.open(make_run("qwen2-audio-domain-adapter", tiny_dir / "qwen2_audio", tmp_path / "dom"))
    (unit,) = dom.gate_units()
    assert unit.module == "domain" and unit.stats == ("domain", "gate") and unit.members == (0,)
