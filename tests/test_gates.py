"""pelt_cli/gates.py and ``pelt gates``: gate entropy per layer, the per-epoch history, the guide's remedy hints;
the prefix activation measured while evaluating."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import pelt_main

from pelt_cli import gates as gatestats
from pelt_cli.methods.prefix import prefix_share

LN3 = math.log(3)


def _hand_entropy(means: list[float]) -> float:
    p = [m / sum(means) for m in means]
    return -sum(q * math.log(q) for q in p if q > 0)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _write(run: Path, doc: dict) -> None:
    (run / "gates.json").write_text(json.dumps(doc))


def test_entropy_bounds() -> None:
    assert gatestats.entropy([0.2, 0.2, 0.2]) == pytest.approx(LN3, abs=1e-12)  # even: ln k
    assert gatestats.entropy([0.9, 0.0, 0.0]) == 0.0  # one module takes all
    assert gatestats.entropy([0.5, 0.25, 0.25]) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    assert math.isnan(gatestats.entropy([0.0, 0.0]))


def test_gates_shows_entropy_matching_the_means(trained_unipelt: Path) -> None:
    r = pelt_main("gates", str(trained_unipelt), "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc["entropy"]) == set(doc["layers"]) and len(doc["layers"]) == 2
    for site, mods in doc["layers"].items():
        h = doc["entropy"][site]
        assert 0 <= h <= LN3 and abs(h - _hand_entropy([s["mean"] for s in mods.values()])) < 1e-12
    low = {  # by hand: the modules whose mean stayed below 0.05 in every epoch somewhere
        m
        for site, mods in doc["layers"].items()
        for m in mods
        if all(h[site][m] < 0.05 for h in doc["history"].values())
    }
    assert sorted(h.split(":")[0] for h in doc["hints"]) == sorted(low)
    r = pelt_main("gates", str(trained_unipelt), "--format", "tsv")
    lines = [ln.split("\t") for ln in r.stdout.splitlines()]
    assert lines[0][-1] == "entropy" and len(lines) == 1 + 2 * 3
    assert {float(ln[-1]) for ln in lines[1:]} == {float(f"{h:.4f}") for h in doc["entropy"].values()}
    assert r.stderr.count("hint:") == len(low)


def test_gates_table_shows_the_history_of_the_means(trained_unipelt: Path, tmp_path: Path) -> None:
    run = _copy(trained_unipelt, tmp_path)
    doc = json.loads((run / "gates.json").read_text())
    (site, mods), *_ = doc["layers"].items()
    doc["history"]["2"] = {s: {m: 0.25 for m in ms} for s, ms in doc["layers"].items()}
    _write(run, doc)
    epochs, rows = gatestats.history_rows(doc)
    assert epochs == ["1", "2"]
    row = next(r for r in rows if r["site"] == site and r["module"] == "lora")
    assert row["1"] == doc["history"]["1"][site]["lora"] and row["2"] == 0.25
    ent = next(r for r in rows if r["site"] == site and r["module"] == "entropy")
    assert ent["2"] == pytest.approx(LN3, abs=1e-12)  # even means in epoch 2
    r = pelt_main("gates", str(run), "--format", "table", env={"COLUMNS": "160"})
    assert r.returncode == 0 and "mean gate per epoch" in r.stdout and "epoch 2" in r.stdout
    assert "0.2500" in r.stdout and "entropy" in r.stdout


def _suppress(doc: dict, module: str, epochs: dict[str, float]) -> dict:
    """``module``'s mean gate at every site: the current mean and, per epoch, the given history mean."""
    for mods in doc["layers"].values():
        mods[module]["mean"] = 0.01
    doc["history"] = {
        e: {s: {**{m: 0.4 for m in ms}, module: v} for s, ms in doc["layers"].items()} for e, v in epochs.items()
    }
    return doc


def test_hint_for_a_module_always_suppressed(trained_unipelt: Path, tmp_path: Path) -> None:
    run = _copy(trained_unipelt, tmp_path)
    doc = json.loads((run / "gates.json").read_text())
    _write(run, _suppress(doc, "prefix", {"1": 0.02, "2": 0.01, "3": 0.04}))
    r = pelt_main("gates", str(run), "--format", "table", env={"COLUMNS": "200"})
    assert r.returncode == 0
    (hint,) = [ln for ln in r.stdout.splitlines() if ln.startswith("hint:")]
    assert hint.startswith("hint: prefix: mean gate < 0.05 in every epoch at 2 site(s) (layer 0, 1)")
    assert "check its placement, the learning rate and the sparsity λ" in hint
    r = pelt_main("gates", str(run), "--format", "tsv")
    assert r.stderr.count("hint: prefix") == 1 and "hint" not in r.stdout
    assert json.loads(pelt_main("gates", str(run), "--format", "json").stdout)["hints"] == [hint[len("hint: ") :]]
    # once above 0.05 in one epoch, it was not always suppressed: no hint
    _write(run, _suppress(doc, "prefix", {"1": 0.02, "2": 0.06, "3": 0.04}))
    r = pelt_main("gates", str(run), "--format", "table", env={"COLUMNS": "200"})
    assert r.returncode == 0 and "hint:" not in r.stdout


