"""AutoPELT: contribution = mean gate × gradient norm per gated unit, recorded in gates.json; ``pelt prune --by
contribution``; ``pelt train --auto-prune θ --window N`` switching units off and back on; bad values refused."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, pelt_main

from pelt_cli import autopelt, surgery
from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.errors import UsageError
from pelt_cli.methods.unipelt import gate_controllers
from pelt_cli.prune import PRUNED_FILE, prune_units, restore_run
from pelt_cli.run import Run, load_run
from pelt_cli.train import TrainConfig, train_run

PART = {"lora": "pelt_lora", "prefix": "pelt_prefix", "adapter": "pelt_adapter"}


@pytest.fixture(scope="module")
def small(sentiment: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The first 64 training and 16 eval rows of the sentiment data: quick runs."""
    d = tmp_path_factory.mktemp("small")
    out = []
    for src, n in zip(sentiment, (64, 16), strict=True):
        dst = d / src.name
        dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
        out.append(str(dst))
    return out[0], out[1]


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    return surgery.run_root(model)(**_batch(seed)).last_hidden_state


def _fresh(tiny_bert: Path, out: Path, gate: str = "sigmoid") -> Path:
    run = apply(rc.load("unipelt", [f"inserts.0.params.gate={gate}"]), tiny_bert, out)
    from conftest import randomise

    randomise(run, others=0.05)  # LoRA B, the prefix and the adapter all non-zero: every branch changes the output
    return run


def _by_hand(model: torch.nn.Module) -> dict[str, float]:
    """ḡ · ‖∇θ‖ per unit from the model's last forward and its gradients, found by name (not by the tracker)."""
    out = {}
    named = dict(surgery.run_root(model).named_parameters())
    for site, ctl in gate_controllers(surgery.run_root(model)).items():
        layer = site.split(".attention.")[0] + "."
        for j, module in enumerate(ctl.names):
            grads = [p.grad for n, p in named.items() if n.startswith(layer) and f".{PART[module]}." in n]
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))
            out[f"{site}/{module}"] = float(ctl.current[:, j].detach().double().mean()) * norm
    return out


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_contribution_is_mean_gate_times_grad_norm(tiny_bert: Path, tmp_path: Path, gate: str) -> None:
    run = _fresh(tiny_bert, tmp_path / "run", gate)
    model = Run.open(run).load_model().train()
    tracker = autopelt.Tracker(Run.open(run), model, window=2, theta=None)
    assert len(tracker.units) == 6  # 2 layers × lora, prefix, adapter
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    steps = []
    for step in range(3):
        loss = _hidden(model, step).pow(2).mean()
        tracker.observe()
        loss.backward()
        steps.append(_by_hand(model))
        tracker.measure()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert steps[0] != steps[2]  # the weights moved: the window really averages different steps
    w = tracker.windowed()
    for name, got in w.items():
        want = (steps[1][name] + steps[2][name]) / 2  # the window holds the last 2 steps
        assert abs(got["value"] - want) < 1e-6, (name, got["value"], want)
        assert got["value"] > 0 and got["steps"] == 2


