"""``pelt merge`` (streamed LoRA fold) against HF peft and ``cp``; latency after merge; diffed bundle sizes.

Run from the repository root:

    .venv/bin/python bench/bench_merge.py                  # 3.3 GB checkpoint, 3 rounds: about 6 min on the 2-core VM
    .venv/bin/python bench/bench_merge.py --quick          # 0.3 GB checkpoint, 1 round: smoke check, < 2 min
    .venv/bin/python bench/bench_merge.py --size-gb 6 --rounds 5 --workdir /var/tmp/pbm --keep
    .venv/bin/python bench/bench_merge.py --cold --merge-only     # page cache dropped before each method (root)

Run it alone: another process on the same 2 cores stretches every time (the load averages are printed).

What it measures:

1. Merge throughput and memory. A LLaMA-shaped checkpoint with random weights, BF16, written tensor by tensor with
   ``safetensors.torch.save_file`` (never held whole) into ~1 GB shards plus an index: hidden 2048, intermediate
   5504, 16 heads (no GQA), vocab 32000, untied ``lm_head``, as many layers as ``--size-gb`` needs (default 3.2 →
   30 layers, 3.30 GB, 1.65 B params; the largest tensor is the 131 MB embedding). ``--quick``: hidden 1024,
   intermediate 2752, 8 heads, 7 layers, 0.31 GB. A run of LoRA r=8, alpha=16 on q, k, v, o, gate, up and down of
   every layer is made with ``pelt_cli.apply.apply``; its B matrices (zero at init) are drawn from N(0, 0.01²) and
   saved back with safetensors, and the run is exported with ``pelt_cli.peft_format.export_peft``. The checkpoint,
   run and PEFT adapter are built once and cached in ``--workdir`` (default /tmp/pelt-bench-merge). Timed, each in a
   fresh ``python`` subprocess (wall time from spawn to exit, imports included; peak RSS from ``os.wait4``):
     * pelt: ``merge_run(run, out)``, what ``pelt merge RUN -o OUT`` calls. It checks the base's content
       fingerprint, which is cached per file identity once computed (``pelt apply`` does, on a base whose files are
       older than 2 s): before timing, the bench computes it for both bases, as after a usual ``pelt apply``;
     * info, pelt on a base whose fingerprint is not cached (``PELT_FINGERPRINT_CACHE=0``: the first merge of a base
       never fingerprinted): every byte of the base is also hashed (BLAKE2b) while it streams;
     * pelt on a second checkpoint with half the layers (same tensor shapes, ~0.55x the bytes): RSS flatness;
     * peft: ``AutoModelForCausalLM.from_pretrained(base)`` (BF16, from config.json) + ``PeftModel.from_pretrained``
       + ``merge_and_unload()`` + ``save_pretrained(out)``;
     * ``cp -r base out``: the disk's limit.
   pelt fsyncs its output; peft and cp do not, so every method is followed by an fsync of each output file, timed
   by the parent and added to its wall time (durable output for all three; the fsync share is shown). Hot cache
   (default): before timing, the base checkpoints are read once, so every method reads them from the page cache.
   ``--cold``: ``sync; echo 3 > /proc/sys/vm/drop_caches`` before each method (needs root), so each reads the base
   from disk. Rounds interleave the methods, the order rotated each round; each output is deleted right after it
   is measured; medians over rounds. Marginal throughput: the extra bytes of the full checkpoint over the half one
   divided by the extra time pelt takes for them (start-up cancels out), against cp's GB/s.
   Peak RSS: a Python child's own VmHWM (``/proc/self/status``, its image since exec: ``wait4``'s ``ru_maxrss``
   also counts the bench parent's pages at the fork, about 240 MB with torch imported); ``cp``: ``ru_maxrss``, an
   upper bound for that reason.
   Goals: peft wall / pelt wall >= 3x; pelt GB/s / cp GB/s >= 0.5x; pelt's marginal GB/s / cp GB/s >= 0.7x;
   pelt peak RSS (max over rounds) <= 3 x largest
   tensor + 300 MB; pelt's median peak RSS on the half checkpoint within 10% of the full one's (flat in checkpoint
   size; medians because single runs vary by ~+-100 MB). For information, the peak RSS of merge_run's set-up alone
   (imports, plan, adapter; no base tensor read), 2 runs, max. This run is plain LoRA on a llama, so merge_run takes
   its light path: planned from run.json and the headers, folded in numpy, no torch or transformers import (the
   split line says whether the child imported torch).
   Correctness (first round): a few merged tensors of pelt and peft compared with each other and with an fp32
   reference ``bf16(W + (alpha/r) B A)``: max |Δ| within 2 BF16 ulps of the tensor's largest weight; untouched
   tensors bit-identical to the base.
2. Latency after merge, on the real all-MiniLM-L6-v2 (offline, short name ``minilm``): recipe ``lora`` applied, B
   randomised, ``merge_run`` into a plain checkpoint (``verify_merge`` against the unmerged run: max |Δ| <= 1e-4),
   then in a fresh subprocess with ``torch.set_num_threads(2)``: ``AutoModel.from_pretrained`` of the base and of the
   merged directory, and of the base a second time (control: two loads of one model differ only by noise, e.g.
   where their weights and activations land in memory), forward of batch 32 x seq 128 random ids, fp32, eval,
   ``no_grad``; 2 warm-up calls each, then interleaved rounds (9; ``--quick`` 3), the order rotated each round,
   medians. Goal: merged / base <= 1.02x.
3. Bundle size: ``export_bundle`` of that MiniLM LoRA run, of a UniPELT run (recipe ``unipelt``: gated LoRA +
   prefix + adapter + gate nets; B randomised, the rest as initialised: its zero adapter up-biases equal MiniLM's
   all-zero ``pooler.dense.bias`` and are stored by reference) and of a copy of it with N(0, 0.01²) added to every
   tensor (as after training: nothing equals the base). Reports bundle.safetensors bytes, manifest.json bytes and
   the sum of the trained tensors' bytes (the run's inserted parameters); goal: bundle.safetensors <= 1.01x the
   trained bytes (the manifest is reported beside it, not counted). Info: the size of the ``-`` tar stream.

Outputs are removed at the end unless ``--keep``; the cached checkpoints too unless ``--keep`` or ``--workdir`` is
given. The last line of stdout is a JSON object with the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/pelt-bench-merge")
MB = 10**6
GB = 10**9
SHARD_BYTES = 10**9
RANK, ALPHA, B_STD = 8, 16, 0.01
FULL = {"hidden": 2048, "inter": 5504, "heads": 16, "vocab": 32000}
QUICK = {"hidden": 1024, "inter": 2752, "heads": 8, "vocab": 32000}
GOAL_PEFT = 3.0
GOAL_CP = 0.5
GOAL_RSS_OVERHEAD = 300 * MB
GOAL_FLAT = 0.10
GOAL_LATENCY = 1.02
GOAL_BUNDLE = 1.01
RECIPE = f"""name: bench-lora-all
description: LoRA r={RANK} on every attention and FFN projection (bench_merge)
families: [llama]
inserts:
  - method: lora
    targets: [attn.q, attn.k, attn.v, attn.o, ffn.gate, ffn.up, ffn.down]
    params: {{rank: {RANK}, alpha: {ALPHA}}}
