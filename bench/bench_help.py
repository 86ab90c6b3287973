"""Startup cost of ``pelt --help`` against the floor set by its own dependencies.

Run from the repository root:

    /work/main/.venv/bin/python bench/bench_help.py

What it measures:
  * wall time of the console script ``.venv/bin/pelt --help`` (a subprocess, stdout to /dev/null), and
  * wall time of ``python -c "import typer, rich"`` with the same interpreter (the baseline),
  15 runs each, interleaved (pelt, baseline, ...) after 2 warm-up runs each; it reports the medians and their
  ratio. Goal: ratio <= 1.3x. The judged numbers use the environment as it is (here PYTHONDONTWRITEBYTECODE=1
  is set, so pelt_cli's own modules, which have no __pycache__, are compiled on every start).
  * for information only (not judged), in the same interleaved loop: a minimal two-command typer app with
    ``rich_markup_mode="rich"`` running ``--help`` (written to a temporary file under /tmp), and
    ``python -c "import typer.rich_utils"`` (the module typer needs to draw rich help, which
    ``import typer, rich`` does not load). They show how much of the gap is typer's rich help itself.
  * for information only: pelt and the baseline again with a bytecode cache (PYTHONDONTWRITEBYTECODE unset,
    PYTHONPYCACHEPREFIX pointing at a temporary directory), i.e. as an installed package with .pyc files would
    start. Nothing is written under pelt_cli/.
  * which modules ``pelt --help`` imports (``python -X importtime``): torch and transformers must be absent.
    The slowest imports (cumulative) are listed for information.

Only ratios measured in the same run are judged; the machine is noisy. Temporary files live under /tmp and are
removed at exit. The last line of stdout is a JSON object with the numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
PELT = str(BIN / "pelt")
RUNS = 15
WARMUP = 2
GOAL_RATIO = 1.3
HEAVY = ("torch", "transformers")
PELT_K = "pelt --help"
BASE_K = 'python -c "import typer, rich"'
MINI_K = "info: minimal typer app --help"
RU_K = 'info: python -c "import typer.rich_utils"'
MINI_APP = '''import typer
app = typer.Typer(rich_markup_mode="rich", context_settings={"help_option_names": ["-h", "--help"]})
@app.command()
def a(x: int = 1) -> None:
    """Command a."""
@app.command()
def b(y: str = "") -> None:
    """Command b."""
app()
'''


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds for one run of ``cmd`` (stdout discarded); fails loudly on a non-zero exit."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}")
    return dt


def measure(cmds: dict[str, list[str]], env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """WARMUP then RUNS rounds; each round runs every command once, in order (interleaved)."""
    for _ in range(WARMUP):
        for c in cmds.values():
            wall(c, env)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(RUNS):
        for k, c in cmds.items():
            times[k].append(wall(c, env))
    return times


def import_list() -> tuple[set[str], list[tuple[int, str]]]:
    """Modules imported by ``pelt --help`` (via -X importtime) and the slowest ones by cumulative microseconds."""
    code = "import sys; sys.argv=['pelt','--help']; from pelt_cli.cli import main; raise SystemExit(main(['--help']))"
    r = subprocess.run([PYTHON, "-X", "importtime", "-c", code], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"importtime run exited {r.returncode}: {r.stderr[-2000:]}")
    mods: set[str] = set()
    slow: list[tuple[int, str]] = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3:
            continue
        raw = parts[2].rstrip()[1:]  # one space follows the bar; two more per nesting level
        mods.add(raw.strip())
        depth = (len(raw) - len(raw.lstrip())) // 2
        if depth <= 1:
            slow.append((int(parts[1]), raw))
    return mods, sorted(slow, reverse=True)[:10]


def measure_all() -> tuple[dict, dict]:
    """Interleaved start-up times of every command, and of pelt and the baseline with a .pyc cache."""
    with tempfile.TemporaryDirectory(prefix="pelt-bench-help-") as tmp:
        mini = Path(tmp) / "mini_typer_app.py"
        mini.write_text(MINI_APP, encoding="utf-8")
        cmds = {
            PELT_K: [PELT, "--help"],
            BASE_K: [PYTHON, "-c", "import typer, rich"],
            MINI_K: [PYTHON, str(mini), "--help"],
            RU_K: [PYTHON, "-c", "import typer.rich_utils"],
        }
        times = measure(cmds)
        pyc_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        pyc_env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        return times, measure({PELT_K: cmds[PELT_K], BASE_K: cmds[BASE_K]}, pyc_env)


def main() -> int:
    if not os.access(PELT, os.X_OK):
        raise SystemExit(f"{PELT}: console script not found; run with the project's .venv python")
    times, times_pyc = measure_all()
    med = {k: statistics.median(v) for k, v in times.items()}
    med_pyc = {k: statistics.median(v) for k, v in times_pyc.items()}
    pm, bm = med[PELT_K], med[BASE_K]
    ratio = pm / bm
    ratio_pyc = med_pyc[PELT_K] / med_pyc[BASE_K]

    mods, slow = import_list()
    heavy_found = sorted(n for n in mods if n.split(".")[0] in HEAVY)
    heavy_ok = not heavy_found
    ratio_ok = ratio <= GOAL_RATIO

    print(f"pelt --help startup vs `python -c 'import typer, rich'` ({RUNS} runs each, interleaved, medians)")
    print(f"{'command':<56}{'median s':>10}{'min s':>9}{'max s':>9}{'vs base':>9}")
    for k, v in times.items():
        print(f"{k:<56}{med[k]:>10.3f}{min(v):>9.3f}{max(v):>9.3f}{med[k] / bm:>8.2f}x")
    for k, v in times_pyc.items():
        label = f"info, with .pyc cache: {k}"
        print(f"{label:<56}{med_pyc[k]:>10.3f}{min(v):>9.3f}{max(v):>9.3f}{med_pyc[k] / med_pyc[BASE_K]:>8.2f}x")
    print(f"ratio pelt/baseline: {ratio:.2f}x   goal <= {GOAL_RATIO}x   {'PASS' if ratio_ok else 'MISS'}")
    print(
        f"info: ratio with .pyc cache {ratio_pyc:.2f}x; pelt --help / minimal typer app --help = "
        f"{pm / med[MINI_K]:.2f}x (pelt's own overhead on top of typer's rich help)"
    )
    print(
        f"modules imported by pelt --help: {len(mods)}; torch/transformers: "
        f"{'absent  PASS' if heavy_ok else 'PRESENT  MISS: ' + ', '.join(heavy_found[:10])}"
    )
    print("slowest imports of pelt --help (cumulative ms, -X importtime, one run; indented = imported by the above):")
    for us, n in slow:
        print(f"  {us / 1000:8.1f}  {n}")
    print(
        json.dumps(
            {
                "bench": "help",
                "runs": RUNS,
                "pelt_help_median_s": round(pm, 4),
                "baseline_median_s": round(bm, 4),
                "ratio": round(ratio, 3),
                "goal_ratio": GOAL_RATIO,
                "ratio_pass": ratio_ok,
                "mini_typer_help_median_s": round(med[MINI_K], 4),
                "typer_rich_utils_import_median_s": round(med[RU_K], 4),
                "ratio_vs_mini_typer_app": round(pm / med[MINI_K], 3),
                "pyc_pelt_help_median_s": round(med_pyc[PELT_K], 4),
                "pyc_baseline_median_s": round(med_pyc[BASE_K], 4),
                "pyc_ratio": round(ratio_pyc, 3),
                "heavy_imports": heavy_found,
                "no_heavy_imports_pass": heavy_ok,
                "modules_imported": len(mods),
                "slowest_imports_ms": {n.strip(): round(us / 1000, 1) for us, n in slow},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
