"""``pelt prune``: decisions from the gate statistics, outputs change only through the pruned modules, restore is
exact, refusals, and the whole shell pipeline apply | train | prune | merge."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import hash_tree, pelt_main, pelt_pipeline, set_gate_means

from pelt_cli import recipe as rc
from pelt_cli import surgery
from pelt_cli.apply import apply
from pelt_cli.errors import PruneRefused
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.prune import PRUNED_FILE, prune_run, restore_run
from pelt_cli.run import ADAPTER_FILE, load_run


def _outputs(run: Path, tiny_bert: Path, zero: list[str] = ()) -> torch.Tensor:
    model, _ = load_run(run)
    model = surgery.run_root(model)  # inside the task model: the run's own module paths, hidden states out
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(z) for z in zero):
                p.zero_()
        model.eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 2000, (3, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_dry_run_lists_every_gated_module_and_writes_nothing(trained_unipelt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    set_gate_means(run, {(0, "prefix"): 0.01, (1, "adapter"): 0.04})
    before = hash_tree(run)
    r = pelt_main("prune", str(run), "--dry-run", "--format", "tsv")
    assert r.returncode == 0, r.stderr
    lines = [ln.split("\t") for ln in r.stdout.splitlines()]
    assert lines[0] == ["site", "layer", "module", "mean", "params", "decision"] and len(lines) == 7
    decided = {(ln[1], ln[2]): ln[5] for ln in lines[1:]}
    assert decided == {
        ("0", "lora"): "keep",
        ("0", "prefix"): "prune",
        ("0", "adapter"): "keep",
        ("1", "lora"): "keep",
        ("1", "prefix"): "keep",
        ("1", "adapter"): "prune",
    }
    rep = prune_run(run, dry_run=True)
    assert rep.pruned_params == 2 * 10 * 32 + (32 * 2 + 2 + 2 * 32 + 32)  # prefix K,V (ℓ=10, d=32) + adapter d/16=2
    assert hash_tree(run) == before


def test_pruning_changes_outputs_only_through_the_pruned_modules(
    trained_unipelt: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    set_gate_means(run, {(0, "lora"): 0.01, (1, "adapter"): 0.02})
    before_tree = hash_tree(run)
    rep = prune_run(run, tmp_path / "pruned")
    assert hash_tree(run) == before_tree  # -o: the input run is untouched
    pruned = tmp_path / "pruned"
    assert [(u.layer, u.module) for u in rep.units if u.decision == "prune"] == [(0, "lora"), (1, "adapter")]
    # the same model with those two modules zeroed (LoRA B, adapter up-projection) is the pruned model
    zero = [
        "encoder.layer.0.attention.self.query.pelt_lora.B",
        "encoder.layer.0.attention.self.value.pelt_lora.B",
        "encoder.layer.1.output.dense.pelt_adapter.up",
    ]
    want = _outputs(run, tiny_bert, zero)
    got = _outputs(pruned, tiny_bert)
    assert (want - got).abs().max().item() <= 1e-6
    assert (_outputs(run, tiny_bert) - got).abs().max().item() > 1e-4  # and pruning did change the output
    moved = set(open_checkpoint(pruned / PRUNED_FILE).tensors)
    assert moved == {
        "encoder.layer.0.attention.self.query.pelt_lora.A",
        "encoder.layer.0.attention.self.query.pelt_lora.B",
        "encoder.layer.0.attention.self.value.pelt_lora.A",
        "encoder.layer.0.attention.self.value.pelt_lora.B",
        "encoder.layer.1.output.dense.pelt_adapter.down.weight",
        "encoder.layer.1.output.dense.pelt_adapter.down.bias",
        "encoder.layer.1.output.dense.pelt_adapter.up.weight",
        "encoder.layer.1.output.dense.pelt_adapter.up.bias",
    }
    meta = json.loads((pruned / "run.json").read_text())
    assert meta["new_params"] == rep.params_after == rep.params_before - 2 * 2 * 8 * 32 - (32 * 2 + 2 + 2 * 32 + 32)
    assert not (pruned / "train").exists()  # optimizer state of removed parameters is dropped
    model = surgery.run_root(load_run(pruned)[0])
    assert not hasattr(model.encoder.layer[0].attention.self.query, "pelt_lora")
    assert hasattr(model.encoder.layer[0].attention.self.query, "pelt_gate")  # the gate still feeds prefix/adapter

    back = restore_run(pruned, tmp_path / "restored")
    assert back.params_after == rep.params_before
    assert torch.equal(_outputs(tmp_path / "restored", tiny_bert), _outputs(run, tiny_bert))
    r0, r1 = (json.loads((p / "run.json").read_text()) for p in (run, tmp_path / "restored"))
    assert r0["recipe"] == r1["recipe"] and r0["insertions"] == r1["insertions"]


def test_keep_top_k_per_method_and_per_layer(trained_unipelt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    set_gate_means(
        run,
        {
            (0, "lora"): 0.9,
            (1, "lora"): 0.8,
            (0, "prefix"): 0.1,
            (1, "prefix"): 0.7,
            (0, "adapter"): 0.2,
            (1, "adapter"): 0.3,
        },
    )
    per_method = prune_run(run, keep_top_k=1, per="method", dry_run=True)
    assert sorted((u.layer, u.module) for u in per_method.units if u.decision == "keep") == [
        (0, "lora"),
        (1, "adapter"),
        (1, "prefix"),
    ]
    per_layer = prune_run(run, keep_top_k=1, per="layer", dry_run=True)
    assert sorted((u.layer, u.module) for u in per_layer.units if u.decision == "keep") == [(0, "lora"), (1, "lora")]
    overall = prune_run(run, keep_top_k=2, dry_run=True)
    assert sorted((u.layer, u.module) for u in overall.units if u.decision == "keep") == [(0, "lora"), (1, "lora")]
    # in place, twice: the second prune sees the first one's decisions as "pruned" and the run still loads
    prune_run(run, keep_top_k=1, per="layer")
    again = prune_run(run, threshold=0.85)
    assert [(u.layer, u.module) for u in again.units if u.decision == "prune"] == [(1, "lora")]
    assert sum(u.decision == "pruned" for u in again.units) == 4
    load_run(run)
    assert len(open_checkpoint(run / PRUNED_FILE).tensors) > len(open_checkpoint(run / ADAPTER_FILE).tensors) - 4


def test_refusals(tiny_bert: Path, trained_unipelt: Path, tmp_path: Path) -> None:
    lora = apply(rc.load("lora"), tiny_bert, tmp_path / "lora")
    r = pelt_main("prune", str(lora))
    assert r.returncode == 2 and "nothing gated to prune" in r.stderr and "Traceback" not in r.stderr
    fresh = apply(rc.load("unipelt"), tiny_bert, tmp_path / "fresh")
    r = pelt_main("prune", str(fresh))
    assert r.returncode == 2 and "no gate statistics" in r.stderr and "pelt train" in r.stderr
    for args, needle in [
        (["--threshold", "2"], "--threshold 2.0"),
        (["-t", "0.1", "-k", "2"], "exclude"),
        (["--per", "layer"], "--per applies to --keep-top-k"),
        (["--restore"], "never pruned"),
    ]:
        r = pelt_main("prune", str(trained_unipelt), *args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
    with pytest.raises(PruneRefused, match="prunes every module"):
        prune_run(trained_unipelt, tmp_path / "x", threshold=1.0)
    assert not (tmp_path / "x").exists()


def test_pipeline_apply_train_prune_merge(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    r = pelt_pipeline(
        f"apply unipelt {tiny_bert} -o {tmp_path / 'run'}",
        f"train - --data {sentiment[0]} --eval {sentiment[1]} --epochs 1 -q",
        "prune - --keep-top-k 1 --per method",
        f"merge - -o {tmp_path / 'merged'} --freeze-gates mean --keep-unmerged --verify",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "merged")
    assert "pruned 3 of 6 gated modules" in r.stderr
    delta = float(r.stderr.split("max |Δ| = ")[1].split()[0])
    assert delta < 1.0  # gates frozen at their means: approximate, and the error is reported
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "pelt-rest").is_dir()


def test_dry_run_by_contribution_shows_the_relative_contribution(trained_unipelt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    doc = json.loads((run / "gates.json").read_text())
    rel = {(int(s.split(".")[2]), m): v["relative"] for s, mods in doc["contribution"]["layers"].items()
           for m, v in mods.items()}  # fmt: skip
    assert len(rel) == 6 and max(rel.values()) == 1.0
    r = pelt_main("prune", str(run), "--by", "contribution", "--dry-run", "--format", "tsv")
    assert r.returncode == 0, r.stderr
    lines = [ln.split("\t") for ln in r.stdout.splitlines()]
    assert lines[0] == ["site", "layer", "module", "relative", "params", "decision"] and len(lines) == 7
    for ln in lines[1:]:  # the score the rule ranks by, as recorded; the decision follows it (θ = 0.05)
        want = rel[(int(ln[1]), ln[2])]
        assert ln[3] == f"{want:.4f}" and ln[5] == ("prune" if want < 0.05 else "keep")
    r = pelt_main("prune", str(run), "--by", "contribution", "--dry-run", "--format", "table", env={"COLUMNS": "200"})
    head = next(ln for ln in r.stdout.splitlines() if "module" in ln)
    assert "relative" in head and " mean " not in head and "by=contribution" in r.stdout
    r = pelt_main("prune", str(run), "--dry-run", "--format", "tsv")  # by gate: the mean gate, as before
    assert r.stdout.splitlines()[0].split("\t")[3] == "mean"
