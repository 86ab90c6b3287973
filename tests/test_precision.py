"""Precision and memory in ``pelt train``: bf16 autocast trains with a finite loss, activation checkpointing gives the
gradients of the plain backward, a bf16 base keeps the trained parameters (and the saved adapter) in fp32, peak
memory is recorded, bad values are refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import pelt_main
from safetensors import safe_open

from pelt_cli import recipe as rc
from pelt_cli import surgery
from pelt_cli.apply import apply
from pelt_cli.errors import UsageError
from pelt_cli.precision import Amp, cast_for_training, enable_grad_checkpoint, find_blocks, make_amp, peak_memory
from pelt_cli.run import ADAPTER_FILE, Run
from pelt_cli.train import TrainConfig, train_run

FAST = TrainConfig(epochs=1, batch_size=32, lr=1e-2, warmup=0.0, patience=0, max_length=24, log_every=2, device="cpu")


def test_bf16_autocast_trains_with_finite_loss(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(rc.load("unipelt"), tiny_bert, tmp_path / "run")
    res = train_run(run, str(sentiment[0]), str(sentiment[1]), dataclasses.replace(FAST, precision="bf16"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r] + [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert res.steps == 6 and len(losses) >= 2 and all(0 < v < 10 for v in losses)
    meta = json.loads((run / "run.json").read_text())
    assert meta["training"]["config"]["precision"] == "bf16"
    assert meta["training"]["peak_memory"]["rss_mb"] == pytest.approx(res.peak_memory["rss_mb"], rel=0.5)
    with safe_open(str(run / ADAPTER_FILE), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def _grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    torch.nn.functional.cross_entropy(out.logits, batch["labels"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe_name", ["lora", "unipelt"])
def test_grad_checkpoint_gives_the_same_gradients(tiny_bert: Path, tmp_path: Path, recipe_name: str) -> None:
    import transformers

    from pelt_cli import heads

    run = Run.open(apply(rc.load(recipe_name), tiny_bert, tmp_path / "run"))
    spec = heads.new_head_spec(
        run.base().skeleton(),
        run.meta.base.model_class or "",
        run.insertions,
        "text-classification",
        ["a", "b"],
        False,
        0,
    )
    torch.manual_seed(0)
    model = heads.create_task_model(run.base().directory, spec)
    from pelt_cli.run import inserted_model

    inserted_model(model, run.recipe, spec)
    surgery.freeze_base(model)
    with torch.no_grad():  # LoRA's B and the adapters' up start at 0: give every inserted weight a gradient
        for p in surgery.inserted_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    model.train()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    batch = dict(tok(["a fine film", "the plot was dull and very slow"], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])
    torch.manual_seed(1)
    plain = _grads(model, batch)
    assert enable_grad_checkpoint(model) == "transformers"
    torch.manual_seed(1)
    ckpt = _grads(model, batch)
    inserted = [n for n in plain if surgery.is_inserted(n)]
    assert sorted(plain) == sorted(ckpt) and len(inserted) >= 4
    assert all(plain[n].abs().max() > 0 for n in inserted)
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) <= 1e-5


def test_torch_checkpoint_fallback_on_a_plain_block_list() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(3)])
    net.forward = lambda x: [x := b(x) for b in net.layers][-1]
    assert len(find_blocks(net)) == 3
    x = torch.randn(4, 8)
    net(x).square().sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    assert enable_grad_checkpoint(net) == "torch"
    net(x).square().sum().backward()
    assert max((a - p.grad).abs().max().item() for a, p in zip(plain, net.parameters(), strict=True)) <= 1e-6


def test_bf16_base_keeps_trained_params_fp32(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(rc.load("unipelt"), tiny_bert, tmp_path / "run")
    res = train_run(run, str(sentiment[0]), str(sentiment[1]), dataclasses.replace(FAST, base_dtype="bf16"))
    assert res.steps == 6 and 0 < res.best_metric <= 1
    with safe_open(str(run / ADAPTER_FILE), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert set(dtypes.values()) == {"F32"} and any(k.startswith("pelt_head.") for k in dtypes)
    model = Run.open(run).load_model()  # the base as stored, modules as saved
    cast_for_training(model, "bf16")
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert set(trained.values()) == {torch.float32} and frozen == {torch.bfloat16}


def test_make_amp_and_peak_memory() -> None:
    cpu = torch.device("cpu")
    assert make_amp("fp32", cpu) == Amp("cpu")
    bf = make_amp("bf16", cpu)
    with bf.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    fp16 = make_amp("fp16", cpu)  # torch 2.13 autocasts to fp16 on the CPU too; the scaler comes with it
    assert fp16.scaler is not None and fp16.dtype == torch.float16
    with pytest.raises(UsageError, match="fp16 with --fsdp"):
        make_amp("fp16", cpu, sharded=True)
    assert set(peak_memory(cpu)) == {"rss_mb"} and peak_memory(cpu)["rss_mb"] > 50


def test_fp16_trains_with_the_scaler(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    res = train_run(run, str(sentiment[0]), str(sentiment[1]), dataclasses.replace(FAST, precision="fp16"))
    assert res.steps == 6 and res.history and all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in res.history)


def test_cli_options_and_refusals(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    r = pelt_main("train", str(run), "--data", str(sentiment[0]), "--precision", "fp8")
    assert r.returncode == 2 and "fp8" in r.stderr
    r = pelt_main("train", str(run), "--data", str(sentiment[0]), "--fsdp", "--epochs", "1")
    assert r.returncode == 2 and "--fsdp" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    args = ["--eval", str(sentiment[1]), "--epochs", "1", "--max-steps", "2", "--grad-checkpoint"]
    r = pelt_main("train", str(run), "--data", str(sentiment[0]), *args, "--base-dtype", "bf16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "peak memory: rss" in r.stderr
    meta = json.loads((run / "run.json").read_text())
    assert meta["training"]["config"]["grad_checkpoint"] is True and meta["training"]["config"]["base_dtype"] == "bf16"


def test_audio_features_stay_fp32_under_bf16_autocast(tmp_path: Path) -> None:
    """The Whisper feature extractor computes in torch: under --precision bf16 (CPU autocast) the audio tasks'
    features must still be the fp32 ones (autocast off around them), not a failure or bf16-rounded values."""
    import numpy as np
    import tiny_models
    from fixtures_audio import synth_audio_classes

    from pelt_cli.data import Batcher, feature_extractor_for, load_data

    manifest = synth_audio_classes(tmp_path / "audio", 2, seconds=0.5)
    fe = feature_extractor_for(tiny_models.build("whisper").config)
    td = load_data(manifest)
    plain = Batcher(td, feature_extractor=fe).features(td.rows[0]["audio"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = Batcher(td, feature_extractor=fe).features(td.rows[0]["audio"])
    assert mixed.dtype == np.float32 and mixed.shape == plain.shape and np.array_equal(mixed, plain)
