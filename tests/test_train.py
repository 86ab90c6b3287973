"""``pelt train``: only inserted parameters learn, every method learns, resume is exact, NaN stops cleanly,
gates are recorded, the domain adapter closes a feature gap, two CPU processes agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, hash_tree, pelt_main, pelt_pipeline

from pelt_cli import recipe as rc
from pelt_cli import surgery
from pelt_cli.apply import apply
from pelt_cli.diagnostics import is_train_row
from pelt_cli.errors import TrainingError, UsageError
from pelt_cli.run import ADAPTER_FILE, load_run
from pelt_cli.train import TrainConfig, train_run

LR = {"prefix": 3e-2, "ia3": 3e-2}  # prefix and IA³ want a larger step: only a few vectors and the classifier train
FAST = dict(epochs=4, batch_size=16, lr=1e-2, warmup=0.0, patience=0, max_length=24)


@pytest.fixture(scope="module")
def minilm_before(minilm: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """MiniLM's file hashes and base weights, read once before any training in this module."""
    import transformers

    return hash_tree(minilm), transformers.BertModel.from_pretrained(minilm).state_dict()


@pytest.mark.parametrize("recipe_name", ["lora", "adapter", "prefix", "ia3", "unipelt"])
def test_every_method_learns_and_base_is_untouched(
    minilm: Path, minilm_before: tuple[dict, dict], sentiment: tuple[Path, Path], tmp_path: Path, recipe_name: str
) -> None:
    """The real MiniLM, a sentiment task it can learn: eval loss falls and accuracy rises far above chance."""
    before, base_state = minilm_before
    run = apply(rc.load(recipe_name), minilm, tmp_path / "run")
    epochs = 2
    res = train_run(
        run,
        str(sentiment[0]),
        str(sentiment[1]),
        TrainConfig(epochs=epochs, batch_size=16, lr=LR.get(recipe_name, 3e-3), warmup=0.0, patience=0, max_length=24),
    )
    hist = res.history
    assert hist[-1]["eval_loss"] < 0.5 < 0.69  # ln 2 = 0.69 is the loss of a coin flip
    assert res.best_metric >= 0.9, hist  # chance is 0.5
    assert hist[-1]["f1"] >= 0.9
    lines = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if not is_train_row(r)]
    assert len(lines) == epochs and lines[-1]["epoch"] == epochs
    assert hash_tree(minilm) == before  # the base checkpoint is never written
    model, meta = load_run(run)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    state = surgery.run_root(model).state_dict()  # the task model's base: the run's own module paths
    for k, v in base_state.items():
        assert torch.equal(state[k], v), k  # base weights bit-identical after training
    assert meta["head"]["labels"] == ["negative", "positive"]
    assert meta["training"]["result"]["epochs_done"] == epochs
    if recipe_name == "lora":  # the real MiniLM merged: transformers' own pipeline gives the run's predictions
        _pipeline_agrees(run, model, minilm, tmp_path / "merged")


