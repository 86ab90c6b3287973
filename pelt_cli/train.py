"""``pelt train``: train only the inserted parameters of a run, evaluate, record gates, checkpoint atomically.

The run directory is updated in place, only through atomic renames: ``adapter.safetensors`` (the inserted
parameters, head included), ``run.json`` (head spec and training summary), ``metrics.jsonl``, ``gates.json`` and
``train/state.pt`` (optimizer, scheduler and RNG state for ``--resume``; read back with ``weights_only=True``).

The pieces live beside it: ``optim`` (parameter groups, schedule, gate sparsity), ``train_state`` (the run's
checkpoint files, resume), ``distributed`` (data parallelism under ``torchrun``; only rank 0 writes), ``autopelt``
(each gated unit's contribution, ``--auto-prune``: the loop calls it after each forward, before clipping, after each
step and epoch, and once at the end).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pelt_cli import audio_lm, autopelt, heads, surgery
from pelt_cli import gates as gatestats
from pelt_cli.diagnostics import TrainLog, is_train_row
from pelt_cli.distributed import (
    Engine,
    StepModule,
    check_ranks_agree,
    dist_info,
    full_optimizer_state,
    full_state,
    local_device,
    make_engine,
    reads_weights,
    shard_optimizer_state,
    share_from_rank0,
)
from pelt_cli.errors import TrainingError, UsageError
from pelt_cli.evaluate import compute_loss, data_inputs, evaluate, primary_metric
from pelt_cli.io.atomic import locked
from pelt_cli.optim import gate_penalty, lr_lambda, param_groups, set_gates_trainable
from pelt_cli.precision import Amp, cast_for_training, enable_grad_checkpoint, peak_memory
from pelt_cli.run import Run, inserted_model
from pelt_cli.train_config import TrainConfig, class_weights, is_improvement, resolve_config
from pelt_cli.train_state import load_state, read_state, rng_state, save_checkpoint


def monitored(task: str, cfg: TrainConfig) -> tuple[str, bool]:
    """The eval value early stopping and the best checkpoint follow, and whether higher is better."""
    return ("eval_loss", False) if cfg.early_stop_on == "loss" else primary_metric(task)


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
    peak_memory: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- distributed


# ---------------------------------------------------------------------------------------------- optimisation


# ---------------------------------------------------------------------------------------------- the loop


def pick_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu or auto")
    if name == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return local_device(torch.device(name))  # under torchrun: this rank's GPU


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- run files


@dataclass
class _Data:
    """The training and eval sets of a run, with their labels and where they came from."""

    task: str
    train: Any
    eval: Any
    labels: list[str] | None
    source: str
    eval_source: str


def _load_data(run: Run, data: str, eval_data: str | None, cfg: TrainConfig) -> _Data:
    """The training set, and the eval set (a file, a built-in split, or ``eval_fraction`` of the data)."""
    from pelt_cli.data import load_data, resolve_data, split

    train_path, builtin_eval = resolve_data(data)
    head = run.head or {}
    td = load_data(train_path, task=cfg.task or head.get("task"))
    labels = head.get("labels") or td.labels
    if head and td.labels and set(td.labels) - set(labels):
        raise UsageError(
            f"{train_path}: labels {sorted(set(td.labels) - set(labels))} are not among the run's head labels {labels}"
        )
    ev_path = eval_data or (str(builtin_eval) if builtin_eval else None)
    if not ev_path:
        td, ed = split(td, cfg.eval_fraction, cfg.seed)
        return _Data(td.task, td, ed, labels, str(train_path), f"{cfg.eval_fraction} of data")
    ed = load_data(ev_path, task=td.task, labels=labels)
    if td.labels is not None:
        td = load_data(train_path, task=td.task, labels=labels)
    return _Data(td.task, td, ed, labels, str(train_path), ev_path)


def _task_model(run: Run, d: _Data, cfg: TrainConfig, tok: Any) -> torch.nn.Module:
    """The run's model, with a classification head created on its first training (a transformers task class where
    the family has one, else pelt's own head)."""
    if d.task not in heads.CLASSIFICATION or run.head:
        if run.head and d.task in heads.CLASSIFICATION and run.head.get("task") not in heads.CLASSIFICATION:
            raise UsageError(
                f"{run.dir}: its model ({run.head.get('class')}) has no classification head for {d.task}",
                hint="apply the recipe to the base for a new run",
            )
        if run.head and cfg.new_head:
            raise UsageError(
                f"{run.dir}: already has a trained head; --new-head applies to a run's first training",
                hint="apply the recipe again for a new run",
            )
        return run.load_model()
    pad = getattr(tok, "pad_token_id", None)
    spec = heads.new_head_spec(
        run.base().skeleton(), run.meta.base.model_class or "", run.insertions, d.task, d.labels, cfg.new_head, pad
    )
    if spec is None:  # no fitting transformers class (audio): pelt's mean-pool head
        model = run.load_model()
        run.meta.head = {
            "task": d.task,
            "labels": d.labels,
            "hidden": heads.hidden_width(model, d.task),
            "dropout": 0.1,
        }
        heads.attach_head(model, run.meta.head)
        return model
    model = heads.create_task_model(run.base().directory, spec)
    run.meta.head = spec
    if [r.key for r in inserted_model(model, run.recipe, spec)] != [r.key for r in run.insertions]:
        raise TrainingError(f"{run.dir}: the recipe inserts other modules into {spec['class']} than it recorded")
    surgery.load_inserted_state(model, run.read_adapter())
    return model


