"""``pelt merge``: streamed folds equal the unmerged run on every family, layouts, dtypes, ties, refusals, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers as tf
from conftest import REPO, hash_tree, make_run, outputs, pelt_main, set_gate_means
from safetensors.torch import load_file
from tiny_models import FAMILIES

from pelt_cli import recipe as rc
from pelt_cli.errors import CheckpointError, MergeRefused, OutputExistsError, UsageError
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.reader import TensorReader
from pelt_cli.io.writer import save_file
from pelt_cli.keymap import key_map, skeleton
from pelt_cli.merge import REST_DIR, merge_run, sample_inputs_for, verify_merge
from pelt_cli.run import ADAPTER_FILE, load_base, load_run

LORA = {"gpt2": "lora-gpt2"}
IA3 = {"gpt2": "ia3-gpt2"}


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_run(tiny_dir: Path, tmp_path: Path, family: str, method: str) -> None:
    name = (LORA if method == "lora" else IA3).get(family, method)
    run = make_run(rc.load(name), tiny_dir / family, tmp_path / "run")
    model, meta = load_run(run)
    base = load_base(tiny_dir / family)
    assert (outputs(model, family) - outputs(base, family)).abs().max().item() > 1e-4  # 10× the bound below
    rep = merge_run(run, tmp_path / "merged")
    merged, info = type(base).from_pretrained(tmp_path / "merged", output_loading_info=True)  # plain transformers
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    diff = (outputs(merged, family) - outputs(model, family)).abs().max().item()
    assert diff <= 1e-5, diff
    # each folded layer: its weight, plus its bias for an IA³ output scale
    folded = {t for f in rep.folded for t in f["tensors"]}
    assert len(rep.folded) == len({i["site"] for i in meta["insertions"]}) > 0
    assert rep.tensors_folded == len(folded) >= len(rep.folded)
    src, out = open_checkpoint(tiny_dir / family), open_checkpoint(tmp_path / "merged")
    assert {n: (i.dtype, i.shape) for n, i in src.tensors.items()} == {
        n: (i.dtype, i.shape) for n, i in out.tensors.items()
    }
    km = key_map(skeleton(tiny_dir / family))
    folded_disk = {km.to_disk[t] for t in folded}
    with TensorReader(src) as a, TensorReader(out) as b:
        changed = {n for n in src.tensors if a.read_bytes(n) != b.read_bytes(n)}
    # every folded weight changed; nothing else did (a folded bias of zeros stays zeros)
    assert {n for n in folded_disk if n.endswith("weight")} <= changed <= folded_disk
    assert rep.tensors_written == len(src.tensors) and rep.bytes_written == src.total_bytes


TIED = {  # family: (glob on the tied head, method, disk names that become separate tensors)
    "qwen2-tied": ("lm_hea?", "lora", ["lm_head.weight"]),
    "gpt2": ("lm_hea?", "ia3", ["lm_head.weight"]),
    "bert": ("cls.predictions.decode?", "ia3", ["cls.predictions.decoder.bias", "cls.predictions.decoder.weight"]),
}


@pytest.mark.parametrize("family", list(TIED))
def test_tied_head_is_untied(tiny_dir: Path, tmp_path: Path, family: str) -> None:
    base_dir = tiny_dir / family
    if family == "qwen2-tied":
        torch.manual_seed(0)
        cfg = tiny_models.config("qwen2", tie_word_embeddings=True)
        base_dir = tmp_path / "base"
        tf.Qwen2ForCausalLM(cfg).save_pretrained(base_dir)
    glob, method, untied = TIED[family]
    source = open_checkpoint(base_dir)
    assert not set(untied) & set(source.tensors)  # save_pretrained dropped the tied targets
    # a glob: the lm_head role does not match a tied head (see the report)
    params = "    params: {rank: 4, alpha: 8}\n" if method == "lora" else ""
    recipe = rc.loads(f'name: head\ninserts:\n  - method: {method}\n    targets: ["{glob}"]\n{params}')
    run = make_run(recipe, base_dir, tmp_path / "run")
    rep = merge_run(run, tmp_path / "merged")
    assert rep.untied == untied
    assert verify_merge(run, tmp_path / "merged") <= 1e-5
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert all(torch.equal(merged[k], base[k]) for k in base)  # the embeddings (tie sources) are unchanged
    weight = untied[-1]
    km = key_map(skeleton(base_dir))
    src = km.disk_name(weight)
    assert (merged[weight] - base[src]).abs().max().item() > 1e-3
    m, info = type(load_base(base_dir)).from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not m.config.tie_word_embeddings
    assert m.get_output_embeddings().weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_lora_merge_equals_peft_merge_and_unload(tiny_dir: Path, tmp_path: Path, family: str) -> None:
    peft = pytest.importorskip("peft")
    from pelt_cli.peft_format import export_peft

    run = make_run(rc.load(LORA.get(family, "lora")), tiny_dir / family, tmp_path / "run")
    rep = merge_run(run, tmp_path / "merged")
    export_peft(run, tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(load_base(tiny_dir / family), tmp_path / "peft").merge_and_unload()
    theirs = pm.state_dict()
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    folded = [t for f in rep.folded for t in f["tensors"]]
    assert folded and all(t in ours for t in folded)  # memory = disk names for these three families
    worst = max((ours[t] - theirs[t]).abs().max().item() for t in folded)
    assert worst <= 1e-6, worst
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours if k in theirs) <= 1e-6


def test_bf16_base_keeps_its_dtype(tiny_dir: Path, tmp_path: Path) -> None:
    import tiny_models

    tiny_models.build("llama").to(torch.bfloat16).save_pretrained(tmp_path / "base")
    run = make_run(rc.load("lora"), tmp_path / "base", tmp_path / "run")
    merge_run(run, tmp_path / "merged")
    ck = open_checkpoint(tmp_path / "merged")
    assert {i.dtype for i in ck.tensors.values()} == {"BF16"}
    assert ck.total_bytes == open_checkpoint(tmp_path / "base").total_bytes
    m, info = tf.LlamaForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and m.dtype == torch.bfloat16
    assert verify_merge(run, tmp_path / "merged") <= 0.05  # bf16 rounding of the folded weights
    merge_run(run, tmp_path / "merged32", dtype="float32")
    assert {i.dtype for i in open_checkpoint(tmp_path / "merged32").tensors.values()} == {"F32"}
    assert json.loads((tmp_path / "merged32" / "config.json").read_text())["dtype"] == "float32"
    with pytest.raises(UsageError):
        merge_run(run, tmp_path / "bad", dtype="int8")


def test_sharded_base_keeps_layout_and_reshards(tiny_dir: Path, tmp_path: Path) -> None:
    base = tiny_dir / "llama-sharded"
    run = make_run(rc.load("lora"), base, tmp_path / "run")
    rep = merge_run(run, tmp_path / "merged")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    mine = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert mine["weight_map"] == index["weight_map"] and rep.shards == len(set(index["weight_map"].values())) > 1
    assert mine["metadata"]["total_size"] == open_checkpoint(base).total_bytes
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(p.name for p in base.iterdir())
    assert verify_merge(run, tmp_path / "merged") <= 1e-5
    rep2 = merge_run(run, tmp_path / "resharded", max_shard_size=20_000)
    files = sorted((tmp_path / "resharded").glob("*.safetensors"))
    assert rep2.shards == len(files) > rep.shards
    ck = open_checkpoint(tmp_path / "resharded")
    for f in files:
        sizes = [i.nbytes for i in ck.tensors.values() if i.file == f]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    assert verify_merge(run, tmp_path / "resharded") <= 1e-5


def _unipelt(modules: str) -> rc.Recipe:
    return rc.loads(
        f"name: u\ninserts:\n  - method: unipelt\n    targets: [attn.q]\n    params: {{modules: {modules}}}\n"
    )


def _constant_gates(run: Path, bias: float) -> float:
    """Zero the gate weights so every gate is σ(bias) for any input; return that gate value."""
    ck = open_checkpoint(run / ADAPTER_FILE)
    with TensorReader(ck) as r:
        state = {n: r.read(n).clone() for n in ck.tensors}
    for n in state:
        if ".pelt_gate.net." in n:
            state[n] = torch.zeros_like(state[n]) if n.endswith("weight") else torch.full_like(state[n], bias)
    save_file(state, run / ADAPTER_FILE)
    return torch.sigmoid(torch.tensor(bias)).item()


def _gates_json(run: Path, mean: float) -> None:
    sites = [
        i["site"] for i in json.loads((run / "run.json").read_text())["insertions"] if i["method"] == "unipelt.gate"
    ]
    stats = {"mean": mean, "std": 0.0, "min": mean, "max": mean, "count": 4}
    (run / "gates.json").write_text(
        json.dumps({"layers": {s: {"lora": stats, "prefix": stats, "adapter": stats} for s in sites}})
    )


def test_unipelt_needs_freeze_gates(tiny_dir: Path, tmp_path: Path) -> None:
    run = make_run(_unipelt("[lora]"), tiny_dir / "bert", tmp_path / "run")
    with pytest.raises(MergeRefused) as e:
        merge_run(run, tmp_path / "m")
    assert "--freeze-gates mean" in e.value.hint and e.value.exit_code == 2 and len(e.value.modules) == 4
    with pytest.raises(MergeRefused, match="gate"):  # no gates.json yet
        merge_run(run, tmp_path / "m", freeze_gates="mean")
    g = _constant_gates(run, 0.7)
    _gates_json(run, g)
    rep = merge_run(run, tmp_path / "m", freeze_gates="mean")
    assert rep.approximate and rep.unmerged == [] and rep.rest is None and {f["gate"] for f in rep.folded} == {g}
    assert verify_merge(run, tmp_path / "m") <= 1e-5  # the gate is constant here, so the fold is exact
    _gates_json(run, g - 0.2)
    merge_run(run, tmp_path / "m2", freeze_gates="mean")
    assert verify_merge(run, tmp_path / "m2") > 1e-3  # the gate value really is used


def test_unipelt_frozen_lora_with_rest(tiny_dir: Path, tmp_path: Path) -> None:
    run = make_run(rc.load("unipelt"), tiny_dir / "llama", tmp_path / "run", others=0.1)
    g = _constant_gates(run, -0.4)
    _gates_json(run, g)
    rep = merge_run(run, tmp_path / "m", freeze_gates="mean", keep_unmerged=True)
    assert rep.approximate and {u["method"] for u in rep.unmerged} == {
        "unipelt.gate",
        "unipelt.prefix",
        "unipelt.adapter",
    }
    rest = json.loads((tmp_path / "m" / REST_DIR / "run.json").read_text())
    assert rest["recipe"]["inserts"][0]["params"]["modules"] == ["prefix", "adapter"]
    assert verify_merge(run, tmp_path / "m") <= 1e-5  # sigmoid gates are per module: sliced rows are exact
    rep = merge_run(run, tmp_path / "exact", keep_unmerged=True)  # no freezing: the gated LoRA stays unmerged
    assert not rep.approximate and rep.folded == [] and verify_merge(run, tmp_path / "exact") <= 1e-6


def test_adapter_and_prefix_refused_or_kept(tiny_dir: Path, tmp_path: Path) -> None:
    recipe = rc.loads(
        "name: mix\ninserts:\n  - method: lora\n    targets: [attn.q, attn.v]\n"
        "  - method: adapter\n    targets: [ffn.down]\n  - method: prefix\n    targets: [attn.k]\n"
    )
    run = make_run(recipe, tiny_dir / "llama", tmp_path / "run", others=0.1)
    with pytest.raises(MergeRefused) as e:
        merge_run(run, tmp_path / "m")
    msg = str(e.value)
    assert "adapter ×2" in msg and "prefix ×2" in msg and "model.layers.0.mlp.down_proj" in msg
    assert "--keep-unmerged" in e.value.hint and not (tmp_path / "m").exists()
    rep = merge_run(run, tmp_path / "m", keep_unmerged=True)
    assert len(rep.folded) == 4 and len(rep.unmerged) == 4 and rep.rest == str(tmp_path / "m" / REST_DIR)
    rest, _ = load_run(tmp_path / "m" / REST_DIR)  # checks the fingerprint of the merged base
    orig, _ = load_run(run)
    assert (outputs(rest, "llama") - outputs(orig, "llama")).abs().max().item() <= 1e-5
    plain = load_base(tmp_path / "m")  # the merged base alone: LoRA folded, no adapter/prefix
    assert (outputs(plain, "llama") - outputs(orig, "llama")).abs().max().item() > 1e-4


def test_fingerprint_overlap_and_existing_out(tiny_dir: Path, tmp_path: Path) -> None:
    run = make_run(rc.load("lora"), tiny_dir / "bert", tmp_path / "run")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir / "bert", other)
    state = load_file(other / "model.safetensors")
    state["bert.embeddings.LayerNorm.weight"] += 1
    save_file(state, other / "model.safetensors")
    with pytest.raises(CheckpointError, match="fingerprint"):
        merge_run(run, tmp_path / "m", base=other)
    side = [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "merges.txt",
        "special_tokens_map.json",
        "added_tokens.json",
        "spm.model",
        "preprocessor_config.json",
        "chat_template.jinja",
    ]
    for i, name in enumerate(side):
        (other / name).write_text(f"{name} {i}\n")
    rep = merge_run(run, tmp_path / "m", base=other, check_fingerprint=False)
    assert rep.tensors_written == len(state)
    for name in [*side, "config.json"]:  # side files copied byte for byte (config.json too: nothing untied)
        assert (tmp_path / "m" / name).read_bytes() == (other / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(p.name for p in other.iterdir())
    with pytest.raises(OutputExistsError):
        merge_run(run, tmp_path / "m")
    merge_run(run, tmp_path / "m", force=True)
    with pytest.raises(UsageError):
        merge_run(run, run)


SLOW_MERGE = """
import sys, time
from pelt_cli.io import writer
orig = writer.ShardedWriter.write_bytes
def slow(self, name, data):
    time.sleep(1.0)
    orig(self, name, data)