def _domain_doc(mean: float) -> dict:
    gate = {"mean": mean, "std": 0.1, "min": 0.0, "max": 1.0, "count": 400}
    healthy = 0.3 <= mean <= 0.7
    return {"layers": {}, "domain": {"gate": gate, "scale": 0.1, "healthy": healthy}, "epoch": 1}


@pytest.mark.parametrize(
    ("mean", "expect"),
    [
        (0.12, "below the healthy band 0.3–0.7: raise the adapter's scale to 0.5 if the loss does not move"),
        (0.85, "above the healthy band 0.3–0.7: lower the adapter's scale to 0.05 if the source domain degrades"),
        (0.3, None),
        (0.55, None),
        (0.7, None),
    ],
)
def test_hint_for_a_domain_gate_outside_the_band(tmp_path: Path, mean: float, expect: str | None) -> None:
    _write(tmp_path, _domain_doc(mean))
    r = pelt_main("gates", str(tmp_path), "--format", "table", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    hints = [ln for ln in r.stdout.splitlines() if ln.startswith("hint:")]
    if expect is None:
        assert hints == []
    else:
        assert hints == [f"hint: domain gate mean {mean:.3f} is {expect}"]


def test_prefix_share_is_the_attention_on_the_prefix() -> None:
    """The share each query puts on the first ℓ keys: a hand softmax; 1 with every other key masked, 0 with the
    prefix masked, GQA keys repeated to the query heads."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)  # 4 query heads, 2 kv heads
    share = prefix_share(q, k, None, 3, 8**-0.5)
    kk = k.repeat_interleave(2, dim=1)
    want = (q @ kk.transpose(-1, -2) * 8**-0.5).softmax(-1)[..., :3].sum(-1)
    assert share.shape == (2, 4, 5) and torch.allclose(share, want, atol=1e-6)
    assert ((share > 0) & (share < 1)).all()
    only_prefix = torch.zeros(1, 1, 5, 7, dtype=torch.bool)
    only_prefix[..., :3] = True
    assert torch.allclose(prefix_share(q, k, only_prefix, 3, 1.0), torch.ones(2, 4, 5))
    additive = torch.zeros(1, 1, 5, 7)
    additive[..., :3] = -torch.inf
    assert prefix_share(q, k, additive, 3, 1.0).abs().max() == 0


def test_gates_shows_the_recorded_contribution(trained_unipelt: Path, tmp_path: Path) -> None:
    run = _copy(trained_unipelt, tmp_path)
    doc = json.loads((run / "gates.json").read_text())
    con = doc["contribution"]
    site = next(iter(con["layers"]))
    con["layers"][site]["prefix"]["off"] = True  # as if --auto-prune had switched it off
    con["off"] = [f"{site}/prefix"]
    _write(run, doc)
    r = pelt_main("gates", str(run), "--format", "tsv")
    assert r.returncode == 0, r.stderr
    lines = [ln.split("\t") for ln in r.stdout.splitlines()]
    head = lines[0]
    assert head == ["site", "layer", "module", "mean", "std", "min", "max", "contribution", "off", "entropy"]
    assert len(lines) == 1 + 6
    for ln in lines[1:]:  # per unit: its relative contribution as recorded, and whether it was left off
        c = con["layers"][ln[0]][ln[2]]
        assert ln[7] == f"{c['relative']:.4f}" and ln[8] == ("off" if (ln[0], ln[2]) == (site, "prefix") else "-")
    assert sorted(float(ln[7]) for ln in lines[1:])[-1] == 1.0  # the strongest unit
    rows = [json.loads(x) for x in pelt_main("gates", str(run), "--format", "jsonl").stdout.splitlines()]
    assert [(x["contribution"], x["off"]) for x in rows] == [
        (con["layers"][x["site"]][x["module"]]["relative"], x["site"] == site and x["module"] == "prefix") for x in rows
    ]
    r = pelt_main("gates", str(run), "--format", "table", env={"COLUMNS": "250"})
    assert r.returncode == 0 and "contribution" in r.stdout and f"{con['window']}-step window" in r.stdout
    del doc["contribution"]  # a run trained before pelt measured it: no such columns
    _write(run, doc)
    r = pelt_main("gates", str(run), "--format", "tsv")
    assert r.stdout.splitlines()[0].split("\t")[-3:] == ["min", "max", "entropy"]
    # a domain adapter's gate: its contribution on its row
    dom = {**_domain_doc(0.5), "contribution": {"window": 4, "domain": {"gate": {"relative": 1.0, "off": False}}}}
    assert [(x["contribution"], x["off"]) for x in gatestats.rows(dom)] == [(1.0, False)]