def _base_model(run: Run, d: _Data, cfg: TrainConfig, tok: Any, loads: bool) -> torch.nn.Module | None:
    """The base's checks for the task, then the run's model with its head (None on a rank that reads no weight)."""
    if not loads:
        run.base(content=False)  # the structure check only: this rank reads none of the base's tensors
    if d.task == "causal-lm":
        heads.require_lm_head(run.meta.base.model_class or "", run.base().skeleton())
    if d.task == audio_lm.SPEECH_TO_TEXT:
        audio_lm.require_model(run.base().skeleton())
    return _task_model(run, d, cfg, tok) if loads else None


def _model(run: Run, d: _Data, cfg: TrainConfig, device: torch.device, tok: Any) -> tuple[torch.nn.Module, int, int]:
    """The run's model with its task head, only inserted parameters (and the head) trainable;
    ``(model, trainable, total)``. Under ``--fsdp`` only rank 0 reads weights: the others build it on ``meta`` and
    stay there, and rank 0 keeps it on the CPU until ``fully_shard`` moves it block by block (see ``distributed``)."""
    loads, shared = reads_weights(cfg, device), cfg.fsdp and dist_info(device)[1] > 1
    try:
        model = _base_model(run, d, cfg, tok, loads)
    except Exception as e:  # rank 0 tells the ranks waiting for its weights, instead of leaving them blocked
        if not (shared and loads):
            raise
        share_from_rank0(None, None, None, failed=e)
    if shared:
        model, run.meta.head = share_from_rank0(model, run.meta.head, lambda head: run.skeleton(head=head)[0])
    trainable, total = surgery.freeze_base(model)
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and not surgery.is_trainable(model, n)]
    if wrong:
        raise TrainingError(f"base parameter {wrong[0]} would train; refusing to start")
    if trainable == 0:
        raise TrainingError(f"{run.dir}: nothing to train (no inserted parameters)")
    if cfg.gate_temperature is not None:
        for ctl in gatestats.controllers(model).values():
            ctl.temperature = cfg.gate_temperature
    _set_class_weights(model, d, cfg)
    cast_for_training(model, cfg.base_dtype)  # the base in --base-dtype, what trains in fp32
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model)
    return (model if cfg.fsdp else model.to(device)).train(), trainable, total


