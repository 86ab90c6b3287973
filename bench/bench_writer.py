"""Write throughput of pelt's checkpoint writers against ``safetensors.torch.save_file`` and ``dd``.

Run from the repository root:

    /work/main/.venv/bin/python bench/bench_writer.py            # 3 rounds
    /work/main/.venv/bin/python bench/bench_writer.py --rounds 5 # more rounds: steadier medians on a noisy disk

What it measures: 1 GiB of random tensors (16 tensors of 64 MiB: 8 float32 [4096, 4096] and 8 bfloat16
[8192, 4096], made with torch, seed 0) written to /work/main/bench/out (same disk as the repository; created
as needed; the script works in a fresh subdirectory that it removes at exit, even on errors, and removes
bench/out too if it created it and it is empty) four ways, each durable on return:
  (a) ``safetensors.torch.save_file(tensors, path)`` followed by ``os.fsync`` of the file (timed too);
  (b) pelt's ``ShardedWriter(out_dir, specs, max_shard_size=None)`` + ``w.write(name, tensor)`` for each tensor
      (writes into a temporary sibling directory, fsyncs, renames into place, fsyncs the parent directory);
  (b') pelt's single-file ``pelt_cli.io.writer.save_file(tensors, path)`` (temporary name, fsync, rename);
  (c) ``dd if=/dev/zero of=FILE bs=16M count=64 conv=fsync``: what the disk can take, for reference.
One untimed warm-up write, then 3 rounds, each round running every method once (interleaved, the order rotated
by one each round so that no method always goes first); each output is deleted (untimed) before the next
method runs. Nothing is dropped from the page cache (no privileges for that); every method ends with fsync,
so every method pays for its bytes reaching the disk. It reports the median MB/s (10^6 bytes of file per
second) of each, a split of each Python method into "write" (until the data is handed to the kernel) and
"fsync/commit" (the rest), and the ratio pelt ShardedWriter / safetensors save_file.
Goal: pelt's ShardedWriter >= 2x save_file's MB/s. Then it reloads both pelt outputs with
``safetensors.torch.load_file`` and checks every tensor is bit-identical (``torch.equal``, same dtype/shape).

The last line of stdout is a JSON object with the numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save_file as st_save_file

from pelt_cli.io.header import TensorSpec, safetensors_dtype
from pelt_cli.io.writer import ShardedWriter
from pelt_cli.io.writer import save_file as pelt_save_file

OUT = Path(__file__).resolve().parent / "out"
ROUNDS = 3
GOAL_RATIO = 2.0
N_F32 = N_BF16 = 8
MIB = 2**20

ST = "(a) safetensors.torch.save_file + fsync"
SW = "(b) pelt ShardedWriter"
PS = "(b') pelt checkpoint.save_file"
DD = "(c) dd bs=16M count=64 conv=fsync"


def make_tensors() -> dict[str, torch.Tensor]:
    """16 x 64 MiB of random data: float32 and bfloat16."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for i in range(N_F32):
        out[f"layers.{i}.f32.weight"] = torch.randn(4096, 4096, generator=g, dtype=torch.float32)
    for i in range(N_BF16):
        out[f"layers.{i}.bf16.weight"] = torch.randn(8192, 4096, generator=g, dtype=torch.float32).to(torch.bfloat16)
    assert all(t.numel() * t.element_size() == 64 * MIB for t in out.values())
    return out


def run_st(tensors: dict[str, torch.Tensor], dest: Path) -> tuple[float, float, Path]:
    t0 = time.perf_counter()
    st_save_file(tensors, str(dest))
    t1 = time.perf_counter()
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return t1 - t0, time.perf_counter() - t1, dest


def run_sharded(tensors: dict[str, torch.Tensor], dest: Path) -> tuple[float, float, Path]:
    t0 = time.perf_counter()
    specs = [TensorSpec(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    w = ShardedWriter(dest, specs, max_shard_size=None)
    with w:
        for n, t in tensors.items():
            w.write(n, t)
        t1 = time.perf_counter()
    return t1 - t0, time.perf_counter() - t1, dest / "model.safetensors"


def run_pelt_save(tensors: dict[str, torch.Tensor], dest: Path) -> tuple[float, float, Path]:
    # one call: the fsync happens inside, so "write" holds everything; split it with a profile if needed
    t0 = time.perf_counter()
    pelt_save_file(tensors, dest)
    return time.perf_counter() - t0, 0.0, dest


def run_dd(dest: Path) -> tuple[float, float, Path]:
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={dest}", "bs=16M", "count=64", "conv=fsync"], check=True, capture_output=True
    )
    return time.perf_counter() - t0, 0.0, dest


def remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def verify(tensors: dict[str, torch.Tensor], path: Path) -> tuple[bool, str]:
    """Reload with safetensors and compare every tensor bit for bit."""
    got = load_file(str(path))
    if set(got) != set(tensors):
        return False, f"names differ: {sorted(set(got) ^ set(tensors))[:5]}"
    for n, t in tensors.items():
        g = got[n]
        if g.dtype != t.dtype or g.shape != t.shape or not torch.equal(g, t):
            return False, f"{n}: differs (dtype {g.dtype} vs {t.dtype}, shape {tuple(g.shape)} vs {tuple(t.shape)})"
    return True, f"{len(tensors)} tensors bit-identical"


def write_once(key: str, tensors: dict[str, torch.Tensor], dest: Path) -> tuple[float, float, Path]:
    """One timed write with method ``key``: (write s, fsync/commit s, the output file)."""
    if key == ST:
        return run_st(tensors, dest.with_suffix(".safetensors"))
    if key == SW:
        return run_sharded(tensors, dest)
    if key == PS:
        return run_pelt_save(tensors, dest.with_suffix(".safetensors"))
    return run_dd(dest.with_suffix(".bin"))


def run_rounds(
    tensors: dict[str, torch.Tensor], work: Path
) -> tuple[dict[str, list[tuple[float, float, int]]], Path, Path]:
    """ROUNDS interleaved rounds of every method; the results and the last round's two pelt outputs."""
    methods = [ST, SW, PS, DD]
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in methods}
    for r in range(ROUNDS):
        for key in methods[r % 4 :] + methods[: r % 4]:  # rotate the order so no method is always first
            dest = work / f"{key[1 : key.index(')')].replace(chr(39), 'p')}-{r}"
            w, f, path = write_once(key, tensors, dest)
            size = path.stat().st_size
            results[key].append((w, f, size))
            last_round = r == ROUNDS - 1  # keep the last round's pelt outputs for verify()
            if last_round and key == SW:
                sw_path = path
            elif last_round and key == PS:
                ps_path = path
            else:
                remove(path.parent if key == SW else path)
    return results, sw_path, ps_path


