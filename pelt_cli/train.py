"""``pelt train``: train only the inserted parameters of a run, evaluate, record gates, checkpoint atomically.

The run directory is updated in place, only through atomic renames: ``adapter.safetensors`` (the inserted
parameters, head included), ``run.json`` (head spec and training summary), ``metrics.jsonl``, ``gates.json`` and
``train/state.pt`` (optimizer, scheduler and RNG state for ``--resume``; read back with ``weights_only=True``).

Data parallel: under ``torchrun`` every rank trains on its shard of each batch and the gradients of the
trainable parameters are averaged with ``all_reduce`` before each step, so all ranks hold identical weights;
only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pelt_cli import gates as gatestats
from pelt_cli import heads, surgery
from pelt_cli.errors import PeltError, UsageError

STATE_DIR = "train"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"


class TrainingError(PeltError):
    """Training stopped: a non-finite loss, or a base parameter that would train."""

    exit_code = 1


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (all have defaults; the CLI sets them from options)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    gate_lr: float | None = None
    scale_lr: float = 1e-3
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.06
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    gate_warmup: int = 0
    gate_sparsity: str = "none"
    gate_lambda: float = 0.01
    gate_temperature: float | None = None
    patience: int = 3
    eval_every: int = 0
    eval_fraction: float = 0.1
    max_length: int = 128
    max_steps: int | None = None
    seed: int = 0
    task: str | None = None
    device: str = "auto"

    def check(self) -> None:
        """Raise UsageError for values out of range."""
        rules = [
            (self.epochs >= 1, f"--epochs {self.epochs}: expected ≥ 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: expected ≥ 1"),
            (self.lr > 0, f"--lr {self.lr}: expected > 0"),
            (self.grad_accum >= 1, f"--grad-accum {self.grad_accum}: expected ≥ 1"),
            (0 <= self.warmup, f"--warmup {self.warmup}: expected a fraction of the steps (0–1) or a step count"),
            (self.schedule in ("linear", "cosine", "constant"), f"--schedule {self.schedule!r}: expected linear, "
                                                               "cosine or constant"),
            (self.gate_sparsity in ("none", "entropy", "l1"), f"--gate-sparsity {self.gate_sparsity!r}: "
                                                              "expected none, entropy or l1"),
            (self.patience >= 0, f"--patience {self.patience}: expected ≥ 0 (0 disables early stopping)"),
            (0 < self.eval_fraction < 1, f"--eval-fraction {self.eval_fraction}: expected between 0 and 1"),
            (self.eval_every >= 0, f"--eval-every {self.eval_every}: expected ≥ 0 (0: only at epoch ends)"),
            (self.max_length >= 2, f"--max-length {self.max_length}: expected ≥ 2"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: expected ≥ 0"),
            (self.head_lr is None or self.head_lr > 0, f"--head-lr {self.head_lr}: expected > 0"),
            (self.device in ("auto", "cpu", "cuda"), f"--device {self.device!r}: expected auto, cpu or cuda"),
            (self.gate_temperature is None or self.gate_temperature > 0,
             f"--gate-temperature {self.gate_temperature}: expected > 0"),
        ]
        for ok, message in rules:
            if not ok:
                raise UsageError(message)


@dataclass
class TrainResult:
    """What a training run did."""

    run: str
    task: str
    epochs_done: int
    steps: int
    best_epoch: int
    best_metric: float
    metric_name: str
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    trainable: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- distributed

def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` under torchrun, else ``(0, 1)``; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PELT_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks (a zero gradient stands in for a missing one)."""
    if world <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= world


def all_reduce_sum(values: list[float], world: int) -> list[float]:
    """Sum floats over ranks."""
    if world <= 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def check_ranks_agree(params: list[torch.nn.Parameter], world: int) -> None:
    """Raise if the ranks' trainable weights differ (they must be identical after averaged-gradient steps)."""
    if world <= 1:
        return
    import torch.distributed as dist

    local = torch.stack([p.detach().double().sum() for p in params] + [p.detach().double().abs().sum()
                                                                         for p in params]).cpu()
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainingError(f"ranks disagree on the trained weights (max checksum gap {(hi - lo).abs().max():.3e})")


# ---------------------------------------------------------------------------------------------- optimisation