def _set_class_weights(model: torch.nn.Module, d: _Data, cfg: TrainConfig) -> None:
    """``--class-weights auto``: the training loss's per-class weights (:func:`class_weights`) on the model as
    ``pelt_class_weights`` (a plain attribute, never saved); the eval loss stays unweighted."""
    if cfg.class_weights == "none":
        return
    if d.task not in heads.CLASSIFICATION or not d.labels:
        raise UsageError(f"--class-weights {cfg.class_weights}: applies to classification tasks, not {d.task}")
    model.pelt_class_weights = torch.tensor(class_weights(d.train.rows, d.labels))


@dataclass
class _Loop:
    """Everything the epoch loop shares."""

    run: Run
    model: torch.nn.Module
    cfg: TrainConfig
    data: _Data
    device: torch.device
    train_b: Any
    eval_b: Any
    opt: Any
    sched: Any
    params: list
    total_steps: int
    rank: int
    world: int
    emit: Callable[[dict[str, Any]], None]
    engine: Engine
    contrib: autopelt.Tracker | None = None  # AutoPELT: contributions, --auto-prune

    def evaluate(self) -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics and gate statistics on the eval set."""
        d = self.data
        return self.engine.evaluate(lambda m: evaluate(m, self.eval_b, self.cfg, d.task, self.device, d.labels))


def _loop(
    run: Run, model: torch.nn.Module, d: _Data, cfg: TrainConfig, device: torch.device, inputs: tuple, emit: Callable
) -> _Loop:
    """Batchers, optimizer and schedule for a run's training (``inputs``: the tokenizer and feature extractor)."""
    from pelt_cli.data import Batcher

    rank, world = dist_info(device)
    tok, fe = inputs
    train_b = Batcher(d.train, tokenizer=tok, feature_extractor=fe, max_length=cfg.max_length)
    eval_b = Batcher(d.eval, tokenizer=tok, feature_extractor=fe, max_length=cfg.max_length)
    per_epoch = math.ceil(train_b.n_batches(cfg.batch_size, world_size=world) / cfg.grad_accum)
    total_steps = cfg.max_steps or per_epoch * cfg.epochs
    warm = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)
    # frozen gates (gate warm-up) and switched-off modules (--auto-prune) get no gradient: DDP must look for them
    unused = bool(gatestats.controllers(model)) and (cfg.gate_warmup > 0 or cfg.auto_prune is not None)
    engine = make_engine(model, cfg, world, device, find_unused=unused)  # before the optimizer: FSDP shards
    opt = torch.optim.AdamW(param_groups(model, cfg))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warm, cfg.schedule))
    params = [p for p in model.parameters() if p.requires_grad]
    return _Loop(
        run,
        model,
        cfg,
        d,
        device,
        train_b,
        eval_b,
        opt,
        sched,
        params,
        total_steps,
        rank,
        world,
        emit if rank == 0 else (lambda e: None),
        engine,
    )