def test_switched_off_units_add_nothing_train_nothing_and_come_back(tiny_bert: Path, tmp_path: Path) -> None:
    run = _fresh(tiny_bert, tmp_path / "run")
    model = Run.open(run).load_model().train()
    model.eval()
    with torch.no_grad():
        full = _hidden(model)
    tracker = autopelt.Tracker(Run.open(run), model, window=1, theta=0.0)
    off = [u for u in tracker.units if u.label.endswith(("/prefix", "/adapter")) and ".layer.0." in u.label]
    off += [u for u in tracker.units if u.label.endswith("/lora") and ".layer.1." in u.label]
    tracker.set_off({u.label for u in off})
    assert sorted(tracker.off) == sorted(u.label for u in off) and len(off) == 3
    with torch.no_grad():
        switched = _hidden(model)
    # the same model built without those modules (the recipe pelt prune writes) gives exactly these outputs
    pruned_run = tmp_path / "pruned"
    subprocess.run(["cp", "-r", str(run), str(pruned_run)], check=True)
    (pruned_run / "gates.json").write_text(json.dumps({"layers": {}}))
    prune_units(pruned_run, lambda stats: autopelt.label(stats) in tracker.off, {"test": True})
    without, _ = load_run(pruned_run)
    with torch.no_grad():
        assert torch.equal(_hidden(without.eval()), switched)
    assert (switched - full).abs().max() > 1e-4  # and they did change the output
    # the state dict stays whole (a checkpoint of a run with a parked prefix has every tensor)
    assert set(surgery.inserted_state(model)) == set(Run.open(run).read_adapter())
    # a training step leaves the switched-off units' parameters as they were, and does not measure them
    model.train()
    before = {id(p): p.detach().clone() for u in off for p in u.params}
    opt = torch.optim.AdamW([p for u in off for p in u.params], lr=0.1)  # (the live ones stay put for the end)
    loss = _hidden(model).pow(2).mean()
    tracker.observe()
    loss.backward()
    tracker.measure()
    opt.step()
    assert all(torch.equal(before[id(p)], p) for u in off for p in u.params)
    w = tracker.windowed()
    assert all(math.isnan(w[u.label]["value"]) and w[u.label]["steps"] == 0 for u in off)
    assert all(w[u.label]["value"] > 0 for u in tracker.units if not u.off)
    # θ = 0: every off unit's probed contribution (≥ 0) is back above it, so all three come back on, as they were
    st: dict = {"step": 1, "history": []}
    events: list = []
    tracker.after_step(st, 1, lambda: _hidden(model).pow(2).mean(), events.append)
    row = st["history"][-1]
    assert row["kind"] == "autoprune" and sorted(row["reactivated"]) == sorted(u.label for u in off)
    assert row["pruned"] == [] and row["off"] == [] and events == [row]
    assert all(p.grad is None for p in model.parameters())  # the probe's gradients are gone
    with torch.no_grad():
        assert torch.equal(_hidden(model.eval()), full)


def test_decide_prunes_below_theta_and_reactivates_on_recovery() -> None:
    values = {"a": 2.0, "b": 0.05, "c": 1.0, "d": math.nan}
    assert autopelt.relative(values)["b"] == pytest.approx(0.025)
    assert autopelt.decide(values, set(), 0.05) == (["b"], [])
    assert autopelt.decide(values, set(), 0.6) == (["b", "c"], [])  # c: 0.5 of the largest
    assert autopelt.decide(values, set(), 0.05, prunable={"a", "c"}) == ([], [])
    # b is off; its probed contribution recovers to 0.4 of the largest: back on; d (unknown) stays as it is
    assert autopelt.decide({**values, "b": 0.8}, {"b", "d"}, 0.05) == ([], ["b"])
    assert autopelt.decide({**values, "b": 0.01}, {"b"}, 0.05) == ([], [])  # still low: stays off
    assert autopelt.decide(values, set(), 1.0) == (["b", "c"], [])  # θ = 1: only the largest stays on
    assert autopelt.decide({"a": 0.0, "b": 0.0}, set(), 0.5) == ([], [])  # nothing measured yet: no decision


def test_training_records_contribution_in_gates_json(trained_unipelt: Path) -> None:
    doc = json.loads((trained_unipelt / "gates.json").read_text())
    con = doc["contribution"]
    assert con["window"] == 1000 and con["auto_prune"] is None and con["off"] == [] and con["epoch"] == 1
    units = [(site, m, s) for site, mods in con["layers"].items() for m, s in mods.items()]
    assert len(units) == 6 and set(con["layers"]) == set(doc["layers"])
    assert all(s["value"] > 0 and s["steps"] == con["step"] == 12 and not s["off"] for _, _, s in units)
    assert max(s["relative"] for _, _, s in units) == 1.0
    for _, _, s in units:  # the relative value is the value over the largest; the mean gate is a gate
        assert s["relative"] == pytest.approx(s["value"] / max(x["value"] for _, _, x in units))
        assert 0 < s["gate"] < 1 and s["grad_norm"] > 0
    assert con["history"]["1"] == {
        site: {m: s["value"] for m, s in mods.items()} for site, mods in con["layers"].items()
    }


def _set_relative(run: Path, low: dict[tuple[int, str], float]) -> None:
    doc = json.loads((run / "gates.json").read_text())
    for site, mods in doc["contribution"]["layers"].items():
        for m, s in mods.items():
            s["relative"] = low.get((int(site.split(".")[2]), m), 0.5)
        for m in doc["layers"][site]:
            doc["layers"][site][m]["mean"] = 0.5  # by gate, nothing would go
    (run / "gates.json").write_text(json.dumps(doc))


