"""``pelt inspect --summary`` on a ~20 GB sharded checkpoint, against a plain header-reading loop.

Run from the repository root:

    /work/main/.venv/bin/python bench/bench_inspect_sparse.py

What it builds: a LLaMA-7B-shaped sharded safetensors checkpoint (hidden 4096, intermediate 11008, vocab 32000,
BF16, untied lm_head) with 48 layers instead of 32 so that it reaches ~20 GB (32 layers would be 13.5 GB),
split into shards of at most 4.5 GB, plus ``model.safetensors.index.json`` and ``config.json``. Every shard is a
SPARSE file: a real safetensors header, then ``os.truncate`` to the full size, so the 20 GB take almost no disk.
It first checks free space with ``df``-style ``statvfs`` and that the filesystem really makes sparse files
(``st_blocks`` of a 1 GiB probe), and removes the whole temporary directory (under /tmp) at exit.

What it measures (7 runs each, interleaved, after one warm-up run each; the headers sit in the page cache for
both):
  (a) ``pelt inspect DIR --summary --format json`` as a subprocess (the console script);
  (b) a plain ``python -c`` subprocess with the same interpreter that opens every shard, reads the 8-byte length
      and the JSON header, ``json.loads`` it and sums the parameter counts (the floor: interpreter start-up plus
      the unavoidable header parsing).
  Goal: median(a) <= 2x median(b) AND median(a) <= 0.5 s. Judged in the environment as it is (here
  PYTHONDONTWRITEBYTECODE=1 is set, so pelt_cli's modules, which have no __pycache__, compile on every start).
  For information only, in the same loop: (c) ``python -c "import typer"`` (the floor of any typer CLI), and
  (a) and (b) again with a bytecode cache (PYTHONDONTWRITEBYTECODE unset, PYTHONPYCACHEPREFIX in the temporary
  directory), as an installed package with .pyc files would start; and the slowest imports of the pelt run
  (``-X importtime``, one run).
  It also checks that pelt's ``total_params`` and the plain loop's sum equal the count computed from the layout,
  and, for information, times the in-process call ``pelt_cli.report.inspect_checkpoint(DIR)`` (imports done
  beforehand, so import cost is excluded) and ``pelt_cli.io.checkpoint.open_checkpoint(DIR)`` alone.

The last line of stdout is a JSON object with the numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
PELT = str(BIN / "pelt")

LAYERS = 48  # LLaMA-7B dims, 48 layers -> ~20 GB in BF16
HIDDEN = 4096
INTERMEDIATE = 11008
VOCAB = 32000
DTYPE, DTYPE_BYTES = "BF16", 2
MAX_SHARD = 4_500_000_000
RUNS = 7
GOAL_RATIO = 2.0
GOAL_ABS_S = 0.5
A_K = "(a) pelt inspect DIR --summary --format json"
B_K = "(b) plain python loop: read headers + json.loads"
C_K = 'info: python -c "import typer"'

PLAIN_LOOP = r"""
import json, math, struct, sys, glob, os
total = 0
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.safetensors"))):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        doc = json.loads(f.read(n))
    doc.pop("__metadata__", None)
    total += sum(math.prod(e["shape"]) for e in doc.values())