def train_run(
    run_dir: str | os.PathLike[str],
    data: str,
    eval_data: str | None = None,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    tokenizer: str | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    given: Collection[str] | None = None,
) -> TrainResult:
    """Train a run's inserted parameters (and task head) on a dataset; see the module docstring.

    Args:
        run_dir: a run directory made by ``pelt apply``.
        data: a data file (JSONL/CSV/TSV) or a built-in dataset name.
        eval_data: an eval file; default: the built-in dataset's eval split or ``eval_fraction`` of ``data``.
        cfg: hyper-parameters; the run recipe's ``train:`` section fills what ``given`` leaves out.
        resume: continue from the run's last epoch checkpoint (optimizer, scheduler and RNG state included).
        tokenizer: tokenizer directory when the base has none.
        on_event: progress callback (``{"kind": "start"|"step"|"eval"|"end", …}``); rank 0 only.
        given: the fields of ``cfg`` set on purpose (see :func:`resolve_config`).

    Raises:
        TrainingError: a non-finite loss (the run keeps its last good checkpoint) or a base parameter that trains.
    """
    run = Run.open(run_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes
    with locked(run.dir) if rank0 else contextlib.nullcontext():  # a second process writing the run is refused
        return _train(run, data, eval_data, cfg, resume, tokenizer, on_event, given)


def _train(
    run: Run,
    data: str,
    eval_data: str | None,
    cfg: TrainConfig | None,
    resume: bool,
    tokenizer: str | None,
    on_event: Callable[[dict[str, Any]], None] | None,
    given: Collection[str] | None,
) -> TrainResult:
    """:func:`train_run` on an opened run, its lock held."""
    cfg = resolve_config(cfg, given, dict(run.recipe.train) if run.recipe else {})
    cfg.check()
    device = pick_device(cfg.device)
    d = _load_data(run, data, eval_data, cfg)
    inputs = data_inputs(run.meta.base.path, d.task, tokenizer)
    seed_all(cfg.seed)
    model, trainable, total = _model(run, d, cfg, device, inputs[0])
    cfg = fit_max_length(cfg, model)
    saved = read_state(run.dir, cfg, model, load=reads_weights(cfg, device)) if resume else None  # before sharding
    lp = _loop(run, model, d, cfg, device, inputs, on_event or (lambda e: None))
    if inputs[0] is not None or inputs[1] is not None:  # what merge and export copy beside the weights
        run.meta.extra["tokenizer"] = str(Path(tokenizer or run.meta.base.path).resolve())
    metric_name, higher = monitored(d.task, cfg)
    st = load_state(saved, lp.opt, lp.sched) if saved is not None else _fresh_state(higher)
    shard_optimizer_state(lp.opt)  # FSDP: the resumed full state, sharded like the parameters
    lp.contrib = autopelt.tracker(run, model, cfg, lp.params, st)
    _start(lp, st, trainable, total)
    t0 = time.time()
    stopped = _epochs(lp, st, gatestats.read(run.dir) if resume else None, t0)
    check_ranks_agree(lp.params, lp.world)
    peak = peak_memory(device)
    lp.emit({"kind": "end", "best_epoch": st["best_epoch"], "best": st["best"], "metric": metric_name, "peak": peak})
    return TrainResult(
        str(run.dir),
        d.task,
        st["epoch"],
        st["step"],
        st["best_epoch"],
        st["best"],
        metric_name,
        [r for r in st["history"] if not is_train_row(r) and "kind" not in r],
        stopped,
        trainable,
        time.time() - t0,
        peak,
    )


POSITION_TABLES = ("position_embeddings", "wpe")  # learned absolute positions (BERT-style, GPT-2)


def fit_max_length(cfg: TrainConfig, model: torch.nn.Module) -> TrainConfig:
    """``cfg`` with ``max_length`` lowered to what the model's learned position table holds (e.g. the default 128 on
    a model with 64 positions, which would fail inside its embeddings); recorded as used in ``run.json``.

    The table is read off the model itself: its rows, less the ids up to its ``padding_idx`` where positions count
    from the padding id (RoBERTa, MPNet, …). A model without one (rotary positions: LLaMA, Qwen2) keeps it."""
    table = next(
        (
            m
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Embedding) and n.rsplit(".", 1)[-1] in POSITION_TABLES
        ),
        None,
    )
    if table is None:
        return cfg
    positions = table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)
    return dataclasses.replace(cfg, max_length=positions) if cfg.max_length > positions >= 2 else cfg


def _fresh_state(higher: bool) -> dict[str, Any]:
    """The loop state of a run's first training."""
    best = -math.inf if higher else math.inf
    return {"epoch": 0, "step": 0, "best": best, "best_epoch": 0, "bad_epochs": 0, "history": []}