def test_prune_by_contribution_picks_the_lowest(trained_unipelt: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    _set_relative(run, {(0, "lora"): 0.01, (1, "adapter"): 0.03, (1, "prefix"): 0.2})
    r = pelt_main("prune", str(run), "--dry-run", "--format", "json")
    assert r.returncode == 0 and not [u for u in json.loads(r.stdout)["units"] if u["decision"] == "prune"]
    for args, want in [
        ((), {(0, "lora"), (1, "adapter")}),  # default θ 0.05
        (("--threshold", "0.25"), {(0, "lora"), (1, "adapter"), (1, "prefix")}),
        (("--keep-top-k", "5"), {(0, "lora")}),
        (("--keep-top-k", "1", "--per", "layer"), {(0, "lora"), (1, "adapter"), (1, "prefix"), (0, "prefix")}),
    ]:
        r = pelt_main("prune", str(run), "--by", "contribution", "--dry-run", "--format", "json", *args)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        got = {(u["layer"], u["module"]) for u in rep["units"] if u["decision"] == "prune"}
        if args[:1] == ("--keep-top-k",) and "--per" in args:  # layer 0 keeps its top (adapter or prefix, tied)
            assert len(got) == 4 and {(0, "lora"), (1, "adapter"), (1, "prefix")} <= got, got
        else:
            assert got == want, (args, got)
        assert rep["rule"]["by"] == "contribution"
    r = pelt_main("prune", str(run), "--by", "contribution")
    assert r.returncode == 0, r.stderr
    history = json.loads((run / "run.json").read_text())["pruning"]["history"]
    assert {(h["layer"], h["module"]) for h in history[-1]["pruned"]} == {(0, "lora"), (1, "adapter")}
    assert (run / PRUNED_FILE).is_file()


def test_auto_prune_end_to_end(tiny_bert: Path, small: tuple[str, str], tmp_path: Path) -> None:
    run = apply(rc.load("unipelt"), tiny_bert, tmp_path / "run")
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, patience=0, max_length=24, auto_prune=0.9, window=2)
    res = train_run(run, *small, cfg)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    decisions = [r for r in rows if r.get("kind") == "autoprune"]
    assert [r["step"] for r in decisions] == [2, 4, 6, 8] and res.steps == 8
    assert decisions[0]["pruned"] and all(r["threshold"] == 0.9 and r["window"] == 2 for r in decisions)
    assert all(len(r["off"]) < 6 for r in decisions)  # the strongest unit always stays on
    assert all("kind" not in r for r in res.history)  # the result's history: evaluations only
    doc = json.loads((run / "gates.json").read_text())
    off = doc["contribution"]["off"]
    assert off == decisions[-1]["off"] and off
    # at the end the units still off are pruned from the run as pelt prune does: recipe, pruned.safetensors, history
    meta = json.loads((run / "run.json").read_text())
    gone = meta["pruning"]["history"][-1]
    assert gone["rule"] == {"auto_prune": 0.9, "window": 2, "epoch": 1} and len(gone["pruned"]) == len(off)
    assert (run / PRUNED_FILE).is_file() and not (run / "train").exists()
    # the run now gives exactly the outputs of the trained model with those units switched off
    pruned_model, _ = load_run(run)
    full_run = tmp_path / "full"
    restore_run(run, full_run)
    full = Run.open(full_run).load_model()
    tracker = autopelt.Tracker(Run.open(full_run), full, window=1, theta=None)
    tracker.set_off(off)
    with torch.no_grad():
        assert torch.equal(_hidden(pruned_model.eval()), _hidden(full.eval()))
    # and pelt prune --by contribution treats them as off: pruned already (or gone with their layer's gate, when
    # every module of the layer was off), the others ranked by their recorded contribution
    r = pelt_main("prune", str(run), "--by", "contribution", "--dry-run", "--format", "json")
    assert r.returncode == 0, r.stderr
    states = {f"{u['site']}/{u['module']}": u["decision"] for u in json.loads(r.stdout)["units"]}
    assert {k for k, v in states.items() if v == "pruned"} == set(off) & set(states)
    assert len(states) + len(set(off) - set(states)) == 6 and "pruned" not in {
        states[k] for k in set(states) - set(off)
    }


