"""Training step time and a method table on the real all-MiniLM-L6-v2: pelt vs HF peft, UniPELT vs LoRA.

Run from the repository root, alone (another busy process on the 2 cores doubles every time):

    .venv/bin/python bench/bench_train_step.py            # about 6 minutes on the 2-core VM
    .venv/bin/python bench/bench_train_step.py --quick    # a smoke run: fewer rounds, 40 training steps a method

(a) Step time — forward + backward + AdamW step — of MiniLM with a classification head (mean pool → Linear,
    2 labels), LoRA r=8, alpha=16, dropout 0 on query and value, batch 32, 128 random token ids, fp32, CPU,
    2 threads: pelt (``pelt apply`` recipe ``lora`` + ``pelt_cli.heads``) vs HF peft (``LoraConfig`` with the same
    modules, the same head class on top). Goal: pelt ≤ 1.05× peft.
(b) UniPELT (recipe ``unipelt``: gated LoRA + prefix 10 + adapter, sigmoid gates) vs pelt LoRA, same step.
    Goal ≤ 1.15× (the paper reports about +5% training time over its parts).
    Both: 2 warm-up steps each, then ROUNDS rounds of STEPS steps per variant, interleaved with the order rotated
    each round; the median step per variant and ratios within the run.
(c) A method table on the built-in ``vader`` dataset (4,746 train / 837 eval rows): pelt's ``train_run`` for
    the recipes lora, adapter, prefix, ia3 and unipelt, and HF peft LoRA trained by a loop written here with the
    same hyper-parameters as ``pelt train``'s defaults (AdamW lr 2e-3, weight decay 0.01, linear schedule with 6%
    warm-up, clipping 1.0, batch 32, 1 epoch, seed 0, the same batches in the same order from pelt's Batcher, the
    same head). Accuracy on the eval split, trainable parameters, ms per step (training + the one evaluation, over
    the steps: the same accounting on both sides).
    Goal: pelt LoRA within ±1 accuracy point of peft LoRA.

The last line of stdout is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pelt_cli import heads, surgery  # noqa: E402
from pelt_cli import recipe as rc  # noqa: E402
from pelt_cli.apply import apply  # noqa: E402
from pelt_cli.report import resolve_model  # noqa: E402
from pelt_cli.run import load_base, load_run  # noqa: E402

HEAD = {"task": "text-classification", "labels": ["negative", "positive"], "hidden": 384, "dropout": 0.1}
LR = 2e-3


def pelt_model(name: str, base: Path, tmp: Path) -> torch.nn.Module:
    run = apply(rc.load(name), base, tmp / name)
    model, _ = load_run(run)
    torch.manual_seed(0)
    heads.attach_head(model, HEAD)
    surgery.freeze_base(model)
    return model.train()


def peft_model(base: Path) -> torch.nn.Module:
    import peft

    model = peft.get_peft_model(
        load_base(base), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    )
    torch.manual_seed(0)
    model.pelt_head = heads.ClassificationHead(HEAD["hidden"], 2, HEAD["dropout"])  # the same head as pelt's
    return model.train()


def loss_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    h = model(**inputs).last_hidden_state
    return torch.nn.functional.cross_entropy(model.pelt_head(h, batch["attention_mask"]), batch["labels"])


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def step_times(models: dict[str, torch.nn.Module], rounds: int, steps: int) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (32, 128), generator=g),
        "attention_mask": torch.ones(32, 128, dtype=torch.long),
        "labels": torch.randint(0, 2, (32,), generator=g),
    }
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR) for k, m in models.items()}

    def step(k: str) -> float:
        t0 = time.perf_counter()
        loss_of(models[k], batch).backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for k in models:
        step(k), step(k)
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for r in range(rounds):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            times[k] += [step(k) for _ in range(steps)]
    return times


def train_peft(base: Path, max_steps: int | None) -> dict:
    """HF peft LoRA through a loop with ``pelt train``'s defaults and pelt's batches (see the docstring)."""
    import transformers

    from pelt_cli.data import Batcher, load_data, resolve_data
    from pelt_cli.train import TrainConfig, evaluate, lr_lambda, seed_all

    cfg = TrainConfig(epochs=1, lr=LR, max_steps=max_steps)
    train_path, eval_path = resolve_data("vader")
    td, ed = load_data(train_path), load_data(eval_path, labels=HEAD["labels"])
    seed_all(cfg.seed)
    model = peft_model(base)
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    tb = Batcher(td, tokenizer=tok, max_length=cfg.max_length)
    eb = Batcher(ed, tokenizer=tok, max_length=cfg.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": LR, "weight_decay": cfg.weight_decay}])
    total = cfg.max_steps or tb.n_batches(cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup * total), cfg.schedule))
    t0, steps = time.perf_counter(), 0
    for batch in tb.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=0):
        loss_of(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if steps >= total:
            break
    model.base_model.model.pelt_head = model.pelt_head  # evaluate() reads model.pelt_head through heads
    metrics, _ = evaluate(model.base_model.model, eb, cfg, "text-classification", torch.device("cpu"), HEAD["labels"])
    seconds = time.perf_counter() - t0  # like pelt's TrainResult.seconds: training plus the evaluation
    return {
        "accuracy": metrics["accuracy"],
        "trainable": trainable(model),
        "step_ms": 1000 * seconds / steps,
        "steps": steps,
    }


def train_pelt(name: str, base: Path, tmp: Path, max_steps: int | None) -> dict:
    from pelt_cli.train import TrainConfig, train_run

    run = apply(rc.load(name), base, tmp / f"table-{name}")
    t0 = time.perf_counter()
    res = train_run(run, "vader", None, TrainConfig(epochs=1, lr=LR, max_steps=max_steps))
    wall = time.perf_counter() - t0
    return {
        "accuracy": res.best_metric,
        "trainable": res.trainable,
        "step_ms": 1000 * res.seconds / max(res.steps, 1),
        "steps": res.steps,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and 40 training steps per method")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = 1 if args.quick else 2
    max_steps = 40 if args.quick else None
    base = resolve_model("minilm")
    t_start = time.time()
    print(f"bench_train_step: MiniLM, 2 threads, load {os.getloadavg()[0]:.2f}; rounds {rounds} × {steps} steps")
    doc: dict = {"bench": "train_step", "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="pelt-bench-train-") as d:
        tmp = Path(d)
        models = {
            "pelt lora": pelt_model("lora", base, tmp),
            "peft lora": peft_model(base),
            "pelt unipelt": pelt_model("unipelt", base, tmp),
        }
        counts = {k: trainable(m) for k, m in models.items()}
        times = step_times(models, rounds, steps)
        med = {k: statistics.median(v) for k, v in times.items()}
        del models
        print("\n(a, b) step time: batch 32 × 128, forward + backward + AdamW")
        print(f"  {'variant':<14} {'trainable':>10} {'median ms':>10} {'ratio':>8}")
        for k in med:
            print(f"  {k:<14} {counts[k]:>10,} {1000 * med[k]:>10.1f} {med[k] / med['pelt lora']:>7.3f}x")
        r_peft = med["pelt lora"] / med["peft lora"]
        r_uni = med["pelt unipelt"] / med["pelt lora"]
        print(f"  pelt lora / peft lora: {r_peft:.3f}x   goal <= 1.05x   {'PASS' if r_peft <= 1.05 else 'MISS'}")
        print(f"  pelt unipelt / pelt lora: {r_uni:.3f}x   goal <= 1.15x   {'PASS' if r_uni <= 1.15 else 'MISS'}")
        doc["step"] = {
            "median_ms": {k: 1000 * v for k, v in med.items()},
            "trainable": counts,
            "pelt_over_peft": r_peft,
            "unipelt_over_lora": r_uni,
        }

        print(f"\n(c) method table on vader: 1 epoch{' (40 steps)' if max_steps else ''}, lr {LR}, batch 32, seed 0")
        table = {
            name: train_pelt(name, base, tmp, max_steps) for name in ("lora", "adapter", "prefix", "ia3", "unipelt")
        }
        table["peft lora"] = train_peft(base, max_steps)
        print(f"  {'method':<10} {'accuracy':>9} {'trainable':>10} {'ms/step':>8} {'vs pelt lora':>13}")
        for k, row in table.items():
            ratio = row["step_ms"] / table["lora"]["step_ms"]
            print(f"  {k:<10} {row['accuracy']:>9.4f} {row['trainable']:>10,} {row['step_ms']:>8.1f} {ratio:>12.3f}x")
        gap = 100 * (table["lora"]["accuracy"] - table["peft lora"]["accuracy"])
        print(
            f"  pelt lora - peft lora: {gap:+.2f} accuracy points   goal within ±1   "
            f"{'PASS' if abs(gap) <= 1 else 'MISS'}"
        )
        doc["table"], doc["accuracy_gap_points"] = table, gap
    doc["seconds"] = round(time.time() - t_start, 1)
    doc["load_end"] = os.getloadavg()[0]
    print(f"\ntotal {doc['seconds']} s; load at end {doc['load_end']:.2f}")
    print(json.dumps(doc, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))


if __name__ == "__main__":
    main()