def print_table(results: dict[str, list[tuple[float, float, int]]], med: dict[str, float]) -> None:
    """MB/s, total, write and fsync seconds of every method, and the ratios."""
    ratio, ratio_ps = med[SW] / med[ST], med[PS] / med[ST]
    print(f"{'method':<42}{'MB/s':>8}{'total s':>9}{'write s':>9}{'fsync s':>9}{'runs MB/s':>24}")
    for k, rs in results.items():
        tot = statistics.median(w + f for w, f, _ in rs)
        wr = statistics.median(w for w, _, _ in rs)
        fs = statistics.median(f for _, f, _ in rs)
        split = f"{wr:>9.2f}{fs:>9.2f}" if k in (ST, SW) else f"{'-':>9}{'-':>9}"
        runs = " ".join(f"{size / (w + f) / 1e6:.0f}" for w, f, size in rs)
        print(f"{k:<42}{med[k]:>8.0f}{tot:>9.2f}{split}{runs:>24}")
    print(
        f"ratio pelt ShardedWriter / safetensors save_file: {ratio:.2f}x   goal >= {GOAL_RATIO}x   "
        f"{'PASS' if ratio >= GOAL_RATIO else 'MISS'}"
    )
    print(
        f"info: pelt save_file / safetensors save_file: {ratio_ps:.2f}x;  "
        f"ShardedWriter / dd: {med[SW] / med[DD]:.2f}x;  safetensors save_file / dd: {med[ST] / med[DD]:.2f}x"
    )


def result_json(
    results: dict[str, list[tuple[float, float, int]]], med: dict[str, float], data_bytes: int, ok_sw: bool, ok_ps: bool
) -> dict[str, object]:
    """The last line's JSON object."""
    ratio = med[SW] / med[ST]
    return {
        "bench": "writer",
        "rounds": ROUNDS,
        "bytes": data_bytes,
        "mb_per_s": {
            "safetensors_save_file_fsync": round(med[ST], 1),
            "pelt_sharded_writer": round(med[SW], 1),
            "pelt_save_file": round(med[PS], 1),
            "dd_conv_fsync": round(med[DD], 1),
        },
        "runs_s": {k.split(" ", 1)[1]: [round(w + f, 3) for w, f, _ in rs] for k, rs in results.items()},
        "ratio_sharded_writer_vs_save_file": round(ratio, 3),
        "ratio_pelt_save_file_vs_save_file": round(med[PS] / med[ST], 3),
        "goal_ratio": GOAL_RATIO,
        "ratio_pass": ratio >= GOAL_RATIO,
        "bit_identical_sharded_writer": ok_sw,
        "bit_identical_pelt_save_file": ok_ps,
    }


def bench(work: Path) -> None:
    """Warm up, run the rounds in ``work``, print the table, verify both pelt outputs and print the JSON."""
    vfs = os.statvfs(work)
    free = vfs.f_bavail * vfs.f_frsize
    if free < 4 * 2**30:
        raise SystemExit(f"{OUT}: only {free / 2**30:.1f} GiB free, need 4 GiB")
    tensors = make_tensors()
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(
        f"writing {len(tensors)} tensors, {data_bytes / 2**30:.2f} GiB, to {work} "
        f"({ROUNDS} rounds, interleaved, fsync in every method)"
    )
    # untimed warm-up: the first large write of a process pays for faulting in page-cache pages
    _, _, p = run_pelt_save(tensors, work / "warmup.safetensors")
    p.unlink()
    results, sw_path, ps_path = run_rounds(tensors, work)
    med = {k: statistics.median(size / (w + f) / 1e6 for w, f, size in rs) for k, rs in results.items()}
    print_table(results, med)
    ok_sw, msg_sw = verify(tensors, sw_path)
    ok_ps, msg_ps = verify(tensors, ps_path)
    for what, ok_v, msg in (("ShardedWriter", ok_sw, msg_sw), ("pelt save_file", ok_ps, msg_ps)):
        print(f"reload {what} output with safetensors.torch.load_file: {msg}   {'PASS' if ok_v else 'MISS'}")
    print(json.dumps(result_json(results, med, data_bytes, ok_sw, ok_ps)))


def main() -> int:
    global ROUNDS
    if "--rounds" in sys.argv:
        ROUNDS = int(sys.argv[sys.argv.index("--rounds") + 1])
    torch.set_num_threads(1)
    created = not OUT.exists()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-writer-", dir=OUT))
    try:
        bench(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                OUT.rmdir()  # only if empty
    return 0


if __name__ == "__main__":
    sys.exit(main())