def test_bad_values_are_one_line_errors(trained_unipelt: Path, tmp_path: Path, sentiment: tuple[Path, Path]) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    for args, needle in [
        (("--auto-prune", "-0.1"), "--auto-prune -0.1: expected θ in [0, 1]"),
        (("--auto-prune", "1.5"), "--auto-prune 1.5: expected θ in [0, 1]"),
        (("--window", "0"), "--window 0: expected ≥ 1"),
    ]:
        r = pelt_main("train", str(run), "--data", str(sentiment[0]), *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {needle}"), r.stderr
    r = pelt_main("prune", str(run), "--by", "foo")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--by" in r.stderr, r.stderr
    assert "'foo'" in r.stderr and "contribution" in r.stderr
    doc = json.loads((run / "gates.json").read_text())
    del doc["contribution"]
    (run / "gates.json").write_text(json.dumps(doc))
    r = pelt_main("prune", str(run), "--by", "contribution")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no recorded contribution" in r.stderr


def test_domain_adapter_contribution_is_recorded_and_never_switched_off(tiny_dir: Path, tmp_path: Path) -> None:
    from fixtures_audio import synth_audio_pairs

    train, dev = synth_audio_pairs(tmp_path / "train", 16, seed=1), synth_audio_pairs(tmp_path / "eval", 8, seed=2)
    run = apply(rc.load("qwen2-audio-domain-adapter"), tiny_dir / "qwen2_audio", tmp_path / "run")
    cfg = TrainConfig(epochs=1, batch_size=8, warmup=0.0, patience=0, auto_prune=1.0, window=1)
    train_run(run, str(train), str(dev), cfg)
    con = json.loads((run / "gates.json").read_text())["contribution"]
    d = con["domain"]["gate"]
    assert d["value"] > 0 and d["steps"] == 1 and d["relative"] == 1.0 and 0 < d["gate"] < 1 and not d["off"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    decisions = [r for r in rows if r.get("kind") == "autoprune"]
    assert [r["step"] for r in decisions] == [1, 2] and all(r["off"] == [] for r in decisions)
    assert not (run / PRUNED_FILE).exists()


def test_auto_prune_resume_equals_uninterrupted(tiny_bert: Path, small: tuple[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-2, warmup=0.0, patience=0, max_length=24, auto_prune=0.9, window=2)
    a = apply(rc.load("unipelt"), tiny_bert, tmp_path / "a")
    b = apply(rc.load("unipelt"), tiny_bert, tmp_path / "b")
    train_run(a, *small, cfg)

    def interrupt(event: dict) -> None:  # Ctrl-C right after the first epoch's checkpoint
        if event["kind"] == "eval" and event["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(b, *small, cfg, on_event=interrupt)
    train_run(b, *small, cfg, resume=True)
    rows = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    decisions = [[x for x in r if x.get("kind") == "autoprune"] for r in rows]
    assert decisions[0] == decisions[1] and len(decisions[0]) == 4  # 4 steps an epoch, a decision every 2
    for name in ("adapter.safetensors", PRUNED_FILE):
        wa, wb = load_file(a / name), load_file(b / name)
        assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa), name
    ca, cb = (json.loads((r / "gates.json").read_text())["contribution"] for r in (a, b))
    assert ca == cb and ca["history"].keys() == {"1", "2"}


def test_auto_prune_under_torchrun_ranks_agree(tiny_bert: Path, small: tuple[str, str], tmp_path: Path) -> None:
    run = apply(rc.load("unipelt"), tiny_bert, tmp_path / "run")
    env = {**os.environ, "PELT_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541"]
    cmd += ["-m", "pelt_cli.cli", "train", str(run), "--data", small[0], "--eval", small[1]]
    cmd += ["--epochs", "1", "--batch-size", "8", "--max-length", "24", "--auto-prune", "0.9", "--window", "2", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    decisions = [x for x in rows if x.get("kind") == "autoprune"]
    assert len(decisions) == 2 and decisions[0]["pruned"]  # 4 steps (2 ranks × 8 rows a step), one every 2
    assert json.loads((run / "run.json").read_text())["training"]["world_size"] == 2


def test_loop_measures_where_the_training_log_does(tiny_bert: Path, small: tuple[str, str], tmp_path: Path) -> None:
    """Window 1: a unit's value is the last step's gate × gradient norm, and the gradient norms per unit add up (in
    squares, over layers) to the training log's per-method norms of that same step — both before clipping."""
    run = apply(rc.load("unipelt"), tiny_bert, tmp_path / "run")
    cfg = TrainConfig(epochs=1, batch_size=16, warmup=0.0, patience=0, max_length=24, max_steps=3, window=1)
    cfg = dataclasses.replace(cfg, log_every=1, max_grad_norm=1e-3)  # a tight clip: both measure before it
    train_run(run, *small, cfg)
    con = json.loads((run / "gates.json").read_text())["contribution"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("kind") == "train"][-1]
    assert last["step"] == con["step"] == 3
    for module in ("lora", "prefix", "adapter"):
        units = [mods[module] for mods in con["layers"].values()]
        assert all(u["steps"] == 1 and abs(u["value"] - u["gate"] * u["grad_norm"]) < 1e-6 for u in units)
        total = math.sqrt(sum(u["grad_norm"] ** 2 for u in units))
        assert total == pytest.approx(last["grad_norm_method"][module], rel=1e-5) and total > 0


def _final_state(run: Path) -> str:
    """Which whole state a run is in after a kill: ``done`` (trained and auto-pruned in one commit), ``resume`` (a
    checkpoint before the final one) or ``rerun`` (untrained); fails on any mix of them."""
    meta = json.loads((run / "run.json").read_text())
    con = json.loads((run / "gates.json").read_text()).get("contribution") if (run / "gates.json").exists() else None
    if meta.get("pruning"):  # every part of the end of training is there, and nothing of the training state
        assert (run / PRUNED_FILE).is_file() and not (run / "train").exists() and con and con["off"]
        assert meta["training"]["result"]["epochs_done"] == 1
        return "done"
    assert not (run / PRUNED_FILE).exists()
    if (run / "train" / "state.pt").exists():
        assert meta["training"]["result"]["epochs_done"] == 0  # a mid-epoch checkpoint, never the final one
        return "resume"
    assert con is None and not (run / "train").exists()
    return "rerun"


def test_kill_at_every_rename_of_an_auto_prune_training(
    tiny_bert: Path, small: tuple[str, str], tmp_path: Path
) -> None:
    """The final checkpoint and the auto-prune are one commit: a kill at any rename leaves the previous checkpoint
    (resume or rerun gives the uninterrupted result, bit for bit) or the finished run; never a half."""
    from test_atomic_runs import _killed, _no_leftovers, _renames, _same

    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2, warmup=0.0, patience=0, max_length=24, auto_prune=0.9,
                      window=1, save_every=2)  # fmt: skip
    fresh = apply(rc.load("unipelt"), tiny_bert, tmp_path / "fresh")
    ref = tmp_path / "ref"
    subprocess.run(["cp", "-r", str(fresh), str(ref)], check=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a forked child of a process with an OpenMP pool hangs; and parent and child agree
    try:
        names = _renames(lambda: train_run(ref, *small, cfg), tmp_path)
        # two commits (step 2 with --save-every, the end); the pruned run is built inside the final one, before it
        assert names.count("ref") == 2 and names.index("ref") < names.index(".pelt-pruned") < len(names) - 2
        assert _final_state(ref) == "done"
        note = (ref / "recipe.yaml").read_text().splitlines()[0]  # names the run, not the generation it was built in
        assert note.startswith("# rewritten by pelt prune") and str(ref) in note and "pelt-tmp" not in note
        assert "pelt-tmp" not in (ref / "run.json").read_text() + (ref / "gates.json").read_text()
        paths = set()
        for k in itertools.count(1):  # until a run has fewer renames than k
            run = tmp_path / f"k{k}" / "run"
            run.parent.mkdir()
            subprocess.run(["cp", "-r", str(fresh), str(run)], check=True)
            if not _killed(lambda run=run: train_run(run, *small, cfg), k):
                break
            Run.open(run)  # whole: a swap cut in the middle comes back
            path = _final_state(run)
            if path == "done":
                with pytest.raises(UsageError, match="nothing to resume"):
                    train_run(run, *small, cfg, resume=True)
            else:
                train_run(run, *small, cfg, resume=path == "resume")
            paths.add(path)
            _same(ref, run)
            assert json.loads((run / "gates.json").read_text()) == json.loads((ref / "gates.json").read_text())
            _no_leftovers(run)
    finally:
        torch.set_num_threads(threads)
    assert k > len(names) - 1 and paths == {"rerun", "resume", "done"}  # (the first may write a cache more)