"""
PELT, PELT_HASH, PELT_HALF, PEFT, CP = "pelt", "pelt, base hashed inline", "pelt, half checkpoint", "peft", "cp -r"
GOAL_MARGINAL = 0.7
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


# ---------------------------------------------------------------------------------------------------- the checkpoint


def layers_for(size_gb: float, dims: dict[str, int]) -> int:
    h, i, v = dims["hidden"], dims["inter"], dims["vocab"]
    per_layer = (4 * h * h + 3 * h * i + 2 * h) * 2
    fixed = (2 * v * h + h) * 2
    return max(1, math.ceil((size_gb * GB - fixed) / per_layer))


def tensor_plan(dims: dict[str, int], layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF LlamaForCausalLM disk names and shapes, in the order save_pretrained writes them."""
    h, i, v = dims["hidden"], dims["inter"], dims["vocab"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def build_checkpoint(d: Path, dims: dict[str, int], layers: int, seed: int) -> None:
    """Config via LlamaConfig, weights written shard by shard (one shard in memory at a time)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(
        hidden_size=dims["hidden"],
        intermediate_size=dims["inter"],
        num_hidden_layers=layers,
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        vocab_size=dims["vocab"],
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    cfg.save_pretrained(d)
    plan = tensor_plan(dims, layers)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for shard, fname in zip(shards, names, strict=True):
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def randomise_b(run: Path, seed: int, others: bool = False) -> None:
    """LoRA B (zero at init) ~ N(0, B_STD²), saved back with safetensors (same metadata).

    With ``others``, every other tensor also gets N(0, B_STD²) added (what training does to them).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run / "adapter.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for n in sorted(state):
        if n.endswith(".B"):
            state[n] = torch.randn(state[n].shape, generator=g, dtype=state[n].dtype) * B_STD
        elif others and not n.endswith(".ones"):
            state[n] = state[n] + torch.randn(state[n].shape, generator=g, dtype=state[n].dtype) * B_STD
    save_file(state, str(path), metadata=meta)


def child_build(a: dict[str, Any]) -> dict[str, Any]:
    """Base checkpoint + LoRA run (B randomised) + PEFT export, into a.dir (atomically: .tmp then rename)."""
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply
    from pelt_cli.peft_format import export_peft

    final, tmp = Path(a["dir"]), Path(a["dir"] + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    build_checkpoint(tmp / "base", a["dims"], a["layers"], a["seed"])
    t1 = time.perf_counter()
    apply(rc.loads(RECIPE, "<bench_merge>"), tmp / "base", tmp / "run")
    randomise_b(tmp / "run", a["seed"] + 1)
    export_peft(tmp / "run", tmp / "peft")
    t2 = time.perf_counter()
    # run.json records the base's absolute path: point it at the final location before renaming
    meta_p = tmp / "run" / "run.json"
    meta = json.loads(meta_p.read_text())
    meta["base"]["path"] = str((final / "base").resolve())
    meta_p.write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "spec.json").write_text(json.dumps(a, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return {"build_s": round(t1 - t0, 2), "apply_s": round(t2 - t1, 2)}


def ensure_checkpoint(work: Path, dims: dict[str, int], layers: int, seed: int) -> tuple[Path, bool]:
    tag = f"llama-h{dims['hidden']}-i{dims['inter']}-v{dims['vocab']}-l{layers}-bf16-r{RANK}"
    d = work / tag
    spec = {"dir": str(d), "dims": dims, "layers": layers, "seed": seed}
    spec_p = d / "spec.json"
    if spec_p.is_file() and json.loads(spec_p.read_text()) == json.loads(json.dumps(spec, sort_keys=True)):
        return d, True
    t0 = time.perf_counter()
    out = run_child("build", spec)
    print(
        f"  built {d.name}: weights {out['build_s']:.1f} s, apply + randomise + export_peft {out['apply_s']:.1f} s "
        f"(total {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    return d, False


def checkpoint_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def largest_tensor(d: Path) -> int:
    from pelt_cli.io.checkpoint import open_checkpoint

    return max(i.nbytes for i in open_checkpoint(d).tensors.values())


# ---------------------------------------------------------------------------------------------------- children


def child_pelt_setup(a: dict[str, Any]) -> dict[str, Any]:
    """merge_run's work before streaming: for plain LoRA its light path (run.json and headers; each branch's A and B
    are read as its weight folds), else imports, recipe, meta skeleton with the recipe inserted, adapter."""
    from pelt_cli.merge_fast import light_merge

    light = light_merge(a["run"], None, None, None)
    if light is not None:
        return {"adapter_tensors": 2 * sum(len(v) for v in light.output().disk_ops.values()), "light": True}
    from pelt_cli.run import Run

    run = Run.open(a["run"])
    model, _ = run.skeleton()
    return {"adapter_tensors": len(run.read_adapter(model)), "light": False}


def child_pelt(a: dict[str, Any]) -> dict[str, Any]:
    if a["hash"]:  # a base never fingerprinted: merge_run hashes it while it streams
        os.environ["PELT_FINGERPRINT_CACHE"] = "0"
    t0 = time.perf_counter()
    from pelt_cli.merge import merge_run

    t1 = time.perf_counter()
    rep = merge_run(a["run"], a["out"])
    t2 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "work_s": t2 - t1,
        "folded": rep.tensors_folded,
        "written": rep.tensors_written,
        "bytes": rep.bytes_written,
        "torch": "torch" in sys.modules,
    }


def child_peft(a: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    import transformers
    from peft import PeftModel

    transformers.logging.set_verbosity_error()
    t1 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(a["base"])
    t2 = time.perf_counter()
    pm = PeftModel.from_pretrained(model, a["peft"])
    merged = pm.merge_and_unload()
    t3 = time.perf_counter()
    merged.save_pretrained(a["out"])
    t4 = time.perf_counter()
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "merge_s": t3 - t2,
        "save_s": t4 - t3,
        "work_s": t4 - t1,
        "dtype": str(model.dtype),
    }


def child_forward(a: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(2)
    models = {
        "base": transformers.AutoModel.from_pretrained(a["base"]).eval(),
        "merged": transformers.AutoModel.from_pretrained(a["merged"]).eval(),
        "base, 2nd load (control)": transformers.AutoModel.from_pretrained(a["base"]).eval(),
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models["base"].config.vocab_size, (32, 128), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        outs = {k: m(**batch).last_hidden_state for k, m in models.items()}
        diff = (outs["base"] - outs["merged"]).abs().max().item()
        for m in models.values():
            m(**batch)
        keys = list(models)
        for r in range(a["rounds"]):
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t0 = time.perf_counter()
                models[k](**batch)
                times[k].append(time.perf_counter() - t0)
    return {
        "times": times,
        "base_vs_merged_max_abs": diff,
        "threads": torch.get_num_threads(),
        "dtype": str(models["merged"].dtype),
        "class": type(models["merged"]).__name__,
        "attn": sorted({m.config._attn_implementation for m in models.values()}),
    }


def child_fingerprint(a: dict[str, Any]) -> dict[str, Any]:
    """The base's content fingerprint, computed and cached as ``pelt apply`` does (files older than 2 s)."""
    from pelt_cli.io.checkpoint import open_checkpoint
    from pelt_cli.io.fingerprint import cached_fingerprint, fingerprint

    ck = open_checkpoint(a["base"])
    newest = max(p.stat().st_mtime for p in Path(a["base"]).glob("*.safetensors"))
    time.sleep(max(0.0, newest + 2.5 - time.time()))
    was = cached_fingerprint(ck)
    fp = fingerprint(ck)
    return {"fingerprint": fp, "was_cached": was is not None, "cached": cached_fingerprint(ck) == fp}


CHILDREN = {
    "build": child_build,
    "fingerprint": child_fingerprint,
    "pelt_setup": child_pelt_setup,
    "pelt": child_pelt,
    "peft": child_peft,
    "forward": child_forward,
}


def spawn(cmd: list[str], log: Path) -> tuple[float, int, str]:
    """Run a command; (wall s, peak RSS bytes of it and its waited-for descendants, stdout)."""
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "w+b") as out, open(str(log) + ".err", "w+b") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, etext = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    Path(str(log) + ".err").unlink()
    log.unlink()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed (exit {p.returncode}):\n{etext[-4000:]}\n{text[-2000:]}")
    return wall, ru.ru_maxrss * 1024, text


def run_child(kind: str, args: dict[str, Any], log_dir: Path | None = None) -> dict[str, Any]:
    res, _, _ = run_child_measured(kind, args, log_dir)
    return res


def run_child_measured(kind: str, args: dict[str, Any], log_dir: Path | None = None) -> tuple[dict, float, int]:
    """(the child's JSON, wall s, its peak RSS: its own VmHWM where it reports one, else wait4's ru_maxrss)."""
    log = Path(tempfile.mkstemp(prefix=f"bench-merge-{kind}-", dir=log_dir)[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(args)]
    wall, rss, text = spawn(cmd, log)
    res = json.loads(text.strip().splitlines()[-1])
    return res, wall, res.get("vmhwm") or rss


def own_peak_rss() -> int | None:
    """This process's peak RSS in bytes (VmHWM of /proc/self/status: its image since exec), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def fsync_tree(d: Path) -> float:
    t0 = time.perf_counter()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def warm(d: Path) -> None:
    for p in sorted(d.iterdir()):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 * 2**20):
                    pass


def load_str() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------------- section 1


def check_tensors(layers: int) -> list[str]:
    return [
        "model.layers.0.self_attn.q_proj.weight",
        f"model.layers.{layers // 2}.self_attn.v_proj.weight",
        f"model.layers.{layers - 1}.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ]


def grab(d: Path, names: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    index = d / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {n: "model.safetensors" for n in names}
    out = {}
    for n in names:
        with safe_open(str(d / where[n]), "pt") as f:
            out[n] = f.get_tensor(n)
    return out


def compare(base: Path, run: Path, got: dict[str, dict[str, Any]], layers: int) -> list[dict[str, Any]]:
    """pelt vs peft vs an fp32 reference bf16(W + (alpha/r) B A) on a few tensors."""
    import torch
    from safetensors.torch import load_file

    adapter = load_file(str(run / "adapter.safetensors"))
    ref = grab(base, check_tensors(layers))
    rows = []
    for n, w in ref.items():
        site = n.removesuffix(".weight")
        a, b = adapter.get(f"{site}.pelt_lora.A"), adapter.get(f"{site}.pelt_lora.B")
        want = w if a is None else (w.float() + (ALPHA / RANK) * (b.float() @ a.float())).to(torch.bfloat16)
        pelt, peft = got[PELT][n], got[PEFT][n]
        ulp = w.float().abs().max().item() * 2.0**-7  # BF16: 8 significant bits
        row = {
            "tensor": n,
            "folded": a is not None,
            "pelt_vs_peft": (pelt.float() - peft.float()).abs().max().item(),
            "pelt_vs_ref": (pelt.float() - want.float()).abs().max().item(),
            "peft_vs_ref": (peft.float() - want.float()).abs().max().item(),
            "pelt_vs_base": (pelt.float() - w.float()).abs().max().item(),
            "ulp": ulp,
            "dtypes": [str(pelt.dtype), str(peft.dtype)],
        }
        if a is None:
            row["ok"] = torch.equal(pelt, w) and torch.equal(peft, w)
        else:
            row["ok"] = row["pelt_vs_peft"] <= 2 * ulp and row["pelt_vs_ref"] <= 2 * ulp and row["pelt_vs_base"] > 0
        rows.append(row)
    return rows


METHODS = [PELT, PELT_HASH, PELT_HALF, PEFT, CP]
Results = dict[str, list[dict[str, Any]]]


def med(res: Results, m: str, k: str) -> float:
    """Median of field ``k`` over method ``m``'s rounds."""
    return statistics.median(x[k] for x in res[m])


def mx(res: Results, m: str, k: str) -> float:
    """Largest field ``k`` over method ``m``'s rounds."""
    return max(x[k] for x in res[m])


def prepare_checkpoints(work: Path, dims: dict[str, int], size_gb: float) -> dict[str, Any]:
    """Build (or reuse) the full and the half checkpoint with their runs, warm them; facts about them."""
    layers = layers_for(size_gb, dims)
    half_layers = max(1, layers // 2)
    print(
        f"== 1. merge: LLaMA-shaped BF16 checkpoint, hidden {dims['hidden']}, intermediate {dims['inter']}, "
        f"{dims['heads']} heads, vocab {dims['vocab']}, {layers} layers (half: {half_layers}); "
        f"LoRA r={RANK} alpha={ALPHA} on q,k,v,o,gate,up,down",
        flush=True,
    )
    full, cached = ensure_checkpoint(work, dims, layers, seed=0)
    half, cached_h = ensure_checkpoint(work, dims, half_layers, seed=1)
    if cached and cached_h:
        print(f"  cached in {work}")
    size, size_h = checkpoint_bytes(full / "base"), checkpoint_bytes(half / "base")
    big = largest_tensor(full / "base")
    from pelt_cli.io.checkpoint import open_checkpoint

    n_tensors = len(open_checkpoint(full / "base").tensors)
    n_shards = len(list((full / "base").glob("*.safetensors")))
    print(
        f"  full: {size / GB:.2f} GB in {n_shards} shards, {n_tensors} tensors, largest tensor {big / MB:.0f} MB; "
        f"half: {size_h / GB:.2f} GB ({size_h / size:.2f}x)"
    )
    for d in (full, half):
        fp = run_child("fingerprint", {"base": str(d / "base")})
        if not fp["cached"]:
            raise SystemExit(f"{d / 'base'}: its fingerprint could not be cached (is ~/.cache writable?)")
        print(f"  {d.name}: fingerprint {'was' if fp['was_cached'] else 'now'} cached, as after pelt apply")
        warm(d / "base")
    return {
        "layers": layers,
        "half_layers": half_layers,
        "full": full,
        "half": half,
        "size": size,
        "size_h": size_h,
        "big": big,
        "n_tensors": n_tensors,
        "n_shards": n_shards,
    }


def merge_once(m: str, ck: dict[str, Any], out: Path) -> tuple[dict[str, Any], float, int]:
    """One timed merge (or peft merge, or cp) into ``out``: (child's extra facts, wall s, peak RSS)."""
    full, half = ck["full"], ck["half"]
    if m == CP:
        log = Path(tempfile.mkstemp(prefix="bench-merge-cp-")[1])
        wall, rss, _ = spawn(["cp", "-r", str(full / "base"), str(out)], log)
        return {}, wall, rss
    if m == PEFT:
        return run_child_measured("peft", {"base": str(full / "base"), "peft": str(full / "peft"), "out": str(out)})
    run = (half if m == PELT_HALF else full) / "run"
    return run_child_measured("pelt", {"run": str(run), "out": str(out), "hash": m == PELT_HASH})


def drop_caches() -> None:
    """Write back and drop the page cache (root only), so the next method reads the base from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise SystemExit(f"--cold: cannot drop the page cache ({e}); run as root, or without --cold") from e


def time_merges(work: Path, ck: dict[str, Any], rounds: int, cold: bool) -> tuple[Results, dict[str, dict[str, Any]]]:
    """``rounds`` interleaved rounds of every method; per-round records and round 1's check tensors."""
    out_root = work / "out"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir()
    res: Results = {m: [] for m in METHODS}
    got: dict[str, dict[str, Any]] = {}
    cache = (
        "cold cache: sync + drop_caches before each method"
        if cold
        else "hot cache: base files read once into the page cache before timing"
    )
    print(f"  {rounds} round(s), interleaved; {cache}; load before: {load_str()}", flush=True)
    for r in range(rounds):
        for m in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
            out = out_root / f"{m.split()[0].strip(',')}-{r}-{len(m)}"
            if cold:
                drop_caches()
            load = load_str()
            extra, wall, rss = merge_once(m, ck, out)
            fs = fsync_tree(out)
            nbytes = ck["size_h"] if m == PELT_HALF else ck["size"]
            res[m].append(
                {"wall": wall + fs, "fsync": fs, "rss": rss, "gbps": nbytes / (wall + fs) / GB, "load": load, **extra}
            )
            print(
                f"  round {r + 1} {m:<28} {wall + fs:7.2f} s (fsync {fs:5.2f})  RSS {rss / MB:7.0f} MB  load {load}",
                flush=True,
            )
            if r == 0 and m in (PELT, PEFT):
                got[m] = grab(out, check_tensors(ck["layers"]))
            shutil.rmtree(out)
    shutil.rmtree(out_root, ignore_errors=True)
    return res, got


def print_merge_table(res: Results, base_rss: float) -> None:
    """Wall, fsync, GB/s and RSS per method, then where peft's and pelt's time goes."""
    print(
        f"\n  {'method':<30}{'wall s':>8}{'fsync s':>9}{'GB/s':>7}{'RSS MB max':>12}{'median':>8}{'runs s':>22}"
        f"{'runs RSS MB':>20}"
    )
    for m in METHODS:
        runs = " ".join(f"{x['wall']:.1f}" for x in res[m])
        runs_rss = " ".join(f"{x['rss'] / MB:.0f}" for x in res[m])
        print(
            f"  {m:<30}{med(res, m, 'wall'):>8.2f}{med(res, m, 'fsync'):>9.2f}{med(res, m, 'gbps'):>7.2f}"
            f"{mx(res, m, 'rss') / MB:>12.0f}{med(res, m, 'rss') / MB:>8.0f}{runs:>22}{runs_rss:>20}"
        )
    print(
        f"  info: peak RSS of merge_run's set-up alone (imports, plan, adapter; no base tensor read): "
        f"{base_rss / MB:.0f} MB"
    )
    pe = res[PEFT]
    print(
        f"  peft split (median s): import {statistics.median(x['import_s'] for x in pe):.1f}, from_pretrained "
        f"{statistics.median(x['load_s'] for x in pe):.1f}, PeftModel + merge_and_unload "
        f"{statistics.median(x['merge_s'] for x in pe):.1f}, save_pretrained "
        f"{statistics.median(x['save_s'] for x in pe):.1f}, + fsync {med(res, PEFT, 'fsync'):.1f}; model dtype "
        f"{pe[0]['dtype']}"
    )
    pl = res[PELT]
    print(
        f"  pelt split (median s): start + import pelt_cli.merge {statistics.median(x['import_s'] for x in pl):.2f}, "
        f"merge_run {statistics.median(x['work_s'] for x in pl):.2f} (incl. "
        f"{'torch import, ' if pl[0].get('torch') else 'no torch import: light path, '}fingerprint check, fsync); "
        f"{pl[0]['folded']} of {pl[0]['written']} tensors folded"
    )


def marginal_gbps(res: Results, ck: dict[str, Any]) -> float:
    """GB/s of the bytes the full checkpoint has over the half one, from the median walls (start-up cancels)."""
    extra = med(res, PELT, "wall") - med(res, PELT_HALF, "wall")
    return (ck["size"] - ck["size_h"]) / GB / extra if extra > 0 else math.inf


def merge_goals(res: Results, ck: dict[str, Any], base_rss: float) -> dict[str, tuple[bool, str]]:
    """The speed and memory goals: verdict and report line each."""
    size, size_h, big = ck["size"], ck["size_h"], ck["big"]
    ratio_peft = med(res, PEFT, "wall") / med(res, PELT, "wall")
    ratio_cp = med(res, PELT, "gbps") / med(res, CP, "gbps")
    marginal = marginal_gbps(res, ck)
    rss, rss_med, rss_h = mx(res, PELT, "rss"), med(res, PELT, "rss"), med(res, PELT_HALF, "rss")
    bound = 3 * big + GOAL_RSS_OVERHEAD
    flat = rss_med / rss_h - 1
    peft_rss = mx(res, PEFT, "rss")
    return {
        "peft_over_pelt": (ratio_peft >= GOAL_PEFT, f"peft wall / pelt wall: {ratio_peft:.2f}x   goal >= {GOAL_PEFT}x"),
        "pelt_over_cp": (
            ratio_cp >= GOAL_CP,
            f"pelt GB/s / cp GB/s: {ratio_cp:.2f}x   goal >= {GOAL_CP}x   "
            f"(info: a base not fingerprinted before, hashed inline: "
            f"{med(res, PELT_HASH, 'gbps') / med(res, CP, 'gbps'):.2f}x)",
        ),
        "marginal_over_cp": (
            marginal / med(res, CP, "gbps") >= GOAL_MARGINAL,
            f"pelt marginal GB/s / cp GB/s: {marginal:.2f} / {med(res, CP, 'gbps'):.2f} = "
            f"{marginal / med(res, CP, 'gbps'):.2f}x   goal >= {GOAL_MARGINAL}x   ((full - half bytes) / "
            f"(full - half median wall))",
        ),
        "rss_bound": (
            rss <= bound,
            f"pelt peak RSS {rss / MB:.0f} MB   goal <= 3 x {big / MB:.0f} MB + 300 MB "
            f"= {bound / MB:.0f} MB   (peft: {peft_rss / MB:.0f} MB, "
            f"{peft_rss / rss:.1f}x pelt; above the set-up alone: "
            f"{(rss - base_rss) / MB:.0f} MB = {(rss - base_rss) / big:.1f} x largest tensor)",
        ),
        "rss_flat": (
            abs(flat) <= GOAL_FLAT,
            f"pelt peak RSS full / half checkpoint, medians: {rss_med / MB:.0f} / "
            f"{rss_h / MB:.0f} MB ({flat:+.1%}) for {size / size_h:.2f}x the bytes"
            f"   goal within {GOAL_FLAT:.0%}",
        ),
    }


def print_correctness(rows: list[dict[str, Any]]) -> None:
    """Per checked tensor: pelt vs peft, vs the fp32 reference, vs the base, in ulps."""
    print(
        f"\n  correctness (round 1; ulp = 2^-7 x max|W| of the base tensor; ref = bf16(W + {ALPHA // RANK} B A) "
        "in fp32)"
    )
    print(f"  {'tensor':<42}{'pelt-peft':>11}{'pelt-ref':>10}{'peft-ref':>10}{'pelt-base':>11}{'ulp':>10}")
    for row in rows:
        print(
            f"  {row['tensor']:<42}{row['pelt_vs_peft']:>11.2e}{row['pelt_vs_ref']:>10.2e}"
            f"{row['peft_vs_ref']:>10.2e}{row['pelt_vs_base']:>11.2e}{row['ulp']:>10.2e}  "
            f"{'folded' if row['folded'] else 'untouched'}"
        )


def merge_result(
    res: Results,
    ck: dict[str, Any],
    rounds: int,
    cold: bool,
    base_rss: float,
    rows: list[dict[str, Any]],
    goals: dict[str, tuple[bool, str]],
) -> dict[str, Any]:
    """Section 1's part of the JSON line."""
    rss_med, rss_h = med(res, PELT, "rss"), med(res, PELT_HALF, "rss")
    return {
        "layers": ck["layers"],
        "half_layers": ck["half_layers"],
        "bytes": ck["size"],
        "half_bytes": ck["size_h"],
        "largest_tensor": ck["big"],
        "tensors": ck["n_tensors"],
        "shards": ck["n_shards"],
        "dtype": "bfloat16",
        "rounds": rounds,
        "median_wall_s": {m: round(med(res, m, "wall"), 3) for m in METHODS},
        "median_fsync_s": {m: round(med(res, m, "fsync"), 3) for m in METHODS},
        "median_gb_per_s": {m: round(med(res, m, "gbps"), 3) for m in METHODS},
        "peak_rss_mb": {m: round(mx(res, m, "rss") / MB, 1) for m in METHODS},
        "median_peak_rss_mb": {m: round(med(res, m, "rss") / MB, 1) for m in METHODS},
        "runs_rss_mb": {m: [round(x["rss"] / MB, 1) for x in res[m]] for m in METHODS},
        "setup_only_rss_mb": round(base_rss / MB, 1),
        "runs_s": {m: [round(x["wall"], 3) for x in res[m]] for m in METHODS},
        "loads": {m: [x["load"] for x in res[m]] for m in METHODS},
        "ratio_peft_over_pelt": round(med(res, PEFT, "wall") / med(res, PELT, "wall"), 3),
        "ratio_pelt_over_cp": round(med(res, PELT, "gbps") / med(res, CP, "gbps"), 3),
        "marginal_gb_per_s": round(marginal_gbps(res, ck), 3),
        "ratio_marginal_over_cp": round(marginal_gbps(res, ck) / med(res, CP, "gbps"), 3),
        "cache": "cold" if cold else "hot",
        "rss_bound_mb": round((3 * ck["big"] + GOAL_RSS_OVERHEAD) / MB, 1),
        "rss_full_over_half_median": round(rss_med / rss_h, 4),
        "correctness": [{k: v for k, v in r.items() if k != "dtypes"} for r in rows],
        "goals": {k: ok for k, (ok, _) in goals.items()},
    }


def section_merge(work: Path, dims: dict[str, int], size_gb: float, rounds: int, cold: bool) -> dict[str, Any]:
    """Section 1: merge_run against peft and cp on a LLaMA-shaped checkpoint; prints and returns the results."""
    ck = prepare_checkpoints(work, dims, size_gb)
    res, got = time_merges(work, ck, rounds, cold)
    base_rss = max(run_child_measured("pelt_setup", {"run": str(ck["full"] / "run")})[2] for _ in range(2))
    print_merge_table(res, base_rss)
    goals = merge_goals(res, ck, base_rss)
    rows = compare(ck["full"] / "base", ck["full"] / "run", got, ck["layers"])
    print_correctness(rows)
    goals["correct"] = (
        all(r["ok"] for r in rows),
        "merged tensors: folded ones within 2 ulps of peft and of the "
        "fp32 reference, untouched ones bit-identical to the base",
    )
    print()
    for ok, line in goals.values():
        print(f"  {line}   {'PASS' if ok else 'MISS'}")
    return merge_result(res, ck, rounds, cold, base_rss, rows, goals)


# ---------------------------------------------------------------------------------------------------- sections 2, 3


def trained_bytes(run: Path) -> tuple[int, int, int]:
    """(bytes of the run's inserted parameters, bytes of all its tensors, adapter.safetensors file size)."""
    from pelt_cli.io.checkpoint import open_checkpoint
    from pelt_cli.run import Run
    from pelt_cli.surgery import is_inserted

    model, _ = Run.open(run).skeleton()
    params = {n for n, _ in model.named_parameters() if is_inserted(n)}
    ck = open_checkpoint(run / "adapter.safetensors")
    return (
        sum(i.nbytes for n, i in ck.tensors.items() if n in params),
        ck.total_bytes,
        (run / "adapter.safetensors").stat().st_size,
    )


def minilm_runs(d: Path, base: Path) -> dict[str, Path]:
    """Runs of recipes lora and unipelt on MiniLM (B randomised), and a copy of unipelt with every tensor perturbed."""
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply

    runs = {}
    for i, name in enumerate(("lora", "unipelt")):
        runs[name] = apply(rc.load(name), base, d / f"run-{name}")
        randomise_b(runs[name], seed=10 + i)
    runs["unipelt-trained"] = d / "run-unipelt-trained"
    shutil.copytree(runs["unipelt"], runs["unipelt-trained"])
    randomise_b(runs["unipelt-trained"], seed=12, others=True)
    return runs


def section_latency(d: Path, base: Path, lora_run: Path, rounds: int) -> dict[str, Any]:
    """Section 2: merge the LoRA run, then time MiniLM's forward, base against merged (and a control)."""
    from pelt_cli.merge import merge_run, verify_merge

    rep = merge_run(lora_run, d / "merged")
    vdiff = verify_merge(lora_run, d / "merged")
    print(
        f"\n== 2. latency after merge: all-MiniLM-L6-v2 + recipe lora (B ~ N(0, {B_STD}²)), merged with merge_run "
        f"({rep.tensors_folded} tensors folded); verify_merge max |Δ| {vdiff:.2e} (goal <= 1e-4: "
        f"{'PASS' if vdiff <= 1e-4 else 'MISS'}); load before: {load_str()}",
        flush=True,
    )
    fw = run_child("forward", {"base": str(base), "merged": str(d / "merged"), "rounds": rounds})
    tb, tm, tc = fw["times"]["base"], fw["times"]["merged"], fw["times"]["base, 2nd load (control)"]
    mb, mm = statistics.median(tb), statistics.median(tm)
    per_round = statistics.median(m / b for b, m in zip(tb, tm, strict=True))
    mc = statistics.median(tc)
    lat_ok = mm / mb <= GOAL_LATENCY
    print(
        f"  {fw['class']}, {fw['dtype']}, attention {'/'.join(fw['attn'])}, {fw['threads']} threads, batch 32 x 128, "
        f"{rounds} interleaved rounds after 2 warm-ups; outputs base vs merged differ by up to "
        f"{fw['base_vs_merged_max_abs']:.2e}"
    )
    print(f"  {'model':<26}{'median ms':>10}{'ratio':>8}   runs ms")
    for k, ts in fw["times"].items():
        med_k = statistics.median(ts)
        print(f"  {k:<26}{med_k * 1e3:>10.1f}{med_k / mb:>7.3f}x   {' '.join(f'{t * 1e3:.0f}' for t in ts)}")
    print(
        f"  merged / base: {mm / mb:.3f}x (median of per-round ratios {per_round:.3f}x; the control, the same base "
        f"loaded twice: {mc / mb:.3f}x)   goal <= {GOAL_LATENCY}x   {'PASS' if lat_ok else 'MISS'}   "
        f"load after: {load_str()}"
    )
    return {
        "base_ms": round(mb * 1e3, 2),
        "merged_ms": round(mm * 1e3, 2),
        "ratio": round(mm / mb, 4),
        "per_round_ratio": round(per_round, 4),
        "control_ms": round(mc * 1e3, 2),
        "control_ratio": round(mc / mb, 4),
        "rounds": rounds,
        "verify_merge_max_abs": vdiff,
        "goal": GOAL_LATENCY,
        "pass": lat_ok,
    }


def bundle_sizes(d: Path, name: str, run: Path) -> dict[str, Any]:
    """Export one run as a bundle directory and as a tar stream; sizes against its trained tensors (one row)."""
    from pelt_cli.bundle import BUNDLE_FILE, MANIFEST_FILE, export_bundle

    manifest = export_bundle(run, d / f"bundle-{name}")
    st = (d / f"bundle-{name}" / BUNDLE_FILE).stat().st_size
    mf = (d / f"bundle-{name}" / MANIFEST_FILE).stat().st_size
    buf = io.BytesIO()
    export_bundle(run, "-", stream=buf)
    trained, all_bytes, adapter_file = trained_bytes(run)
    by_ref = sum(1 for t in manifest["tensors"] if t["stored"] == "base")
    ratio = st / trained
    print(
        f"  {name:<16}{len(manifest['tensors']):>8}{trained:>11}{st:>13}{ratio:>8.4f}{mf:>12}{by_ref:>8}"
        f"{len(buf.getvalue()):>10}{adapter_file:>14}"
    )
    return {
        "tensors": len(manifest["tensors"]),
        "trained_bytes": trained,
        "all_run_tensor_bytes": all_bytes,
        "bundle_safetensors_bytes": st,
        "manifest_bytes": mf,
        "tar_bytes": len(buf.getvalue()),
        "by_ref": by_ref,
        "adapter_file_bytes": adapter_file,
        "ratio": round(ratio, 5),
        "pass": ratio <= GOAL_BUNDLE,
    }


def section_bundles(d: Path, runs: dict[str, Path]) -> dict[str, Any]:
    """Section 3: bundle sizes of every run, and the goal line of each."""
    print(
        "\n== 3. bundle size vs the trained tensors (export_bundle of MiniLM runs; B randomised, and in "
        "unipelt-trained every tensor perturbed)"
    )
    print(
        f"  {'run':<16}{'tensors':>8}{'trained B':>11}{'bundle.st B':>13}{'ratio':>8}{'manifest B':>12}"
        f"{'by ref':>8}{'tar B':>10}{'adapter.st B':>14}"
    )
    bundles = {name: bundle_sizes(d, name, run) for name, run in runs.items()}
    for name, b in bundles.items():
        print(
            f"  {name}: bundle.safetensors / trained bytes {b['ratio']:.4f}x (+ manifest {b['manifest_bytes']} B, "
            f"{b['manifest_bytes'] / b['trained_bytes']:.1%} of the trained bytes)   goal <= {GOAL_BUNDLE}x   "
            f"{'PASS' if b['pass'] else 'MISS'}"
        )
    return bundles


def section_minilm(work: Path, rounds: int) -> dict[str, Any]:
    """Sections 2 and 3 on the real MiniLM: latency after merge, and bundle sizes."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(CHILD_ENV)
    import transformers

    from pelt_cli.report import resolve_model

    transformers.logging.set_verbosity_error()
    base = resolve_model("minilm")
    d = work / "minilm"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    runs = minilm_runs(d, base)
    out: dict[str, Any] = {"latency": section_latency(d, base, runs["lora"], rounds)}
    out["bundles"] = section_bundles(d, runs)
    return out


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-gb", type=float, default=None, help="checkpoint size in GB (default 3.2; --quick 0.3)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--workdir", type=Path, default=None, help=f"cache and scratch (default {DEFAULT_WORKDIR})")
    ap.add_argument("--keep", action="store_true", help="keep the outputs and the cached checkpoints")
    ap.add_argument("--quick", action="store_true", help="~0.3 GB checkpoint, 1 round: a smoke check")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each method (root)")
    ap.add_argument("--merge-only", action="store_true", help="section 1 only (no MiniLM latency and bundles)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = CHILDREN[args.child[0]](json.loads(args.child[1]))
        print(json.dumps({**res, "vmhwm": own_peak_rss()}))
        return 0
    size_gb = args.size_gb or (0.3 if args.quick else 3.2)
    rounds = args.rounds or (1 if args.quick else 3)
    dims = QUICK if args.quick else FULL
    work = (args.workdir or DEFAULT_WORKDIR).resolve()
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    need = 4 * size_gb * GB
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: only {free / GB:.1f} GB free, need {need / GB:.1f} GB")
    t_start = time.perf_counter()
    print(
        f"bench_merge: workdir {work}, {os.cpu_count()} CPUs, load {load_str()}; "
        f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}",
        flush=True,
    )
    result: dict[str, Any] = {"bench": "merge", "quick": args.quick, "size_gb": size_gb, "load_start": load_str()}
    try:
        result["merge"] = section_merge(work, dims, size_gb, rounds, args.cold)
        if not args.merge_only:
            result.update(section_minilm(work, 3 if args.quick else 9))
    finally:
        if not args.keep:
            shutil.rmtree(work / "out", ignore_errors=True)
            shutil.rmtree(work / "minilm", ignore_errors=True)
            for p in work.glob("*.tmp"):
                shutil.rmtree(p, ignore_errors=True)
            if args.workdir is None:
                for p in work.glob("llama-*"):
                    shutil.rmtree(p, ignore_errors=True)
                if created:
                    with contextlib.suppress(OSError):
                        work.rmdir()
    result["load_end"] = load_str()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    goals = {f"merge.{k}": v for k, v in result["merge"]["goals"].items()}
    if not args.merge_only:
        goals["latency"] = result["latency"]["pass"]
        goals.update({f"bundle.{k}": v["pass"] for k, v in result["bundles"].items()})
    result["goals"] = goals
    print(
        f"\ntotal {result['seconds']:.0f} s; load at end {result['load_end']}; uptime: "
        f"{subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
