"""Reading and training on a large JSONL file: pelt's Arrow path (pelt_cli/datasource.py) vs the in-memory reader.

Run from the repository root, alone:

    .venv/bin/python bench/bench_data.py --workdir /var/tmp                 # the 2 GB case: ~5 minutes, 2 cores
    .venv/bin/python bench/bench_data.py --size-mb 200 --workdir /var/tmp   # a quick run (about a minute)

It writes a JSONL file of SIZE MB (text-classification rows: 150–250 characters of text and one of three labels;
a block of 20,000 random rows repeated) under a temporary directory, then runs each case in a fresh process and
reads its peak RSS (``ru_maxrss`` of the child from wait4, which counts the pages of memory-mapped files it has
mapped too: shared libraries, and Arrow pages read since pelt last released them, see pelt_cli/datasource.py) and
the peak of its anonymous memory (``RssAnon``, sampled every 20 ms):

1. baseline: ``load_data`` with the in-memory reader (``PELT_ARROW_BYTES`` above the file size), then one pass
   over the rows — what pelt did before this change;
2. arrow, cold cache: ``load_data`` through Arrow, converting the file into an empty cache, then one pass;
3. arrow, warm cache: the same again (the conversion is reused);
4. train: ``pelt train`` of a LoRA run on a tiny BERT (2 layers, width 32) with ``--max-steps 50 --batch-size 32``
   on the file and a 2,000-row ``--eval`` file (the Arrow path with a warm conversion cache; above 500,000 rows the
   text is tokenized per batch as the steps read it, so nothing waits for the whole file), peak RSS.

Goals (the issue's): training on a 2 GB JSONL keeps peak RSS under 1.5 GB; rows/s reported against the baseline.
The last line of stdout is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

READ = """
import sys, time, resource
from pelt_cli.data import load_data
t = time.perf_counter()
td = load_data(sys.argv[1])
t_load = time.perf_counter() - t
n = 0
for r in td.rows:
    n += len(r["text"]) > 0
t_all = time.perf_counter() - t
print(len(td.rows), n, t_load, t_all, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_jsonl(path: Path, size_mb: int) -> int:
    """Rows of 150–250 characters of text until the file holds ``size_mb`` MB; returns the row count. A block of
    20,000 random rows is made once and written again and again (the readers see the same bytes per row as with
    all-random rows; writing 2 GB takes seconds instead of minutes)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    lines = []
    for _ in range(20000):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(40, 60)))
        lines.append(json.dumps({"text": text[: rng.randint(150, 250)], "label": rng.choice("abc")}))
    block = ("\n".join(lines) + "\n").encode()
    target, n = size_mb * 10**6, 0
    with open(path, "wb") as f:
        while f.tell() < target:
            f.write(block)
            n += len(lines)
    return n


def child(code: list[str], env: dict[str, str]) -> tuple[str, float, dict[str, int]]:
    """Run a child; its stdout, wall seconds and memory peaks in bytes: ``rss`` (``ru_maxrss`` from wait4: anonymous
    memory plus the file pages it mapped, e.g. a memory-mapped Arrow file, which the kernel can drop at will) and
    ``anon`` (the peak of its anonymous memory, ``RssAnon``, sampled every 20 ms)."""
    t = time.perf_counter()
    proc = subprocess.Popen(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        anon = max(anon, _rss_anon(proc.pid))
        time.sleep(0.02)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(code)}\n{err[-2000:]}")
    return out, time.perf_counter() - t, {"rss": usage.ru_maxrss * 1024, "anon": anon}


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def read_case(data: Path, env: dict[str, str]) -> dict:
    out, wall, mem = child([PY, "-c", READ, str(data)], env)
    rows, _, t_load, t_all, _ = out.split()
    return {
        "rows": int(rows),
        "load_s": float(t_load),
        "pass_s": float(t_all),
        "wall_s": wall,
        "peak_rss": mem["rss"],
        "peak_anon": mem["anon"],
    }


def train_case(data: Path, work: Path, env: dict[str, str]) -> dict:
    base = work / "tiny-bert"
    if not base.exists():  # the test suite's tiny BERT (width 32, 2 layers) with MiniLM's tokenizer, no download
        sys.path.insert(0, str(ROOT / "tests"))
        import transformers
        from tiny_models import config

        from pelt_cli.report import resolve_model

        transformers.BertModel(config("bert", vocab_size=30522)).save_pretrained(base)
        minilm = resolve_model("minilm")
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(minilm / f, base / f)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    pelt = [PY, "-m", "pelt_cli.cli"]
    child([*pelt, "apply", "lora", str(base), "-o", str(run)], env)
    ev = work / "eval.jsonl"
    with open(data) as src, open(ev, "w") as dst:
        dst.writelines(line for _, line in zip(range(2000), src, strict=False))
    args = ["train", str(run), "--data", str(data), "--eval", str(ev), "--max-steps", "50", "-q"]
    _, wall, mem = child([*pelt, *args, "--batch-size", "32", "--epochs", "1", "--max-length", "64"], env)
    return {"wall_s": wall, "peak_rss": mem["rss"], "peak_anon": mem["anon"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pelt-bench-data-", dir=args.workdir))
    try:
        data = work / "big.jsonl"
        t = time.perf_counter()
        n = write_jsonl(data, args.size_mb)
        size = data.stat().st_size
        print(f"wrote {data}: {size / 1e9:.2f} GB, {n:,} rows in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(work / "cache"), "PYTHONPATH": str(ROOT)}
        res: dict = {"size_bytes": size, "rows": n}
        res["baseline"] = read_case(data, {**env, "PELT_ARROW_BYTES": str(size + 1)})
        res["arrow_cold"] = read_case(data, {**env, "PELT_ARROW_BYTES": "0"})
        res["arrow_warm"] = read_case(data, {**env, "PELT_ARROW_BYTES": "0"})
        if not args.skip_train:
            res["train"] = train_case(data, work, {**env, "PELT_ARROW_BYTES": "0"})
        report(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(res: dict) -> None:
    gb = 1e9
    print(f"{'case':22} {'load s':>8} {'load+pass s':>12} {'rows/s':>10} {'peak RSS GB':>12} {'peak anon GB':>13}")
    for case in ("baseline", "arrow_cold", "arrow_warm"):
        r = res[case]
        r["rows_per_s"] = r["rows"] / r["pass_s"]
        print(
            f"{case:22} {r['load_s']:8.1f} {r['pass_s']:12.1f} {r['rows_per_s']:10,.0f} "
            f"{r['peak_rss'] / gb:12.2f} {r['peak_anon'] / gb:13.2f}"
        )
    for case in ("arrow_cold", "arrow_warm"):
        r = res[case]
        r["rss_vs_baseline"] = r["peak_rss"] / res["baseline"]["peak_rss"]
        speed = r["rows_per_s"] / res["baseline"]["rows_per_s"]
        print(f"{case}: peak RSS {r['rss_vs_baseline']:.2f}× baseline, rows/s {speed:.2f}× baseline")
    if "train" in res:
        t = res["train"]
        print(
            f"train (50 steps, warm cache): {t['wall_s']:.0f} s, peak RSS {t['peak_rss'] / gb:.2f} GB, of it "
            f"anonymous {t['peak_anon'] / gb:.2f} GB (the rest: mapped file pages, shared libraries and Arrow)"
        )
        for what, key in (("RSS", "peak_rss"), ("anonymous memory", "peak_anon")):
            ok = t[key] < 1.5 * 2**30
            print(f"  goal: {what} < 1.5 GiB training on the file: {'PASS' if ok else 'MISS'}")
    print(json.dumps(res))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