def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: modules, gates, the domain adapter's scale, the head — each with its learning rate."""
    groups: dict[str, list] = {"modules": [], "gates": [], "scale": [], "head": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".pelt_gate." in n:
            groups["gates"].append(p)
        elif n.endswith("pelt_domain.scale"):
            groups["scale"].append(p)
        elif n.startswith("pelt_head."):
            groups["head"].append(p)
        else:
            groups["modules"].append(p)
    lrs = {"modules": cfg.lr, "gates": cfg.gate_lr or cfg.lr, "scale": cfg.scale_lr, "head": cfg.head_lr or cfg.lr}
    return [{"params": ps, "lr": lrs[k], "name": k, "weight_decay": 0.0 if k == "scale" else cfg.weight_decay}
            for k, ps in groups.items() if ps]


def lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    """Linear warm-up to 1, then linear decay to 0, cosine decay, or constant."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)
    return f


def gate_penalty(model: torch.nn.Module, kind: str) -> torch.Tensor | None:
    """Sparsity term on the current UniPELT gates: mean entropy or mean L1 over layers."""
    if kind == "none":
        return None
    terms = []
    for ctl in gatestats.controllers(model).values():
        g = ctl.current
        if g is None:
            continue
        if kind == "l1":
            terms.append(g.abs().mean())
        elif ctl.mode == "softmax":  # −Σ g log g over the modules
            terms.append(-(g * g.clamp_min(1e-12).log()).sum(-1).mean())
        else:  # binary entropy of each sigmoid gate
            gc = g.clamp(1e-6, 1 - 1e-6)
            terms.append(-(gc * gc.log() + (1 - gc) * (1 - gc).log()).mean())
    return torch.stack(terms).mean() if terms else None


def set_gates_trainable(model: torch.nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze the gate parameters (gate warm-up)."""
    for n, p in model.named_parameters():
        if ".pelt_gate." in n:
            p.requires_grad_(trainable)


# ---------------------------------------------------------------------------------------------- the loop

def pick_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, Any]:
    """The task's loss (and logits for classification)."""
    if task in heads.CLASSIFICATION:
        return heads.classification_loss(model, batch, task)
    if task == "causal-lm":
        return heads.lm_loss(model, batch)
    if task == "domain-matching":
        return heads.domain_loss(model, batch)
    raise UsageError(f"task {task!r}: expected one of {', '.join(heads.CLASSIFICATION)}, causal-lm, domain-matching")


def evaluate(model: torch.nn.Module, batcher: Any, cfg: TrainConfig, task: str, device: torch.device,
             labels: list[str] | None) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics on the eval set (loss; accuracy and macro-F1, perplexity, or feature MSE/cosine) and gate stats."""
    model.eval()
    gatestats.reset(model)
    meter = gatestats.DomainGateMeter() if task == "domain-matching" else None
    total_loss, n, correct = 0.0, 0, 0
    preds, golds = [], []
    mse_before, cos_after, cos_before = 0.0, 0.0, 0.0
    with torch.no_grad():
        for batch in batcher.batches(cfg.batch_size, shuffle=False, seed=cfg.seed):
            batch = {k: v.to(device) for k, v in batch.items()}
            bsz = next(iter(batch.values())).shape[0]
            if task == "domain-matching":
                out, ref, src = heads.domain_features(model, batch)
                meter.add(heads.domain_adapter(model).last_gate)
                loss = torch.nn.functional.mse_loss(out.float(), ref.float())
                mse_before += torch.nn.functional.mse_loss(src.float(), ref.float()).item() * bsz
                cos = torch.nn.functional.cosine_similarity
                cos_after += cos(out.float(), ref.float(), dim=-1).mean().item() * bsz
                cos_before += cos(src.float(), ref.float(), dim=-1).mean().item() * bsz
                logits = None
            else:
                loss, logits = compute_loss(model, batch, task)
            total_loss += loss.item() * bsz
            n += bsz
            if logits is not None:
                p = logits.argmax(-1)
                correct += (p == batch["labels"]).sum().item()
                preds += p.tolist()
                golds += batch["labels"].tolist()
    metrics = {"eval_loss": total_loss / max(n, 1)}
    if task in heads.CLASSIFICATION:
        metrics["accuracy"] = correct / max(n, 1)
        metrics["f1"] = macro_f1(preds, golds, len(labels or []))
    elif task == "causal-lm":
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    else:
        metrics.update({"feature_mse": metrics["eval_loss"], "feature_mse_unadapted": mse_before / max(n, 1),
                        "cosine": cos_after / max(n, 1), "cosine_unadapted": cos_before / max(n, 1)})
    model.train()
    return metrics, gatestats.snapshot(model, meter)


def macro_f1(preds: list[int], golds: list[int], n_classes: int) -> float:
    """Macro-averaged F1 over the classes that occur in predictions or gold labels."""
    scores = []
    for c in range(n_classes):
        tp = sum(1 for p, g in zip(preds, golds, strict=True) if p == c and g == c)
        fp = sum(1 for p, g in zip(preds, golds, strict=True) if p == c and g != c)
        fn = sum(1 for p, g in zip(preds, golds, strict=True) if p != c and g == c)
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def primary_metric(task: str) -> tuple[str, bool]:
    """The metric early stopping watches, and whether higher is better."""
    if task in heads.CLASSIFICATION:
        return "accuracy", True
    if task == "causal-lm":
        return "perplexity", False
    return "feature_mse", False


# ---------------------------------------------------------------------------------------------- run files

def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.pelt-tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, meta: dict[str, Any], state: dict[str, Any],
                    metrics: list[dict[str, Any]], gate_doc: dict[str, Any] | None, best: bool) -> None:
    """Write the epoch's checkpoint into the run, each file through a temporary name and a rename."""
    from pelt_cli.apply import ADAPTER_FILE, RUN_FILE
    from pelt_cli.checkpoint import save_file

    adapter = {k: v.detach().cpu() for k, v in surgery.inserted_state(model).items()}
    save_file(adapter, run_dir / ADAPTER_FILE, metadata={"pelt_epoch": str(state["epoch"])})
    sdir = run_dir / STATE_DIR
    sdir.mkdir(exist_ok=True)
    if best:
        save_file(adapter, sdir / "best.safetensors", metadata={"pelt_epoch": str(state["epoch"])})
    tmp = sdir / f".{STATE_FILE}.pelt-tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, sdir / STATE_FILE)
    _atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics))
    if gate_doc is not None and (gate_doc.get("layers") or gate_doc.get("domain")):
        _atomic_write_text(run_dir / gatestats.GATES_FILE, json.dumps(gate_doc, indent=2) + "\n")
    _atomic_write_text(run_dir / RUN_FILE, json.dumps(meta, indent=2) + "\n")