def _start(lp: _Loop, st: dict[str, Any], trainable: int, total: int) -> None:
    """Record the training settings in ``run.json`` and tell the progress display what starts."""
    from pelt_cli.data import class_balance

    d = lp.data
    balance = class_balance(d.train) if d.train.labels else None
    sizes = {"train_rows": len(d.train.rows), "eval_rows": len(d.eval.rows)}
    lp.run.meta.training = {
        "config": asdict(lp.cfg),
        "data": d.source,
        "eval": d.eval_source,
        "task": d.task,
        **sizes,
        "class_balance": balance,
        "trainable": trainable,
        "world_size": lp.world,
    }
    lp.emit(
        {
            "kind": "start",
            "total_steps": lp.total_steps,
            "trainable": trainable,
            "total": total,
            "task": d.task,
            **sizes,
            "balance": balance,
            "epoch": st["epoch"],
        }
    )


def _epochs(lp: _Loop, st: dict[str, Any], gate_doc: dict[str, Any] | None, t0: float) -> bool:
    """The epoch loop (evaluation, early stopping and a checkpoint after each); True when it stopped early."""
    metric_name, higher = monitored(lp.data.task, lp.cfg)
    for epoch in range(st["epoch"], lp.cfg.epochs):
        done = run_epoch(
            lp.model,
            lp.train_b,
            lp.cfg,
            lp.data.task,
            lp.device,
            lp.opt,
            lp.sched,
            lp.params,
            st,
            epoch,
            lp.rank,
            lp.world,
            lp.emit,
            lp.total_steps,
            lambda: lp.evaluate()[0],
            lp.engine,
            saver=lambda: _checkpoint(lp, st, None, False, metric_name, False),
            contrib=lp.contrib,
        )
        st["pos"] = 0
        metrics, snap = lp.evaluate()
        value = metrics[metric_name]
        if not math.isfinite(metrics.get("eval_loss", 0.0)):  # never kept, let alone as the best epoch
            raise TrainingError(
                f"non-finite eval loss ({metrics['eval_loss']}) after epoch {epoch + 1}; stopped, the run keeps its "
                "last good checkpoint",
                hint="lower --lr, or clip with --max-grad-norm",
            )
        improved = is_improvement(value, st["best"], higher, lp.cfg.min_delta)
        if improved:
            st["best"], st["best_epoch"], st["bad_epochs"] = value, epoch + 1, 0
        else:
            st["bad_epochs"] += 1
        record = {"epoch": epoch + 1, "step": st["step"], **metrics, "seconds": round(time.time() - t0, 3)}
        record.update(gatestats.eval_diagnostics(snap))  # gate entropy per site, prefix activation
        st["history"].append(record)
        st["epoch"] = epoch + 1
        gate_doc = _gate_history(gate_doc, snap, epoch + 1, improved)
        autopelt.record(lp.contrib, gate_doc, st, epoch + 1, improved)
        stopped = bool(lp.cfg.patience) and st["bad_epochs"] >= lp.cfg.patience
        final = stopped or done or epoch + 1 == lp.cfg.epochs  # then the best epoch's weights stay in the run
        _checkpoint(lp, st, gate_doc, improved, metric_name, stopped, final)  # every rank gathers, rank 0 writes
        lp.emit({"kind": "eval", **record, "gates": snap})  # after the checkpoint: an interrupt here loses nothing
        if stopped or done:
            return stopped
    return False


def _gate_history(doc: dict[str, Any] | None, snap: dict[str, Any], epoch: int, improved: bool) -> dict[str, Any]:
    """gates.json after an epoch: the epoch's statistics, their history, and those of the best epoch so far."""
    best = (doc or {}).get("best")
    doc = gatestats.merge_history(doc, snap, epoch)
    if improved or best is None:  # the statistics of the weights early stopping keeps
        best = {"epoch": epoch, **{k: snap[k] for k in ("layers", "domain") if k in snap}}
    doc["best"] = best
    return doc