def _pipeline_agrees(run: Path, model: torch.nn.Module, base: Path, out: Path) -> None:
    import transformers

    from pelt_cli.merge import merge_run

    merge_run(run, out)
    texts = ["a lovely and superb story", "the plot was dull and boring", "it was fun", "really poor"]
    pipe = transformers.pipeline("text-classification", model=str(out), top_k=None)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        want = model(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    for row, p in zip(pipe(texts), want, strict=True):
        scores = {d["label"]: d["score"] for d in row}
        assert abs(scores["negative"] - p[0].item()) <= 1e-5 and abs(scores["positive"] - p[1].item()) <= 1e-5
    assert [max(r, key=lambda d: d["score"])["label"] for r in pipe(texts)] == [
        "positive",
        "negative",
        "positive",
        "negative",
    ]


def test_resume_equals_uninterrupted(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = dict(FAST, epochs=2, lr=5e-3)
    a = apply(rc.load("unipelt"), tiny_bert, tmp_path / "a")
    b = apply(rc.load("unipelt"), tiny_bert, tmp_path / "b")
    train_run(a, str(sentiment[0]), str(sentiment[1]), TrainConfig(**cfg))

    def interrupt(event: dict) -> None:  # Ctrl-C right after the first epoch's checkpoint
        if event["kind"] == "eval" and event["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(b, str(sentiment[0]), str(sentiment[1]), TrainConfig(**cfg), on_event=interrupt)
    assert json.loads((b / "run.json").read_text())["training"]["result"]["epochs_done"] == 1
    train_run(b, str(sentiment[0]), str(sentiment[1]), TrainConfig(**cfg), resume=True)
    wa, wb = load_file(a / ADAPTER_FILE), load_file(b / ADAPTER_FILE)
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval_loss"] for m in ma if not is_train_row(m)] == [m["eval_loss"] for m in mb if not is_train_row(m)]
    assert [m for m in ma if is_train_row(m)] == [m for m in mb if is_train_row(m)]  # loss, lr, norms: exact


def test_nan_stops_cleanly(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    from pelt_cli.io.writer import save_file

    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    train_run(run, str(sentiment[0]), str(sentiment[1]), TrainConfig(**dict(FAST, epochs=1)))
    good = hash_tree(run)
    from safetensors.torch import load_file

    state = load_file(run / ADAPTER_FILE)
    key = next(k for k in state if k.endswith(".B"))
    state[key][0, 0] = float("nan")
    save_file(state, run / ADAPTER_FILE)
    poisoned = hash_tree(run)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 1 "):
        train_run(run, str(sentiment[0]), str(sentiment[1]), TrainConfig(**dict(FAST, epochs=1)))
    assert hash_tree(run) == poisoned != good  # nothing was written after the bad step
    r = pelt_main("train", str(run), "--data", str(sentiment[0]), "--eval", str(sentiment[1]), "--epochs", "1", "-q")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: non-finite loss") and "Traceback" not in r.stderr


@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_gate_statistics_recorded(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path, gate: str) -> None:
    run = apply(rc.load("unipelt", [f"inserts.0.params.gate={gate}"]), tiny_bert, tmp_path / "run")
    train_run(run, str(sentiment[0]), str(sentiment[1]), TrainConfig(**dict(FAST, epochs=2)))
    doc = json.loads((run / "gates.json").read_text())
    assert len(doc["layers"]) == 2 and doc["last_epoch"] == 2 and set(doc["history"]) == {"1", "2"}
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if not is_train_row(m)]
    best = max(metrics, key=lambda m: m["accuracy"])["epoch"]  # the statistics of the weights that were kept
    assert doc["epoch"] == doc["best"]["epoch"] == best and doc["layers"] == doc["best"]["layers"]
    for mods in doc["layers"].values():
        assert set(mods) == {"lora", "prefix", "adapter"}
        for s in mods.values():
            assert s["count"] == 64 and 0 <= s["min"] <= s["mean"] <= s["max"] <= 1 and s["std"] >= 0
        if gate == "softmax":
            assert abs(sum(s["mean"] for s in mods.values()) - 1) < 1e-6
    r = pelt_main("gates", str(run), "--format", "tsv")
    assert r.returncode == 0
    assert len(r.stdout.splitlines()) == 1 + 2 * 3
    r = pelt_main("gates", str(run), "--format", "table", env={"COLUMNS": "160"})
    assert "█" in r.stdout or "mean gate" in r.stdout


def test_cli_pipeline_prints_run(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    r = pelt_pipeline(
        f"apply lora {tiny_bert} -o {tmp_path / 'run'}",
        f"train - --data {sentiment[0]} --eval {sentiment[1]} --epochs 1 --batch-size 32",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "run")
    assert "epoch 1: eval_loss" in r.stderr and "training" in r.stderr


def test_refuses_bad_options(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    r = pelt_main("train", str(run), "--data", str(sentiment[0]), "--schedule", "weird")
    assert r.returncode == 2 and "--schedule 'weird'" in r.stderr
    r = pelt_main("train", str(run), "--data", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr
    r = pelt_main("train", str(run), "--data", str(sentiment[0]), "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_two_process_torchrun_ranks_agree(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    env = {**os.environ, "PELT_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "pelt_cli.cli",
        "train",
        str(run),
        "--data",
        str(sentiment[0]),
        "--eval",
        str(sentiment[1]),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "-q",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(run)]  # only rank 0 prints and writes
    meta = json.loads((run / "run.json").read_text())
    assert meta["training"]["world_size"] == 2


@pytest.fixture(scope="session")
def audio_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fixtures_audio import synth_audio_pairs

    d = tmp_path_factory.mktemp("audio")
    return synth_audio_pairs(d / "train", 24, seed=1), synth_audio_pairs(d / "eval", 8, seed=2)


def test_domain_adapter_closes_the_feature_gap(tiny_dir: Path, audio_pairs: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(
        rc.load("qwen2-audio-domain-adapter", ["inserts.0.params.dropout=0.0"]),
        tiny_dir / "qwen2_audio",
        tmp_path / "run",
    )
    res = train_run(
        run,
        str(audio_pairs[0]),
        str(audio_pairs[1]),
        TrainConfig(epochs=6, batch_size=8, lr=3e-2, scale_lr=1e-1, warmup=0.0, patience=0),
    )
    assert res.task == "domain-matching"
    first, last = res.history[0], res.history[-1]
    assert abs(first["feature_mse_unadapted"] - last["feature_mse_unadapted"]) < 1e-9  # frozen encoder
    # the adapter moves held-out source features toward their references: distance at least halved
    assert last["feature_mse"] < 0.5 * last["feature_mse_unadapted"] and last["feature_mse"] < first["feature_mse"]
    assert last["cosine"] > last["cosine_unadapted"]
    doc = json.loads((run / "gates.json").read_text())
    d = doc["domain"]
    assert 0 < d["gate"]["mean"] < 1 and d["gate"]["count"] == 8 * 50 and d["scale"] != 0.1
    assert d["healthy"] == (0.3 <= d["gate"]["mean"] <= 0.7)
    (row,) = [r for r in _metrics(run) if is_train_row(r)]  # 3 steps an epoch, --log-every 10: step 10
    assert row["step"] == 10 and row["grad_norm"]["scale"] > 0 and row["grad_norm"]["modules"] > 0
    assert "head" not in row["grad_norm"] and "gates" not in row["grad_norm"]  # domain matching: no head, no UniPELT
    r = pelt_main("gates", str(run), "--format", "table", env={"COLUMNS": "160"})
    assert r.returncode == 0 and "domain adapter: mean gate" in r.stdout and "scale" in r.stdout


def test_audio_classification_learns(tmp_path: Path) -> None:
    import tiny_models
    from fixtures_audio import synth_audio_classes

    train = synth_audio_classes(tmp_path / "tr", 16, seed=0)
    ev = synth_audio_classes(tmp_path / "ev", 8, seed=1)
    # A randomly initialised tiny Whisper (init std 0.02) drowns its input in the positional embeddings: the pooled
    # output barely depends on the audio. Scale the conv front-end up, as training would, so a signal gets through.
    model = tiny_models.build("whisper")
    with torch.no_grad():
        for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
            conv.weight.mul_(25)
    model.save_pretrained(tmp_path / "whisper")
    # LoRA on the decoder too would get no gradient from a classifier that reads the encoder: refused at step 1
    both = apply(rc.load("lora"), tmp_path / "whisper", tmp_path / "both")
    with pytest.raises(TrainingError, match=r"no gradient reaches 8 trainable module\(s\) .*decoder\.layers\.0"):
        train_run(both, str(train), str(ev), TrainConfig(epochs=1, batch_size=8))
    run = apply(rc.load("lora", ["inserts.0.blocks=[encoder]"]), tmp_path / "whisper", tmp_path / "run")
    res = train_run(run, str(train), str(ev), TrainConfig(epochs=4, batch_size=8, lr=1e-2, warmup=0.0, patience=0))
    assert res.task == "audio-classification"
    assert res.best_metric >= 0.8, res.history  # low vs high tones; chance is 0.5


def test_audio_classification_on_a_domain_run_trains_the_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    from fixtures_audio import synth_audio_classes
    from safetensors.torch import load_file

    data = synth_audio_classes(tmp_path / "tr", 4, seed=0)
    run = apply(rc.load("qwen2-audio-domain-adapter"), tiny_dir / "qwen2_audio", tmp_path / "run")
    before = load_file(run / ADAPTER_FILE)
    train_run(run, str(data), str(data), TrainConfig(epochs=1, batch_size=4, lr=1e-2, warmup=0.0, patience=0))
    after = load_file(run / ADAPTER_FILE)
    moved = [n for n in before if "pelt_domain" in n and not torch.equal(before[n], after[n])]
    assert len(moved) >= len([n for n in before if "pelt_domain" in n]) // 2  # the adapter learned: it is upstream


def test_eval_every_n_steps_logs_partial_rows(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    events: list[dict] = []
    train_run(
        run,
        str(sentiment[0]),
        str(sentiment[1]),
        TrainConfig(**dict(FAST, epochs=1, eval_every=5)),
        on_event=events.append,
    )
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if is_train_row(r)] == [10]  # --log-every 10
    rows = [r for r in rows if not is_train_row(r)]
    assert [(r["step"], r.get("partial", False)) for r in rows] == [(5, True), (10, True), (12, False)]
    assert [e["step"] for e in events if e["kind"] == "eval"] == [5, 10, 12]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)


# ------------------------------------------------------------------------------------------------ recipe train:


def _config(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["training"]["config"]


def test_precedence_defaults_recipe_then_given_options(
    tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path
) -> None:
    """TrainConfig defaults < the recipe's train: section < the options given (library ``given``, CLI flags)."""
    section = "train={epochs: 3, lr: 0.005, batch_size: 16, max_length: 24, warmup: 0.0, max_steps: 2}"
    recipe = rc.load("lora", [section])
    run = apply(recipe, tiny_bert, tmp_path / "run")
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=8, max_length=24)
    train_run(run, str(sentiment[0]), str(sentiment[1]), cfg, given={"epochs"})
    got = _config(run)
    assert (got["epochs"], got["lr"], got["batch_size"], got["max_steps"]) == (1, 0.005, 16, 2)
    assert (got["weight_decay"], got["schedule"]) == (0.01, "linear")  # neither given nor in the recipe: defaults
    train_run(run2 := apply(recipe, tiny_bert, tmp_path / "run2"), str(sentiment[0]), str(sentiment[1]), cfg)
    assert (_config(run2)["lr"], _config(run2)["batch_size"]) == (1e-2, 8)  # given=None: cfg as it is
    run3 = apply(recipe, tiny_bert, tmp_path / "run3")
    r = pelt_main("train", str(run3), "--data", str(sentiment[0]), "--eval", str(sentiment[1]), "--lr", "0.02", "-q")
    assert r.returncode == 0, r.stderr
    got = _config(run3)
    assert (got["epochs"], got["lr"], got["batch_size"], got["max_steps"], got["patience"]) == (3, 0.02, 16, 2, 3)


def test_class_weights_auto(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    from pelt_cli.train import _Data, _set_class_weights
    from pelt_cli.train_config import class_weights

    rows = [{"label": "positive"}] * 6 + [{"label": "negative"}] * 2
    assert class_weights(rows, ["negative", "positive"]) == pytest.approx([2.0, 2 / 3])  # N / (K · n_c)
    assert class_weights(rows, ["negative", "neutral", "positive"]) == pytest.approx([8 / 6, 0.0, 8 / 18])
    lines = sentiment[0].read_text().splitlines()
    skewed = [ln for ln in lines if '"positive"' in ln] + [ln for ln in lines if '"negative"' in ln][:24]
    data = tmp_path / "skewed.jsonl"
    data.write_text("\n".join(skewed) + "\n")  # 96 positive, 24 negative
    first = {}
    for mode in ("none", "auto"):
        run = apply(rc.load("lora"), tiny_bert, tmp_path / mode)
        events: list[dict] = []
        cfg = TrainConfig(**dict(FAST, epochs=1, max_steps=1, class_weights=mode))
        train_run(run, str(data), str(sentiment[1]), cfg, on_event=events.append)
        first[mode] = next(e["loss"] for e in events if e["kind"] == "step")
        assert _config(run)["class_weights"] == mode
    assert abs(first["auto"] - first["none"]) > 1e-4, first  # the same first batch, weighted differently
    lm = _Data("causal-lm", None, None, None, "", "")
    with pytest.raises(UsageError, match="--class-weights auto: applies to classification tasks, not causal-lm"):
        _set_class_weights(torch.nn.Linear(2, 2), lm, TrainConfig(class_weights="auto"))


def test_min_delta_early_stopping_on_loss(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    from pelt_cli.train_config import is_improvement

    assert is_improvement(0.5, 0.6, False, 0.05) and not is_improvement(0.56, 0.6, False, 0.05)
    assert is_improvement(0.7, 0.6, True, 0.05) and not is_improvement(0.64, 0.6, True, 0.05)
    assert is_improvement(0.61, 0.6, True, 0.0) and not is_improvement(0.6, 0.6, True, 0.0)
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    cfg = TrainConfig(**dict(FAST, epochs=5, patience=1, early_stop_on="loss", min_delta=10.0))
    res = train_run(run, str(sentiment[0]), str(sentiment[1]), cfg)
    # epoch 1 beats +inf; epoch 2 cannot lower the eval loss by 10: one bad epoch, patience 1 → stop
    assert (res.epochs_done, res.best_epoch, res.stopped_early, res.metric_name) == (2, 1, True, "eval_loss")
    assert res.best_metric == res.history[0]["eval_loss"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_log_train_loss_and_grad_norms(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    """--log-every 4: a training row every 4 steps (mean loss, lr, gradient norm per optimizer group before clipping:
    > 0 for the groups that train, the gates absent while gate warm-up freezes them); the eval row carries the gate
    entropy per layer and the prefix activation."""
    import math

    run = apply(rc.load("unipelt"), tiny_bert, tmp_path / "run")
    cfg = TrainConfig(**dict(FAST, epochs=1, log_every=4, gate_warmup=8, max_grad_norm=1e-3))
    train_run(run, str(sentiment[0]), str(sentiment[1]), cfg)
    rows = _metrics(run)
    train = [r for r in rows if is_train_row(r)]
    assert [(r["step"], r["epoch"]) for r in train] == [(4, 1), (8, 1), (12, 1)]  # 192 rows / 16 = 12 steps
    for r in train:
        assert math.isfinite(r["loss"]) and 0.3 < r["loss"] < 1.5 and 0 < r["lr"] <= FAST["lr"]
        assert r["grad_norm"]["modules"] > 1e-3  # measured before clipping to 1e-3
        assert all(math.isfinite(v) and v > 0 for v in r["grad_norm_method"].values())
    assert "gates" not in train[0]["grad_norm"] and "gates" not in train[1]["grad_norm"]  # frozen: steps 1–8
    assert train[2]["grad_norm"]["gates"] > 0 and {"lora", "prefix", "adapter"} <= set(train[2]["grad_norm_method"])
    assert "scale" not in train[2]["grad_norm"]  # no domain adapter: no such group
    (ev,) = [r for r in rows if not is_train_row(r)]
    assert "kind" not in ev and ev["step"] == 12
    doc = json.loads((run / "gates.json").read_text())
    assert set(ev["gate_entropy"]) == set(doc["layers"])
    for site, h in ev["gate_entropy"].items():
        p = [s["mean"] / sum(x["mean"] for x in doc["layers"][site].values()) for s in doc["layers"][site].values()]
        assert 0 <= h <= math.log(3) and abs(h + sum(q * math.log(q) for q in p)) < 1e-9  # one epoch: the same eval
    assert 0 < ev["prefix_activation"] < 1


@pytest.mark.parametrize("recipe_name", ["prefix", "lora"])
def test_prefix_activation_only_with_a_prefix(
    tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path, recipe_name: str
) -> None:
    run = apply(rc.load(recipe_name), tiny_bert, tmp_path / "run")
    train_run(run, str(sentiment[0]), str(sentiment[1]), TrainConfig(**dict(FAST, epochs=1, log_every=0)))
    rows = _metrics(run)
    assert len(rows) == 1 and not is_train_row(rows[0])  # --log-every 0: no training rows
    assert "gate_entropy" not in rows[0]  # no gates
    if recipe_name == "prefix":
        assert 0 < rows[0]["prefix_activation"] < 1
    else:
        assert "prefix_activation" not in rows[0]


def test_max_length_fits_the_position_table(tiny_bert: Path, tmp_path: Path) -> None:
    """Texts longer than the tiny BERT's 64 positions, at the default --max-length 128: trained on 64 tokens (and
    recorded so), not a crash inside the embeddings. The table is read off the model: RoBERTa and MPNet count
    positions from the padding id (64 - 2), GPT-2's wpe holds 64, a rotary LLaMA has no table and keeps 128."""
    import transformers

    from pelt_cli.train import fit_max_length

    words = " ".join(["good film"] * 80)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": words, "label": lab}) + "\n" for lab in ["pos", "neg"] * 6))
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    train_run(run, str(data), str(data), TrainConfig(epochs=1, batch_size=4))
    assert json.loads((run / "run.json").read_text())["training"]["config"]["max_length"] == 64
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100)
    models = {
        62: [
            transformers.RobertaModel(transformers.RobertaConfig(max_position_embeddings=64, pad_token_id=1, **shape)),
            transformers.MPNetModel(transformers.MPNetConfig(max_position_embeddings=64, **shape)),
        ],
        64: [transformers.GPT2Model(transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=4))],
        128: [transformers.LlamaModel(transformers.LlamaConfig(max_position_embeddings=64, **shape))],
    }
    for want, ms in models.items():
        for m in ms:
            assert fit_max_length(TrainConfig(), m).max_length == want, type(m).__name__
            assert fit_max_length(TrainConfig(max_length=32), m).max_length == 32