def rng_state() -> dict[str, Any]:
    """Every RNG state that training consumes."""
    import numpy as np

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
            "numpy_keys": torch.from_numpy(np_state[1].astype("int64")), "numpy_pos": int(np_state[2])}


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype("uint32"), s["numpy_pos"], 0, 0.0))


def _data_inputs(meta: dict[str, Any], task: str, tokenizer_path: str | None) -> tuple[Any, Any]:
    """A tokenizer for text tasks, a feature extractor for audio tasks."""
    from pelt_cli.data import feature_extractor_for

    base_dir = Path(meta["base"]["path"])
    base_dir = base_dir if base_dir.is_dir() else base_dir.parent
    if task in ("audio-classification", "domain-matching"):
        import transformers

        return None, feature_extractor_for(transformers.AutoConfig.from_pretrained(str(base_dir)))
    import transformers

    src = tokenizer_path or str(base_dir)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise UsageError(f"{src}: no tokenizer found ({str(e).splitlines()[0][:120]})",
                         hint="pass --tokenizer DIR pointing at tokenizer files for this model") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok, None


def train_run(run_dir: str | os.PathLike[str], data: str, eval_data: str | None = None,
              cfg: TrainConfig | None = None, resume: bool = False, tokenizer: str | None = None,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a run's inserted parameters (and task head) on a dataset; see the module docstring.

    Args:
        run_dir: a run directory made by ``pelt apply``.
        data: a data file (JSONL/CSV/TSV) or a built-in dataset name.
        eval_data: an eval file; default: the built-in dataset's eval split or ``eval_fraction`` of ``data``.
        cfg: hyper-parameters.
        resume: continue from the run's last epoch checkpoint (optimizer, scheduler and RNG state included).
        tokenizer: tokenizer directory when the base has none.
        on_event: progress callback (``{"kind": "start"|"step"|"eval"|"end", …}``); rank 0 only.

    Raises:
        TrainingError: a non-finite loss (the run keeps its last good checkpoint) or a base parameter that trains.
    """
    from pelt_cli.apply import load_run
    from pelt_cli.data import Batcher, class_balance, load_data, resolve_data, split

    cfg = cfg or TrainConfig()
    cfg.check()
    run = Path(run_dir)
    rank, world = dist_info()
    emit = on_event if (on_event and rank == 0) else (lambda e: None)
    device = pick_device(cfg.device)
    train_path, builtin_eval = resolve_data(data)
    from pelt_cli.apply import read_run

    meta0 = read_run(run)
    head0 = meta0.get("head")
    td = load_data(train_path, task=cfg.task or (head0 or {}).get("task"))
    labels = (head0 or {}).get("labels") or td.labels
    if head0 and td.labels and set(td.labels) - set(labels):
        raise UsageError(f"{train_path}: labels {sorted(set(td.labels) - set(labels))} are not among the run's "
                         f"head labels {labels}")
    ev_path = eval_data or (str(builtin_eval) if builtin_eval else None)
    if ev_path:
        ed = load_data(ev_path, task=td.task, labels=labels)
        if td.labels is not None:
            td = load_data(train_path, task=td.task, labels=labels)
    else:
        td, ed = split(td, cfg.eval_fraction, cfg.seed)
    seed_all(cfg.seed)
    model, meta = load_run(run)
    if td.task in heads.CLASSIFICATION and not meta.get("head"):
        meta["head"] = {"task": td.task, "labels": labels, "hidden": heads.hidden_width(model, td.task),
                        "dropout": 0.1}
        heads.attach_head(model, meta["head"])
    trainable, total = surgery.freeze_base(model)
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and not surgery.is_inserted(n)]
    if wrong:
        raise TrainingError(f"base parameter {wrong[0]} would train; refusing to start")
    if trainable == 0:
        raise TrainingError(f"{run}: nothing to train (no inserted parameters)")
    if cfg.gate_temperature is not None:
        for ctl in gatestats.controllers(model).values():
            ctl.temperature = cfg.gate_temperature
    model.to(device).train()
    tok, fe = _data_inputs(meta, td.task, tokenizer)
    train_b = Batcher(td, tokenizer=tok, feature_extractor=fe, max_length=cfg.max_length)
    eval_b = Batcher(ed, tokenizer=tok, feature_extractor=fe, max_length=cfg.max_length)
    n_batches = train_b.n_batches(cfg.batch_size, world_size=world)
    per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = cfg.max_steps or per_epoch * cfg.epochs
    warm = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(model, cfg))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warm, cfg.schedule))
    metric_name, higher = primary_metric(td.task)
    st: dict[str, Any] = {"epoch": 0, "step": 0, "best": -math.inf if higher else math.inf, "best_epoch": 0,
                          "bad_epochs": 0, "history": []}
    if resume:
        st = _resume(run, opt, sched, cfg)
    balance = class_balance(td) if td.labels else None
    meta["training"] = {"config": asdict(cfg), "data": str(train_path), "eval": ev_path or f"{cfg.eval_fraction} "
                        "of data", "task": td.task, "train_rows": len(td.rows), "eval_rows": len(ed.rows),
                        "class_balance": balance, "trainable": trainable, "world_size": world}
    emit({"kind": "start", "total_steps": total_steps, "trainable": trainable, "total": total, "task": td.task,
          "train_rows": len(td.rows), "eval_rows": len(ed.rows), "balance": balance, "epoch": st["epoch"]})
    t0, stopped = time.time(), False
    gate_doc = gatestats.read(run) if resume else None
    for epoch in range(st["epoch"], cfg.epochs):
        done = _epoch(model, train_b, cfg, td.task, device, opt, sched, params, st, epoch, rank, world, emit,
                      total_steps, lambda: evaluate(model, eval_b, cfg, td.task, device, labels)[0])
        metrics, snap = evaluate(model, eval_b, cfg, td.task, device, labels)
        value = metrics[metric_name]
        improved = value > st["best"] if higher else value < st["best"]
        if improved:
            st["best"], st["best_epoch"], st["bad_epochs"] = value, epoch + 1, 0
        else:
            st["bad_epochs"] += 1
        record = {"epoch": epoch + 1, "step": st["step"], **metrics, "seconds": round(time.time() - t0, 3)}
        st["history"].append(record)
        st["epoch"] = epoch + 1
        best_gates = (gate_doc or {}).get("best")
        gate_doc = gatestats.merge_history(gate_doc, snap, epoch + 1)
        if improved or best_gates is None:  # the statistics of the weights early stopping keeps
            best_gates = {"epoch": epoch + 1, **{k: snap[k] for k in ("layers", "domain") if k in snap}}
        gate_doc["best"] = best_gates
        stopped = bool(cfg.patience) and st["bad_epochs"] >= cfg.patience
        if rank == 0:
            st["rng"] = rng_state()
            st["optimizer"], st["scheduler"] = opt.state_dict(), sched.state_dict()
            meta["training"]["result"] = {"epochs_done": st["epoch"], "steps": st["step"], "best_epoch":
                                          st["best_epoch"], metric_name: st["best"], "stopped_early": stopped}
            save_checkpoint(run, model, meta, st, st["history"], gate_doc, improved)
        emit({"kind": "eval", **record, "gates": snap})  # after the checkpoint: an interrupt here loses nothing
        if stopped or done:
            break
    check_ranks_agree(params, world)
    if rank == 0:
        _finish_with_best(run)
    emit({"kind": "end", "best_epoch": st["best_epoch"], "best": st["best"], "metric": metric_name})
    return TrainResult(str(run), td.task, st["epoch"], st["step"], st["best_epoch"], st["best"], metric_name,
                       st["history"], stopped, trainable, time.time() - t0)


def _epoch(model: torch.nn.Module, batcher: Any, cfg: TrainConfig, task: str, device: torch.device, opt: Any,
           sched: Any, params: list, st: dict[str, Any], epoch: int, rank: int, world: int, emit: Callable,
           total_steps: int, evaluator: Callable[[], dict[str, float]] | None = None) -> bool:
    """One pass over the training data; returns True when ``max_steps`` was reached.

    With ``cfg.eval_every`` N, ``evaluator`` runs every N optimizer steps inside the epoch; its metrics go to the
    progress display and the metrics log (``"partial": true``), not to early stopping.
    """
    batches = list(batcher.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, rank=rank,
                                   world_size=world))
    t0 = time.time()
    gated = bool(gatestats.controllers(model))
    for i, batch in enumerate(batches):
        if gated and cfg.gate_warmup:
            set_gates_trainable(model, st["step"] >= cfg.gate_warmup)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _ = compute_loss(model, batch, task)
        penalty = gate_penalty(model, cfg.gate_sparsity)
        total = loss + cfg.gate_lambda * penalty if penalty is not None else loss
        if not torch.isfinite(total.detach()).all():
            raise TrainingError(f"non-finite loss ({total.item()}) at step {st['step'] + 1} (epoch {epoch + 1}, "
                                f"batch {i + 1}); stopped, the run keeps its last good checkpoint",
                                hint="lower --lr, check the data, or clip harder with --max-grad-norm")
        (total / cfg.grad_accum).backward()
        if (i + 1) % cfg.grad_accum and i + 1 != len(batches):
            continue
        all_reduce_grads(params, world)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        st["step"] += 1
        emit({"kind": "step", "step": st["step"], "total_steps": total_steps, "epoch": epoch + 1,
              "loss": loss.item(), "lr": sched.get_last_lr()[0], "rate": (i + 1) / max(time.time() - t0, 1e-9)})
        if cfg.max_steps and st["step"] >= cfg.max_steps:
            return True
        if evaluator and cfg.eval_every and st["step"] % cfg.eval_every == 0 and i + 1 < len(batches):
            record = {"epoch": epoch + 1, "step": st["step"], **evaluator(), "partial": True}
            st["history"].append(record)
            emit({"kind": "eval", **record})
    return False


def _resume(run: Path, opt: Any, sched: Any, cfg: TrainConfig) -> dict[str, Any]:
    p = run / STATE_DIR / STATE_FILE
    if not p.is_file():
        raise UsageError(f"{run}: nothing to resume (no {STATE_DIR}/{STATE_FILE})", hint="train without --resume")
    st = torch.load(p, weights_only=True)
    if st["epoch"] >= cfg.epochs:
        raise UsageError(f"{run}: already trained {st['epoch']} epoch(s); --epochs {cfg.epochs} leaves nothing to "
                         "resume", hint=f"pass --epochs {st['epoch'] + 1} or more")
    opt.load_state_dict(st.pop("optimizer"))
    sched.load_state_dict(st.pop("scheduler"))
    set_rng_state(st.pop("rng"))
    return st


def _finish_with_best(run: Path) -> None:
    """Leave the best epoch's weights in ``adapter.safetensors`` (early stopping keeps the best model), and their
    gate statistics at the top of ``gates.json`` (what ``pelt gates``, ``prune`` and ``merge`` read)."""
    from pelt_cli.apply import ADAPTER_FILE

    doc = gatestats.read(run)
    if doc and doc.get("best"):
        best = doc["best"]
        doc = {**doc, **{k: best[k] for k in ("layers", "domain") if k in best}, "epoch": best["epoch"],
               "last_epoch": doc.get("epoch")}
        _atomic_write_text(run / gatestats.GATES_FILE, json.dumps(doc, indent=2) + "\n")

    best = run / STATE_DIR / "best.safetensors"
    if best.is_file():
        tmp = run / f".{ADAPTER_FILE}.pelt-tmp-{os.getpid()}"
        tmp.write_bytes(best.read_bytes())
        os.replace(tmp, run / ADAPTER_FILE)