def _checkpoint(
    lp: _Loop,
    st: dict[str, Any],
    gate_doc: dict[str, Any] | None,
    improved: bool,
    metric_name: str,
    stopped: bool,
    final: bool = False,
) -> None:
    """Commit the run's checkpoint: after an epoch, or with ``--save-every`` inside one (then ``gate_doc`` is None:
    the run keeps its gates.json, and ``st["pos"]`` holds the batches done in the epoch)."""
    adapter = full_state(surgery.inserted_state(lp.model))  # a collective under FSDP
    optimizer = full_optimizer_state(lp.opt)
    if lp.rank != 0:
        return
    autopelt.keep_state(lp.contrib, st)
    st["rng"] = rng_state()
    st["optimizer"], st["scheduler"] = optimizer, lp.sched.state_dict()
    lp.run.meta.training["peak_memory"] = peak_memory(lp.device)
    lp.run.meta.training["result"] = {
        "epochs_done": st["epoch"],
        "steps": st["step"],
        "best_epoch": st["best_epoch"],
        metric_name: st["best"],
        "stopped_early": stopped,
    }
    finish = autopelt.finish if lp.contrib is not None else None  # the final commit prunes what --auto-prune left off
    save_checkpoint(lp.run, lp.model, st, st["history"], gate_doc, improved, final, adapter=adapter, finish=finish)


def run_epoch(
    model: torch.nn.Module,
    batcher: Any,
    cfg: TrainConfig,
    task: str,
    device: torch.device,
    opt: Any,
    sched: Any,
    params: list,
    st: dict[str, Any],
    epoch: int,
    rank: int,
    world: int,
    emit: Callable,
    total_steps: int,
    evaluator: Callable[[], dict[str, float]] | None = None,
    engine: Engine | None = None,
    saver: Callable[[], None] | None = None,
    contrib: autopelt.Tracker | None = None,
) -> bool:
    """One pass over the training data; returns True when ``max_steps`` was reached.

    With ``cfg.eval_every`` N, ``evaluator`` runs every N optimizer steps inside the epoch; its metrics go to the
    progress display and the metrics log (``"partial": true``), not to early stopping. ``engine`` runs the forward
    and backward (DDP, FSDP, autocast); default: the model itself in fp32. ``saver``: see :func:`_inside_epoch`.
    """
    engine = engine or Engine(model, StepModule(model), "single", Amp(device.type))
    n = batcher.n_batches(cfg.batch_size, world_size=world)
    first_sync = min(cfg.grad_accum, n) - 1  # the first micro-step whose gradients are complete
    log = TrainLog(model, cfg.log_every, total_steps, emit)
    start = _resume_position(st, log)
    gated = bool(gatestats.controllers(model))
    order = dict(shuffle=True, seed=cfg.seed, epoch=epoch, rank=rank, world_size=world, start=start)
    for i, batch in enumerate(batcher.batches(cfg.batch_size, **order), start):  # each batch made as it is needed
        if gated and cfg.gate_warmup:
            set_gates_trainable(model, st["step"] >= cfg.gate_warmup)
        batch = {k: v.to(device) for k, v in batch.items()}
        final = (i + 1) % cfg.grad_accum == 0 or i + 1 == n  # gradients communicated only then
        where = f"step {st['step'] + 1} (epoch {epoch + 1}, batch {i + 1})"
        with engine.sync(final):
            loss, total = engine.forward(_step_loss, batch, cfg, task, where)
            if contrib is not None:
                contrib.observe()  # the micro-batch's gates
            engine.amp.backward(total / cfg.grad_accum)
        if i == first_sync:
            check_gradients(model, task)
        if not final:
            continue
        norms = _optimizer_step(opt, sched, params, cfg, engine.amp, log if log.due(st["step"] + 1) else None, contrib)
        st["step"] += 1
        log.step(st, epoch + 1, i + 1, loss, sched.get_last_lr()[0], norms)
        if contrib is not None:  # every --window steps with --auto-prune: probe, switch units off and on
            probe = lambda b=batch, w=where: engine.forward(_step_loss, b, cfg, task, w)[0]  # noqa: E731
            contrib.after_step(st, epoch + 1, probe, emit)
        if cfg.max_steps and st["step"] >= cfg.max_steps:
            return True
        if i + 1 < n:
            _inside_epoch(cfg, st, epoch, i + 1, log, evaluator, saver, emit)
    return False


