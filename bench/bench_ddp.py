"""Two-process data parallelism on the CPU (gloo): torch's DDP, as ``pelt train`` now uses it, vs the hand-rolled
per-parameter ``all_reduce`` it replaced, on UniPELT over the real all-MiniLM-L6-v2.

Run from the repository root, alone (the two ranks take both cores):

    .venv/bin/python bench/bench_ddp.py            # about 2 minutes on the 2-core VM
    .venv/bin/python bench/bench_ddp.py --quick    # a smoke run: fewer rounds

The script launches itself under ``torchrun --nproc-per-node 2``. Each rank holds four copies of the same model
(MiniLM + recipe ``unipelt`` + pelt's mean-pool head, 74 trainable tensors, dropout off) and times one training step
(forward, backward, gradient averaging, AdamW) on its own batch (per rank BATCH × SEQ random token ids):

* ``local``: no communication at all (what the step costs on its own; both ranks still run side by side);
* ``old``: after backward, one blocking ``all_reduce`` per trainable tensor (the code pelt had, kept here only
  as the baseline);
* ``ddp``: ``pelt_cli.distributed.make_engine`` → ``DistributedDataParallel`` (bucketed, overlapped with
  backward);
* ``ddp-unused``: the same with ``find_unused_parameters=True`` (what ``pelt train`` uses only when UniPELT gates
  can go without gradients: ``--gate-warmup``, ``--auto-prune``), for information.

Warm-up steps first, then ROUNDS rounds of STEPS steps per variant, interleaved with the order rotated each round;
medians (over the two ranks' maximum per step). The communication share of a step is
``(median step − median local step) / median step``. Goal: DDP's share ≤ 0.5× the old one's.

The last line of stdout is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

BATCH, SEQ = 8, 64
VARIANTS = ("local", "old", "ddp", "ddp-unused")


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """The baseline: pelt's former gradient averaging, one blocking collective per tensor after backward."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def build(run: Path) -> torch.nn.Module:
    from pelt_cli import heads, surgery
    from pelt_cli.run import Run

    model = Run.open(run).load_model()
    torch.manual_seed(0)
    heads.attach_head(model, {"task": "text-classification", "labels": ["n", "p"], "hidden": 384, "dropout": 0.0})
    surgery.freeze_base(model)
    for m in model.modules():  # no dropout: every variant computes the same function, so their weights compare
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    from pelt_cli.evaluate import compute_loss

    return compute_loss(model, batch, "text-classification")[0]


def worker(run: Path, rounds: int, steps: int, out: Path) -> None:
    from pelt_cli.distributed import dist_info, make_engine
    from pelt_cli.train_config import TrainConfig

    torch.set_num_threads(1)
    rank, world = dist_info(torch.device("cpu"))
    g = torch.Generator().manual_seed(rank)
    batch = {
        "input_ids": torch.randint(1000, 20000, (BATCH, SEQ), generator=g),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "labels": torch.randint(0, 2, (BATCH,), generator=g),
    }
    cfg = TrainConfig(device="cpu")
    models = {k: build(run) for k in VARIANTS}
    fwd = {
        "local": lambda b: loss_fn(models["local"], b),
        "old": lambda b: loss_fn(models["old"], b),
        "ddp": make_engine(models["ddp"], cfg, world, torch.device("cpu")).wrapped,
        "ddp-unused": make_engine(models["ddp-unused"], cfg, world, torch.device("cpu"), find_unused=True).wrapped,
    }
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
    opts = {k: torch.optim.AdamW(params[k], lr=1e-3) for k in VARIANTS}
    n_tensors = len(params["old"])

    def step(k: str) -> float:
        t0 = time.perf_counter()
        loss = fwd[k](batch) if k in ("local", "old") else fwd[k](loss_fn, batch)
        loss.backward()
        if k == "old":
            all_reduce_grads(params[k], world)
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)  # a step ends when both ranks are done
        return float(t)

    for k in VARIANTS:
        step(k), step(k)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for r in range(rounds):
        for k in VARIANTS[r % 4 :] + VARIANTS[: r % 4]:
            times[k] += [step(k) for _ in range(steps)]
    gap = max((a - b).abs().max().item() for a, b in zip(params["old"], params["ddp"], strict=True))
    if rank == 0:
        out.write_text(json.dumps({"times": times, "tensors": n_tensors, "old_vs_ddp_max_abs": gap}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run, rounds, steps, out = args.worker
        worker(Path(run), int(rounds), int(steps), Path(out))
        return
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply
    from pelt_cli.report import resolve_model

    rounds, steps = (2, 2) if args.quick else (6, 3)
    with tempfile.TemporaryDirectory(prefix="pelt-bench-ddp-") as tmp:
        run = apply(rc.load("unipelt"), resolve_model("minilm"), Path(tmp) / "run")
        out = Path(tmp) / "times.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PELT_DIST_BACKEND": "gloo"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29561"]
        cmd += [__file__, "--worker", str(run), str(rounds), str(steps), str(out)]
        t0 = time.time()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"torchrun failed:\n{r.stderr[-3000:]}")
        res = json.loads(out.read_text())
    med = {k: statistics.median(v) for k, v in res["times"].items()}
    share = {k: max(0.0, (med[k] - med["local"]) / med[k]) for k in VARIANTS if k != "local"}
    print(f"UniPELT on MiniLM, {res['tensors']} trainable tensors, 2 ranks × batch {BATCH} × {SEQ}, gloo, CPU")
    print("| variant | median step ms | communication share |\n|---|---|---|")
    for k in VARIANTS:
        print(f"| {k} | {1000 * med[k]:.1f} | {share.get(k, 0.0):.3f} |")
    ratio = share["ddp"] / share["old"] if share["old"] > 0 else float("nan")
    verdict = "PASS" if ratio <= 0.5 else "MISS"
    print(f"* DDP communication share / old: {ratio:.2f}× (goal ≤ 0.5×): {verdict}")
    print(f"* max |Δ| between the old and the DDP weights after the same steps: {res['old_vs_ddp_max_abs']:.2e}")
    summary = {"median_ms": {k: round(1000 * v, 2) for k, v in med.items()}, "share": share, "ratio": ratio}
    summary.update(
        tensors=res["tensors"], old_vs_ddp_max_abs=res["old_vs_ddp_max_abs"], seconds=round(time.time() - t0, 1)
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