print(total)
"""


def layout() -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order Hugging Face writes a LLaMA checkpoint."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)),
        ]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def header_bytes(tensors: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """A safetensors header (length + JSON padded with spaces to 8 bytes) and the data size it describes."""
    doc: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * DTYPE_BYTES
        doc[name] = {"dtype": DTYPE, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, pos


def check_sparse_support(d: Path) -> None:
    """Abort unless a 1 GiB truncated file takes (almost) no blocks on this filesystem."""
    probe = d / "sparse-probe"
    with open(probe, "wb") as f:
        f.write(b"x" * 8)
    os.truncate(probe, 1 << 30)
    st = probe.stat()
    probe.unlink()
    if st.st_blocks * 512 > 1 << 20:
        raise SystemExit(
            f"{d}: filesystem does not make sparse files ({st.st_blocks * 512} bytes allocated for "
            "a 1 GiB truncated file); refusing to write 20 GB"
        )


def build(d: Path) -> dict[str, object]:
    """Write the sparse shards, the index and config.json into ``d``; return facts about them."""
    tensors = layout()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        nb = math.prod(shape) * DTYPE_BYTES
        if shards[-1] and used + nb > MAX_SHARD:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nb
    n = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    apparent = allocated = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        head, data = header_bytes(shard)
        path = d / fname
        with open(path, "wb") as f:
            f.write(head)
        os.truncate(path, len(head) + data)
        st = path.stat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
        total_size += data
        weight_map.update({name: fname for name, _ in shard})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (d / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "tie_word_embeddings": False,
                "hidden_size": HIDDEN,
                "intermediate_size": INTERMEDIATE,
                "num_hidden_layers": LAYERS,
                "vocab_size": VOCAB,
                "torch_dtype": "bfloat16",
            },
            indent=2,
        )
        + "\n"
    )
    return {
        "shards": n,
        "tensors": len(tensors),
        "params": sum(math.prod(s) for _, s in tensors),
        "total_size": total_size,
        "apparent_bytes": apparent,
        "allocated_bytes": allocated,
    }


def run_out(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds and stdout of one subprocess run; fails loudly on a non-zero exit."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-2000:]}")
    return dt, r.stdout


def measure(cmds: dict[str, list[str]], env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """One warm-up round, then RUNS rounds; each round runs every command once, in order (interleaved)."""
    for c in cmds.values():
        run_out(c, env)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(RUNS):
        for k, c in cmds.items():
            times[k].append(run_out(c, env)[0])
    return times


def slowest_imports(d: Path, n: int = 8) -> list[tuple[int, str]]:
    """The slowest imports (cumulative us, nesting depth <= 1) of one in-process ``pelt inspect`` run."""
    code = (
        "import sys, os; from pelt_cli.cli import main; sys.stdout = open(os.devnull, 'w'); "
        f"raise SystemExit(main(['inspect', {str(d)!r}, '--summary', '--format', 'json']))"
    )
    r = subprocess.run([PYTHON, "-X", "importtime", "-c", code], capture_output=True, text=True, cwd=ROOT)
    out: list[tuple[int, str]] = []
    for line in r.stderr.splitlines():
        parts = line[len("import time:") :].split("|") if line.startswith("import time:") else []
        if len(parts) != 3 or "cumulative" in line:
            continue
        raw = parts[2].rstrip()[1:]
        if (len(raw) - len(raw.lstrip())) // 2 <= 1:
            out.append((int(parts[1]), raw))
    return sorted(out, reverse=True)[:n]


def check_free_space(tmp_parent: Path) -> None:
    """Print the free space under ``tmp_parent`` and stop when less than 100 MiB is left."""
    vfs = os.statvfs(tmp_parent)
    free = vfs.f_bavail * vfs.f_frsize
    print(f"free space on {tmp_parent}: {free / 1e9:.1f} GB (the sparse checkpoint needs well under 1 MB of it)")
    if free < 100 * 2**20:
        raise SystemExit(f"{tmp_parent}: less than 100 MiB free; not building the checkpoint")


def build_checked(tmp: Path) -> tuple[Path, dict[str, object]]:
    """Build the sparse checkpoint under ``tmp`` (after the sparse-file probe); stop if it is not sparse."""
    d = tmp / "llama-sparse"
    d.mkdir()
    check_sparse_support(tmp)
    facts = build(d)
    print(
        f"built {d}: {facts['shards']} shards, {facts['tensors']} tensors, {facts['params']:,} params, "
        f"{facts['apparent_bytes'] / 1e9:.2f} GB apparent, {facts['allocated_bytes'] / 1e6:.2f} MB allocated"
    )
    if facts["allocated_bytes"] > 64 * 2**20:  # type: ignore[operator]
        raise SystemExit("shards are not sparse; stopping")
    return d, facts


def count_params(pelt_cmd: list[str], plain_cmd: list[str]) -> tuple[int, int]:
    """``total_params`` from pelt's JSON and the plain loop's sum (the correctness check)."""
    _, pelt_out = run_out(pelt_cmd)
    _, plain_out = run_out(plain_cmd)
    return json.loads(pelt_out)["total_params"], int(plain_out.strip())


def time_in_process(d: Path) -> tuple[list[float], list[float]]:
    """Seconds of ``inspect_checkpoint(d)`` and ``open_checkpoint(d)`` in this process, imports excluded."""
    from pelt_cli.io.checkpoint import open_checkpoint
    from pelt_cli.report import inspect_checkpoint

    inspect_checkpoint(d)
    lib_t: list[float] = []
    open_t: list[float] = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        inspect_checkpoint(d)
        lib_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        open_checkpoint(d)
        open_t.append(time.perf_counter() - t0)
    return lib_t, open_t


def run_bench(tmp: Path) -> dict[str, object]:
    """Build the checkpoint in ``tmp``, check the counts and time every command; the raw results."""
    d, facts = build_checked(tmp)
    pelt_cmd = [PELT, "inspect", str(d), "--summary", "--format", "json"]
    plain_cmd = [PYTHON, "-c", PLAIN_LOOP, str(d)]
    pelt_params, plain_params = count_params(pelt_cmd, plain_cmd)
    times = measure({A_K: pelt_cmd, B_K: plain_cmd, C_K: [PYTHON, "-c", "import typer"]})
    pyc_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    pyc_env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    run_out(pelt_cmd, pyc_env)  # fill the cache before measure()'s own warm-up
    times_pyc = measure({A_K: pelt_cmd, B_K: plain_cmd}, pyc_env)
    slow = slowest_imports(d)
    lib_t, open_t = time_in_process(d)
    shutil.rmtree(d)
    return {
        "facts": facts,
        "pelt_params": pelt_params,
        "plain_params": plain_params,
        "times": times,
        "times_pyc": times_pyc,
        "slow": slow,
        "lib_t": lib_t,
        "open_t": open_t,
    }


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    """Medians, ratios and verdicts of :func:`run_bench`'s results."""
    med = {k: statistics.median(v) for k, v in r["times"].items()}
    med_pyc = {k: statistics.median(v) for k, v in r["times_pyc"].items()}
    pm, bm = med[A_K], med[B_K]
    return {
        "med": med,
        "med_pyc": med_pyc,
        "pm": pm,
        "bm": bm,
        "ratio": pm / bm,
        "ratio_pyc": med_pyc[A_K] / med_pyc[B_K],
        "lm": statistics.median(r["lib_t"]),
        "om": statistics.median(r["open_t"]),
        "ratio_ok": pm / bm <= GOAL_RATIO,
        "abs_ok": pm <= GOAL_ABS_S,
        "params_ok": r["pelt_params"] == r["plain_params"] == r["facts"]["params"],
    }