def _resume_position(st: dict[str, Any], log: TrainLog) -> int:
    """The batches of the epoch a resumed mid-epoch checkpoint had done (0 at an epoch's start); the losses its next
    training row averages go back into ``log``."""
    start = st.get("pos", 0)
    if start:
        log.losses = list(st.pop("log_losses", torch.zeros(0)).unbind())
    return start


def _inside_epoch(
    cfg: TrainConfig,
    st: dict[str, Any],
    epoch: int,
    done: int,
    log: TrainLog,
    evaluator: Callable[[], dict[str, float]] | None,
    saver: Callable[[], None] | None,
    emit: Callable,
) -> None:
    """After an optimizer step before the epoch's end (``done`` batches of it): ``--eval-every``'s evaluation, then
    ``--save-every``'s checkpoint, which records ``done`` as ``st["pos"]`` so that a resume skips those batches (an
    epoch's order depends only on the seed and the epoch) and continues bit for bit."""
    if evaluator and cfg.eval_every and st["step"] % cfg.eval_every == 0:
        record = {"epoch": epoch + 1, "step": st["step"], **evaluator(), "partial": True}
        st["history"].append(record)
        emit({"kind": "eval", **record})
    if saver and cfg.save_every and st["step"] % cfg.save_every == 0:
        st["pos"], st["log_losses"] = done, torch.stack(log.losses) if log.losses else torch.zeros(0)
        saver()
        del st["log_losses"]


def _step_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, task: str, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(task loss, loss + gate sparsity term)`` of one batch; a non-finite loss stops training."""
    loss, _ = compute_loss(model, batch, task, getattr(model, "pelt_class_weights", None))
    penalty = gate_penalty(model, cfg.gate_sparsity)
    total = loss + cfg.gate_lambda * penalty if penalty is not None else loss
    if not torch.isfinite(total.detach()).all():
        raise TrainingError(
            f"non-finite loss ({total.item()}) at {where}; stopped, the run keeps its last good checkpoint",
            hint="lower --lr, check the data, or clip harder with --max-grad-norm",
        )
    return loss, total


def check_gradients(model: torch.nn.Module, task: str) -> None:
    """Refuse a run whose trainable modules get no gradient from the task's loss (after the first backward).

    Raises:
        TrainingError: the modules (by path) that no gradient reaches: they would never train.
    """
    dead = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad and p.grad is None})
    if dead:
        more = f" and {len(dead) - 3} more" if len(dead) > 3 else ""
        raise TrainingError(
            f"no gradient reaches {len(dead)} trainable module(s) from the {task} loss: "
            f"{', '.join(dead[:3])}{more}; they would never train",
            hint="insert the modules where the task's loss flows (e.g. recipe blocks: [encoder] for "
            "an audio task), or pick the task that uses them",
        )


def _optimizer_step(
    opt: Any,
    sched: Any,
    params: list,
    cfg: TrainConfig,
    amp: Amp,
    log: TrainLog | None = None,
    contrib: autopelt.Tracker | None = None,
) -> dict[str, Any] | None:
    """Clip the (rank-averaged, unscaled) gradients, step the optimizer and the schedule; with ``log``, its
    measurement of the gradient norms before clipping (else None); with ``contrib``, each unit's contribution."""
    amp.unscale(opt)
    if contrib is not None:
        contrib.measure()
    norms = log.measure(opt) if log is not None else None
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
    amp.step(opt)
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norms
