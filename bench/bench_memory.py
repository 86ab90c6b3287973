"""Memory and precision of ``pelt train`` on the CPU: ``--grad-checkpoint`` on a 12-layer model, ``--precision bf16``
vs fp32 on ``vader``.

Run from the repository root, alone:

    .venv/bin/python bench/bench_memory.py            # about 6 minutes on the 2-core VM
    .venv/bin/python bench/bench_memory.py --quick    # a smoke run: 2 steps each, 20 vader steps

(a) Peak training memory with and without activation checkpointing: a 12-layer BERT (MiniLM's widths: hidden 384,
    12 heads, FFN 1536, random weights from the config) with recipe ``unipelt`` and a classification head, batch
    8 × 128 random tokens, fp32; each variant in a fresh process, which loads the run, records its resident set
    (``/proc/self/statm``), then trains STEPS steps through ``pelt_cli.precision.enable_grad_checkpoint`` (or not)
    and reports its peak resident set (``getrusage``). Training memory = peak − resident after loading (the weights
    are the same in both). Goal: with checkpointing ≤ 0.6× without (training memory); the whole peak for
    information. Gradients are compared too (the same batch and weights: max |Δ| ≤ 1e-5).
(b) ``--precision bf16`` vs fp32: ``train_run`` of recipe ``lora`` on MiniLM, ``vader``, 1 epoch (``--quick``:
    20 steps), defaults otherwise: ms per step and eval accuracy. Report only (on the CPU bf16 is an emulation
    on most cores; the figures that matter come from ``bench/gpu_check.sh``).

The last line of stdout is a JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

BATCH, SEQ = 8, 128


def rss_mb() -> float:
    """The resident set now, in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(run: Path, checkpointed: bool, steps: int, out: Path) -> None:
    """Load the run with a head, train ``steps`` steps, write the memory figures and the last gradients."""
    from pelt_cli import heads, surgery
    from pelt_cli.evaluate import compute_loss
    from pelt_cli.precision import enable_grad_checkpoint
    from pelt_cli.run import Run

    torch.set_num_threads(2)
    model = Run.open(run).load_model()
    torch.manual_seed(0)
    heads.attach_head(model, {"task": "text-classification", "labels": ["n", "p"], "hidden": 384, "dropout": 0.0})
    surgery.freeze_base(model)
    with torch.no_grad():  # every inserted weight moves the loss (LoRA B and the adapters' up start at 0)
        for p in surgery.inserted_parameters(model).values():
            p.add_(0.02 * torch.randn_like(p))
    how = enable_grad_checkpoint(model) if checkpointed else "none"
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (BATCH, SEQ), generator=g),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "labels": torch.randint(0, 2, (BATCH,), generator=g),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: every step sees the same weights, the gradients compare
    loaded, t0 = rss_mb(), time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        compute_loss(model, batch, "text-classification")[0].backward()
        opt.step()
    seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save([p.grad for p in params], out.with_suffix(".pt"))
    out.write_text(json.dumps({"loaded_mb": loaded, "peak_mb": peak, "step_s": seconds, "how": how}))


def grad_checkpoint(tmp: Path, steps: int) -> dict:
    import transformers

    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply
    from pelt_cli.report import resolve_model

    cfg = transformers.BertConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536, vocab_size=30522
    )
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(tmp / "bert12")
    tok = resolve_model("minilm")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tmp / "bert12" / f).write_bytes((Path(tok) / f).read_bytes())
    run = apply(rc.load("unipelt"), tmp / "bert12", tmp / "run")
    res = {}
    for variant in ("plain", "checkpointed"):
        out = tmp / f"{variant}.json"
        cmd = [sys.executable, __file__, "--worker", str(run), variant, str(steps), str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{variant} worker failed:\n{r.stderr[-3000:]}")
        res[variant] = json.loads(out.read_text())
        res[variant]["train_mb"] = res[variant]["peak_mb"] - res[variant]["loaded_mb"]
    a, b = (torch.load(tmp / f"{v}.pt") for v in ("plain", "checkpointed"))
    res["grad_max_abs_diff"] = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    return res


def precision(steps: int | None) -> dict:
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply
    from pelt_cli.report import resolve_model
    from pelt_cli.train import TrainConfig, train_run

    out = {}
    for prec in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory(prefix="pelt-bench-prec-") as tmp:
            run = apply(rc.load("lora"), resolve_model("minilm"), Path(tmp) / "run")
            cfg = TrainConfig(epochs=1, lr=2e-3, max_steps=steps, device="cpu", precision=prec, patience=0)
            res = train_run(run, "vader", cfg=cfg)
            out[prec] = {
                "ms_per_step": round(1000 * res.seconds / max(res.steps, 1), 1),
                "accuracy": res.history[-1].get("accuracy"),
                "steps": res.steps,
                "peak_rss_mb": res.peak_memory.get("rss_mb"),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run, variant, steps, out = args.worker
        worker(Path(run), variant == "checkpointed", int(steps), Path(out))
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="pelt-bench-mem-") as tmp:
        gc = grad_checkpoint(Path(tmp), 2 if args.quick else 3)
    p, c = gc["plain"], gc["checkpointed"]
    print(f"(a) 12-layer BERT (hidden 384) + UniPELT + head, batch {BATCH} × {SEQ}, fp32, CPU")
    print("| variant | resident after load MiB | peak MiB | training MiB | s/step |\n|---|---|---|---|---|")
    for name, v in (("without", p), (f"--grad-checkpoint ({c['how']})", c)):
        print(f"| {name} | {v['loaded_mb']:.0f} | {v['peak_mb']:.0f} | {v['train_mb']:.0f} | {v['step_s']:.2f} |")
    ratio = c["train_mb"] / p["train_mb"]
    print(f"* training memory with / without: {ratio:.2f}× (goal ≤ 0.6×): {'PASS' if ratio <= 0.6 else 'MISS'}")
    print(f"* whole peak with / without: {c['peak_mb'] / p['peak_mb']:.2f}× (information)")
    print(f"* step time with / without: {c['step_s'] / p['step_s']:.2f}× (information: one more forward)")
    print(f"* gradients max |Δ|: {gc['grad_max_abs_diff']:.2e} (≤ 1e-5: {gc['grad_max_abs_diff'] <= 1e-5})")
    pr = precision(20 if args.quick else None)
    print("(b) LoRA on MiniLM, vader, --precision fp32 vs bf16 (report only)")
    print("| precision | steps | ms/step | eval accuracy | peak RSS MiB |\n|---|---|---|---|---|")
    for k, v in pr.items():
        print(f"| {k} | {v['steps']} | {v['ms_per_step']} | {v['accuracy']:.4f} | {v['peak_rss_mb']} |")
    print(f"* bf16 / fp32 step time: {pr['bf16']['ms_per_step'] / pr['fp32']['ms_per_step']:.2f}×")
    print(json.dumps({"grad_checkpoint": gc, "ratio": ratio, "precision": pr, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