writer.ShardedWriter.write_bytes = slow
from pelt_cli.merge import merge_run
merge_run(sys.argv[1], sys.argv[2])
"""


def test_killed_merge_leaves_no_output(tiny_dir: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_dir / "bert", base)
    run = make_run(rc.load("lora"), base, tmp_path / "run")
    before = (hash_tree(base), hash_tree(run))
    out = tmp_path / "merged"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(run), str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".merged.pelt-tmp-*")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    stale = list(tmp_path.glob(".merged.pelt-tmp-*"))
    time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert stale and child.returncode == -signal.SIGKILL
    assert not out.exists()
    assert (hash_tree(base), hash_tree(run)) == before
    rep = merge_run(run, out)  # the next merge to the same path removes the dead process's temporary directory
    assert not list(tmp_path.glob(".merged.pelt-tmp-*")) and rep.tensors_written > 0
    assert verify_merge(run, out) <= 1e-5


def test_sample_inputs_for_configs(tiny_dir: Path) -> None:
    for fam in ("whisper", "vit", "qwen2_audio", "bert"):
        cfg = tf.AutoConfig.from_pretrained(tiny_dir / fam)
        x = sample_inputs_for(cfg, batch=3)
        key = {"whisper": "input_features", "vit": "pixel_values"}.get(fam, "input_ids")
        assert x[key].shape[0] == 3
        if key == "input_ids":
            assert int(x[key].max()) < cfg.get_text_config().vocab_size
        if fam == "qwen2_audio":
            assert not (x[key] == cfg.audio_token_index).any()


def test_head_checkpoint_without_architectures(tiny_dir: Path, tmp_path: Path) -> None:
    """A causal-LM checkpoint whose config.json lacks ``architectures`` is still read as the head model."""
    base = tmp_path / "base"
    shutil.copytree(tiny_dir / "llama", base)
    cfg = json.loads((base / "config.json").read_text())
    assert cfg.pop("architectures")
    (base / "config.json").write_text(json.dumps(cfg))
    run = make_run(rc.load("lora"), base, tmp_path / "run")
    assert json.loads((run / "run.json").read_text())["base"]["model_class"] == "LlamaForCausalLM"
    rep = merge_run(run, tmp_path / "merged")
    assert rep.tensors_folded == 4
    assert verify_merge(run, tmp_path / "merged") <= 1e-5


def test_merge_freeze_gates_takes_means_from_data(
    trained_unipelt: Path, sentiment: tuple[Path, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    set_gate_means(run, {(0, "lora"): 0.0, (1, "lora"): 0.0})  # wrong statistics on purpose: fold nothing
    if json.loads((run / "run.json").read_text())["recipe"]["inserts"][0]["params"]["gate"] == "softmax":
        r = pelt_main("merge", str(run), "-o", str(tmp_path / "m"), "--freeze-gates", "mean", "--keep-unmerged")
        assert r.returncode == 2 and "softmax gates share one normalisation" in r.stderr  # refused, not wrong
        return
    deltas = []
    for extra in ([], ["--data", str(sentiment[1])]):
        out = tmp_path / f"m{len(extra)}"
        r = pelt_main("merge", str(run), "-o", str(out), "--freeze-gates", "mean", "--keep-unmerged", *extra)
        assert r.returncode == 0, r.stderr
        deltas.append(float(r.stderr.split("max |Δ| = ")[1].split()[0]))
    assert deltas[1] < deltas[0]  # the means measured on data fold the gated LoRA better than the stale ones


@pytest.mark.parametrize("trained_unipelt", ["sigmoid"], indirect=True)
def test_rest_gates_keep_only_the_unmerged_units_in_every_section(trained_unipelt: Path, tmp_path: Path) -> None:
    """--keep-unmerged: the rest run's gates.json has the units that remain (prefix, adapter; the folded LoRAs gone)
    under the rest's own site names in the statistics, history, histograms, best epoch and AutoPELT contribution."""
    from pelt_cli.run import Run

    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained_unipelt), str(run)], check=True)
    doc = json.loads((run / "gates.json").read_text())
    sites = list(doc["layers"])
    con = doc["contribution"]
    off = [f"{sites[0]}/lora", f"{sites[1]}/prefix"]  # as if --auto-prune had left these off
    con["off"] = con["best"]["off"] = off
    (run / "gates.json").write_text(json.dumps(doc))
    merge_run(run, tmp_path / "m", freeze_gates="mean", keep_unmerged=True)
    rest_dir = tmp_path / "m" / REST_DIR
    got = json.loads((rest_dir / "gates.json").read_text())
    units = {u.stats[1:] for u in Run.open(rest_dir).gate_units() if not u.pruned}
    prefix = next(iter(units))[0].removesuffix(sites[0]).removesuffix(sites[1])
    assert prefix == "bert."  # the rest run's base is the merged task model: its sites under the model's root
    assert len(units) == 4 and {m for _, m in units} == {"prefix", "adapter"}  # 2 layers × prefix, adapter
    assert {(prefix + s, m) for s in sites for m in ("prefix", "adapter")} == units

    def pairs(by_site: dict) -> set:
        return {(s, m) for s, mods in by_site.items() for m in mods}

    assert pairs(got["layers"]) == units and pairs(got["best"]["layers"]) == units
    assert got["history"].keys() == got["histograms"].keys() == {"1"}
    assert pairs(got["history"]["1"]) == units and pairs(got["histograms"]["1"]) == units
    assert all(len(h) == 10 for mods in got["histograms"]["1"].values() for h in mods.values())
    gc = got["contribution"]
    assert pairs(gc["layers"]) == units and pairs(gc["best"]["layers"]) == units and pairs(gc["history"]["1"]) == units
    assert gc["off"] == gc["best"]["off"] == [f"{prefix}{sites[1]}/prefix"]  # the folded LoRA's label is gone
    for s, m in units:  # the values as recorded, under the rest's site names
        site = s.removeprefix(prefix)
        assert got["layers"][s][m] == doc["layers"][site][m]
        assert got["histograms"]["1"][s][m] == doc["histograms"]["1"][site][m]
        assert gc["layers"][s][m] == con["layers"][site][m]
    r = pelt_main("prune", str(rest_dir), "--by", "contribution", "--dry-run", "--format", "json")
    assert r.returncode == 0, r.stderr  # prune reads them on the rest run
    assert len(json.loads(r.stdout)["units"]) == 4
