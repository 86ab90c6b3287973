"""Two CPU processes under torchrun (gloo): DDP and FSDP2 train to the weights one process reaches on the same global
batch (≤ 1e-6), gradient accumulation included, and ``--resume`` continues exactly under both.

One torchrun launch runs this file as its worker (``__main__`` below): per engine, one epoch, then a resumed second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.errors import UsageError
from pelt_cli.run import ADAPTER_FILE
from pelt_cli.train import TrainConfig, train_run

WORDS = ["good", "great", "fun", "bad", "awful", "dull", "the", "film", "was", "plot", "show", "very"]
ROWS, PER_RANK, ACCUM = 48, 4, 2  # 48 rows, global batch 2 × 4 × accumulation 2 = 16: 3 optimizer steps an epoch
CFG = TrainConfig(
    epochs=2, batch_size=PER_RANK, grad_accum=ACCUM, lr=1e-2, warmup=0.0, patience=0, max_length=16, log_every=1
)
CFG = dataclasses.replace(CFG, early_stop_on="loss", device="cpu", gate_warmup=2)  # DDP: gates unused, then used


def rows(n: int, seed: int) -> list[dict]:
    """Sentences of exactly five one-token words: every batch has the same length, so no rank pads differently."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(WORDS[6:]) for _ in range(4)]
        words.insert(rng.randint(0, 4), rng.choice(WORDS[:3] if label else WORDS[3:6]))
        out.append({"text": " ".join(words), "label": "positive" if label else "negative"})
    return out


@pytest.fixture(scope="module")
def still_bert(tmp_path_factory: pytest.TempPathFactory, minilm: Path) -> Path:
    """A tiny BERT without dropout (ranks and a single process then compute the same function)."""
    import tiny_models
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("stillbert") / "bert"
    cfg = tiny_models.config("bert", vocab_size=30522, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / f, d / f)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("ddpdata")
    paths = []
    for name, n, seed in (("train", ROWS, 0), ("eval", 16, 1)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))
        paths.append(str(d / f"{name}.jsonl"))
    return paths[0], paths[1]


def test_ddp_and_fsdp_match_one_process_and_resume(still_bert: Path, data: tuple[str, str], tmp_path: Path) -> None:
    runs = {k: apply(rc.load("unipelt"), still_bert, tmp_path / k) for k in ("ddp", "fsdp")}
    refs = {k: apply(rc.load("unipelt"), still_bert, tmp_path / f"ref-{k}") for k in runs}
    one = dataclasses.replace(CFG, batch_size=2 * PER_RANK)  # the same global batch in one process
    for ref in refs.values():
        train_run(ref, data[0], data[1], one)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PELT_DIST_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541"]
    cmd += [__file__, str(runs["ddp"]), str(runs["fsdp"]), *data]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-4000:]
    for kind, run in runs.items():
        got, want = load_file(run / ADAPTER_FILE), load_file(refs[kind] / ADAPTER_FILE)
        assert sorted(got) == sorted(want) and len(got) > 4  # the same adapter layout as one process writes
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        assert worst <= 1e-6, f"{kind}: max |Δ| {worst:.3g}"
        moved = max((got[k] - v).abs().max().item() for k, v in load_file(tmp_path / f"{kind}.epoch1").items())
        assert moved > 1e-3  # the resumed epoch trained (the final weights are not epoch 1's)
        meta = json.loads((run / "run.json").read_text())
        assert meta["training"]["world_size"] == 2 and meta["training"]["result"]["epochs_done"] == 2
        assert meta["training"]["result"]["steps"] == 2 * ROWS // (2 * PER_RANK * ACCUM)
        assert meta["training"]["peak_memory"]["rss_mb"] > 50
        evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        refs_eval = [json.loads(x) for x in (refs[kind] / "metrics.jsonl").read_text().splitlines()]
        e1, e2 = ([x["eval_loss"] for x in m if "eval_loss" in x and "partial" not in x] for m in (evals, refs_eval))
        assert len(e1) == 2 and max(abs(a - b) for a, b in zip(e1, e2, strict=True)) < 1e-5


def test_fsdp_needs_torchrun(still_bert: Path, data: tuple[str, str], tmp_path: Path) -> None:
    run = apply(rc.load("lora"), still_bert, tmp_path / "run")
    with pytest.raises(UsageError, match="--fsdp: shards over processes"):
        train_run(run, data[0], data[1], dataclasses.replace(CFG, fsdp=True, epochs=1))


def _worker(ddp_run: str, fsdp_run: str, train: str, ev: str) -> None:
    """Under torchrun: for each engine, train, stop after the first epoch, keep those weights aside, resume."""
    for run, fsdp in ((ddp_run, False), (fsdp_run, True)):
        epoch1 = Path(run).parent / f"{'fsdp' if fsdp else 'ddp'}.epoch1"
        stopped_and_resumed(run, train, ev, dataclasses.replace(CFG, fsdp=fsdp), epoch1)


def stopped_and_resumed(run: str, train: str, ev: str, cfg: TrainConfig, epoch1: Path) -> None:
    """Under torchrun: train, stop every rank right after the first epoch's checkpoint (as a kill would), keep its
    weights aside at ``epoch1`` (rank 0), then resume for the second epoch."""
    from pelt_cli import train as trainer

    checkpoint = trainer._checkpoint

    def stop_after_first(lp: object, st: dict, *args: object, **kw: object) -> None:
        checkpoint(lp, st, *args, **kw)
        if st["epoch"] == 1:
            raise KeyboardInterrupt

    trainer._checkpoint = stop_after_first
    try:
        train_run(run, train, ev, cfg)
    except KeyboardInterrupt:
        pass
    trainer._checkpoint = checkpoint
    if int(os.environ["RANK"]) == 0:
        shutil.copyfile(Path(run) / ADAPTER_FILE, epoch1)
    train_run(run, train, ev, cfg, resume=True)


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