def print_table(r: dict[str, Any], s: dict[str, Any]) -> None:
    """The human-readable report: timings table, PASS/MISS lines and the slowest imports."""
    facts = r["facts"]
    print(
        f"\ninspect --summary on {facts['apparent_bytes'] / 1e9:.1f} GB / {facts['shards']} shards "
        f"({RUNS} runs each, interleaved, medians)"
    )
    print(f"{'what':<72}{'median s':>10}{'min s':>9}{'max s':>9}")
    rows = list(r["times"].items())
    rows += [(f"info, with .pyc cache: {k}", v) for k, v in r["times_pyc"].items()]
    rows += [
        ("info: inspect_checkpoint(DIR) in-process", r["lib_t"]),
        ("info: open_checkpoint(DIR) in-process", r["open_t"]),
    ]
    for label, ts in rows:
        print(f"{label:<72}{statistics.median(ts):>10.3f}{min(ts):>9.3f}{max(ts):>9.3f}")
    print(f"ratio pelt/plain: {s['ratio']:.2f}x   goal <= {GOAL_RATIO}x   {'PASS' if s['ratio_ok'] else 'MISS'}")
    print(f"pelt absolute:    {s['pm']:.3f} s   goal <= {GOAL_ABS_S} s   {'PASS' if s['abs_ok'] else 'MISS'}")
    print(
        f"total_params: pelt {r['pelt_params']:,}  plain loop {r['plain_params']:,}  layout {facts['params']:,}   "
        f"{'PASS' if s['params_ok'] else 'MISS'}"
    )
    print(
        f"info: ratio with .pyc cache {s['ratio_pyc']:.2f}x; pelt minus plain loop = {s['pm'] - s['bm']:.3f} s of "
        f"which the in-process work is {s['lm']:.3f} s; python -c 'import typer' alone takes {s['med'][C_K]:.3f} s"
    )
    print("slowest imports of pelt inspect (cumulative ms, -X importtime, one run; indented = imported by the above):")
    for us, n in r["slow"]:
        print(f"  {us / 1000:8.1f}  {n}")


def result_json(r: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """The last line's JSON object."""
    return {
        "bench": "inspect_sparse",
        "runs": RUNS,
        **r["facts"],
        "pelt_median_s": round(s["pm"], 4),
        "plain_loop_median_s": round(s["bm"], 4),
        "ratio": round(s["ratio"], 3),
        "goal_ratio": GOAL_RATIO,
        "goal_abs_s": GOAL_ABS_S,
        "ratio_pass": s["ratio_ok"],
        "abs_pass": s["abs_ok"],
        "import_typer_median_s": round(s["med"][C_K], 4),
        "pyc_pelt_median_s": round(s["med_pyc"][A_K], 4),
        "pyc_plain_loop_median_s": round(s["med_pyc"][B_K], 4),
        "pyc_ratio": round(s["ratio_pyc"], 3),
        "slowest_imports_ms": {n.strip(): round(us / 1000, 1) for us, n in r["slow"]},
        "inspect_checkpoint_inproc_median_s": round(s["lm"], 5),
        "open_checkpoint_inproc_median_s": round(s["om"], 5),
        "pelt_total_params": r["pelt_params"],
        "plain_total_params": r["plain_params"],
        "params_pass": s["params_ok"],
    }


def main() -> int:
    tmp_parent = Path(tempfile.gettempdir())
    check_free_space(tmp_parent)
    with tempfile.TemporaryDirectory(prefix="pelt-bench-sparse-") as tmp:
        results = run_bench(Path(tmp))
    # TemporaryDirectory removed the rest; make sure
    assert not Path(tmp).exists()
    summary = summarise(results)
    print_table(results, summary)
    print(json.dumps(result_json(results, summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
