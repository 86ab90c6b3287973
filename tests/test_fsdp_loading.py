"""``--fsdp`` loads the base on rank 0 only: two CPU processes under torchrun (gloo), one launch for the whole file.

The other ranks build the model on ``meta`` and receive their shards (and every buffer, rotary ``inv_freq``
included) from rank 0. Checked here: a tiny LLaMA (rotary positions, a sequence-classification head made on rank 0)
trained with FSDP, stopped after epoch 1 and resumed, reaches one process's weights (≤ 1e-6); the same LLaMA stored
in bf16, trained as a causal LM (the meta ranks must take rank 0's stored dtype, not the config's fp32), reaches
DDP's; on a 145 MiB BERT rank 1 makes no ``from_pretrained`` call, and its peak RSS above its post-import baseline,
once its shards are filled, is below rank 0's by more than half the base. BERT's equality with one process (and its
resume) under the same loading is ``test_distributed.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.run import ADAPTER_FILE
from pelt_cli.train import train_run

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import ACCUM, CFG, PER_RANK, ROWS, rows, stopped_and_resumed  # noqa: E402

BIG = dict(hidden_size=256, num_hidden_layers=16, intermediate_size=4096, vocab_size=100)  # 145 MiB of fp32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _with_tokenizer(model: torch.nn.Module, d: Path, words: Path) -> Path:
    model.save_pretrained(d)
    for f in TOKENIZER_FILES:
        if (words / f).is_file():
            shutil.copy(words / f, d / f)
    return d


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, words: Path) -> dict[str, Path]:
    """A tiny LLaMA in fp32 and in bf16, and a BERT of 16 wide blocks (most of its 145 MiB sharded), no dropout."""
    import tiny_models
    import transformers

    d = tmp_path_factory.mktemp("fsdpbases")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(tiny_models.config("llama", pad_token_id=0))
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    big = transformers.BertModel(tiny_models.config("bert", **BIG, **no_dropout))
    return {
        "llama": _with_tokenizer(llama, d / "llama", words),
        "llama-bf16": _with_tokenizer(llama.to(torch.bfloat16), d / "llama-bf16", words),
        "big": _with_tokenizer(big, d / "big", words),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("fsdpdata")
    for name, n, seed in (("train", ROWS, 0), ("eval", 16, 1)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))
    return str(d / "train.jsonl"), str(d / "eval.jsonl")


def test_rank0_loads_fsdp_llama_resumes_and_rank1_holds_shards(
    bases: dict[str, Path], data: tuple[str, str], tmp_path: Path
) -> None:
    runs = {k: apply(rc.load("unipelt"), bases["llama"], tmp_path / k) for k in ("llama", "ref")}
    runs |= {k: apply(rc.load("unipelt"), bases["llama-bf16"], tmp_path / k) for k in ("bf16-fsdp", "bf16-ddp")}
    big = apply(rc.load("lora"), bases["big"], tmp_path / "big")
    shutil.copyfile(runs["bf16-fsdp"] / ADAPTER_FILE, tmp_path / "bf16-start")
    train_run(runs["ref"], *data, dataclasses.replace(CFG, batch_size=2 * PER_RANK))  # one process, same batch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PELT_DIST_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29543"]
    cmd += [__file__, str(big), *(str(runs[k]) for k in ("llama", "bf16-fsdp", "bf16-ddp")), *data, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-4000:]

    # fp32: FSDP, stopped after epoch 1 and resumed, reaches one process's weights. bf16 as a causal LM, one epoch
    # (the meta ranks' skeleton comes in the config's fp32: they must take rank 0's stored bf16): FSDP reaches DDP's
    # (one process differs: bf16 rounds per batch; so does a second epoch, 4e-5, with every rank loading the base too)
    for got, want in (("llama", "ref"), ("bf16-fsdp", "bf16-ddp")):
        worst = _max_diff(runs[got] / ADAPTER_FILE, runs[want] / ADAPTER_FILE)
        assert worst <= 1e-6, f"{got}: max |Δ| {worst:.3g} from {want}"
    assert _max_diff(runs["bf16-fsdp"] / ADAPTER_FILE, tmp_path / "bf16-start") > 1e-3  # it trained
    assert any(k.startswith("pelt_head.") for k in load_file(runs["llama"] / ADAPTER_FILE))  # made on rank 0 only
    assert _max_diff(runs["llama"] / ADAPTER_FILE, tmp_path / "llama.epoch1") > 1e-3  # the resumed epoch trained
    meta = json.loads((runs["llama"] / "run.json").read_text())["training"]
    assert meta["world_size"] == 2 and meta["result"]["epochs_done"] == 2
    assert meta["result"]["steps"] == 2 * ROWS // (2 * PER_RANK * ACCUM)
    assert json.loads((big / "run.json").read_text())["training"]["result"]["steps"] == 1
    _check_memory(bases["big"], tmp_path)


def _max_diff(a: Path, b: Path) -> float:
    got, want = load_file(a), load_file(b)
    assert sorted(got) == sorted(want) and len(got) > 4
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want)


def _check_memory(base: Path, out: Path) -> None:
    """Rank 1 never read the base: it made no ``from_pretrained`` call, and its peak RSS growth until its shards were
    filled is under the base's size and below rank 0's by more than half of it (rank 0: the whole model, then its
    shards too; transformers maps the file, so a rank that loads but never touches the weights would show little)."""
    base_mib = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    assert 120 < base_mib < 200
    mem = [json.loads((out / f"rss-rank{i}.json").read_text()) for i in (0, 1)]
    rank0, rank1 = (m["loaded_mib"] - m["baseline_mib"] for m in mem)
    said = f"rank 0 +{rank0:.0f} MiB, rank 1 +{rank1:.0f} MiB, base {base_mib:.0f} MiB"
    assert rank0 > base_mib, said  # rank 0 held the whole base
    assert rank0 - rank1 > base_mib / 2, said
    assert rank1 < 0.85 * base_mib, said  # its half of the base, a tensor in flight, what the run itself allocates
    assert all(m["peak_mib"] >= m["loaded_mib"] for m in mem)
    # weights read with transformers: under FSDP rank 0 only (big, LLaMA, LLaMA resumed, bf16 LLaMA); DDP: every rank
    assert [m["fsdp_loads"] for m in mem] == [4, 0] and [m["ddp_loads"] for m in mem] == [1, 1]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _worker(big: str, llama: str, bf16_fsdp: str, bf16_ddp: str, train: str, ev: str, out: str) -> None:
    """Under torchrun: the big BERT for one step (peak RSS above the post-import baseline once the shards are
    filled, and at the end, per rank), then the LLaMAs."""
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp  # noqa: F401 - with transformers' BERT code below: what every rank pays anyway
    from transformers import PreTrainedModel

    from pelt_cli import distributed
    from pelt_cli.run import Run

    Run.open(big).skeleton()
    rank, fill, cfg = int(os.environ["RANK"]), distributed.fill_from_rank0, dataclasses.replace(CFG, fsdp=True)
    rss: dict = {"rank": rank, "baseline_mib": _peak_mib(), "from_pretrained": []}
    from_pretrained = PreTrainedModel.from_pretrained.__func__

    def counted(cls: type, path: object, *args: object, **kw: object) -> object:  # every read of a base's weights
        rss["from_pretrained"].append(str(path))
        return from_pretrained(cls, path, *args, **kw)

    PreTrainedModel.from_pretrained = classmethod(counted)

    def measured(*args: object) -> None:
        fill(*args)
        rss["loaded_mib"] = _peak_mib()

    distributed.fill_from_rank0 = measured
    train_run(big, train, ev, dataclasses.replace(cfg, epochs=1, max_steps=1))
    distributed.fill_from_rank0 = fill
    stopped_and_resumed(llama, train, ev, cfg, Path(out) / "llama.epoch1")
    lm = dataclasses.replace(
        cfg, task="causal-lm", epochs=1
    )  # the bare LLaMA: its meta skeleton comes in the config's fp32
    train_run(bf16_fsdp, train, ev, lm)
    rss["fsdp_loads"] = len(rss["from_pretrained"])
    train_run(bf16_ddp, train, ev, dataclasses.replace(lm, fsdp=False))
    rss["ddp_loads"] = len(rss["from_pretrained"]) - rss["fsdp_loads"]
    (Path(out) / f"rss-rank{rank}.json").write_text(json.dumps({**rss, "peak_mib": _peak_mib()}))


if __name__ == "__main__":
    _worker(*sys.argv[1:8])


def test_rank0_failure_reaches_the_other_ranks(bases: dict[str, Path], data: tuple[str, str], tmp_path: Path) -> None:
    """Only rank 0 checks the base's content: when that fails (the base changed after apply), the rank waiting for
    its weights gets rank 0's reason in one line and both exit, instead of blocking in the broadcast."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(bases["llama"], base)
    run = apply(rc.load("lora"), base, tmp_path / "run")
    weights = load_file(base / "model.safetensors")
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 1.0  # same names and shapes (rank 1's check passes), other content
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PELT_DIST_BACKEND": "gloo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29547"]
    cmd += ["-m", "pelt_cli.cli", "train", str(run), "--data", data[0], "--fsdp", "--epochs", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=Path(__file__).parent.parent)
    assert r.returncode != 0
    assert "rank 1: rank 0 could not build the model:" in r.stderr, r.stderr[-3000:]
    assert "differs" in r.stderr or "changed" in r.stderr, r.stderr[-3000:]
