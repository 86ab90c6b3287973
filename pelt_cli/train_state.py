"""A training run's files: each checkpoint (weights, optimizer, scheduler, RNG, metrics, gates, run.json) committed
as one new generation of the run, resuming from it (checked: weights and optimizer state of the same step), and the
best epoch's weights left in the run when training ends.

``RUN/train/`` holds what ``--resume`` needs: ``state.pt`` (loop position, optimizer, scheduler, RNG; read with
``weights_only=True``), ``last.safetensors`` (the weights of that same step, stamped with the checkpoint's id that
``state.pt`` records too) and ``best.safetensors`` (the best epoch's weights). ``adapter.safetensors`` is the last
checkpoint's weights while training runs, the best epoch's once it has ended.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pelt_cli import surgery
from pelt_cli.errors import CheckpointError, TrainingError, UsageError
from pelt_cli.io.atomic import atomic_dir, link_or_copy
from pelt_cli.run import ADAPTER_FILE, GATES_FILE, METRICS_FILE, RUN_FILE, STATE_DIR, Run, check_state
from pelt_cli.train_config import TrainConfig

STATE_FILE = "state.pt"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
STAMP = "pelt_checkpoint"  # the checkpoint id in last.safetensors' metadata; state.pt holds it as "checkpoint"


def save_checkpoint(
    run: Run,
    model: torch.nn.Module,
    state: dict[str, Any],
    metrics: list[dict[str, Any]],
    gate_doc: dict[str, Any] | None,
    best: bool,
    final: bool = False,
    adapter: dict[str, torch.Tensor] | None = None,
    finish: Callable[[Path, Path], Any] | None = None,
) -> None:
    """Commit a checkpoint as one new generation of the run (see :mod:`pelt_cli.io.atomic`): a kill or a full disk
    leaves the previous checkpoint whole.

    Args:
        run: the run (its directory is replaced as a unit; files this does not write are carried over).
        model: the model in training.
        state: the loop state with ``optimizer``, ``scheduler`` and ``rng`` (stamped here with the checkpoint id).
        metrics: the rows of ``metrics.jsonl``.
        gate_doc: ``gates.json`` (None: keep the run's).
        best: this checkpoint's weights are the best so far.
        final: training ends here: ``adapter.safetensors`` and ``gates.json`` get the best epoch's.
        adapter: the run's tensors when the caller gathered them (FSDP shards); default: the model's.
        finish: with ``final``: ``finish(new generation, run dir)`` changes the filled generation before its commit
            (AutoPELT's prune, :func:`pelt_cli.autopelt.finish`): committed with the checkpoint, as one unit.

    Raises:
        TrainingError: a non-finite weight (nothing is written).
    """
    from pelt_cli.io.writer import save_file

    adapter = _finite({k: v.detach().cpu() for k, v in (adapter or surgery.inserted_state(model)).items()}, state)
    state["checkpoint"] = f"step{state['step']}-{uuid.uuid4().hex[:12]}"
    meta = {"pelt_epoch": str(state["epoch"]), "pelt_step": str(state["step"]), STAMP: state["checkpoint"]}
    blob = io.BytesIO()
    torch.save(state, blob)  # in memory: a full disk fails in the plain write below, with an OSError
    src = Path(os.path.realpath(run.dir))
    gates = _final_gates(gate_doc) if final else gate_doc
    gates = gates if gates is not None and (gates.get("layers") or gates.get("domain")) else None
    own = {ADAPTER_FILE, STATE_DIR, METRICS_FILE, RUN_FILE, *([GATES_FILE] if gates is not None else [])}
    with atomic_dir(src, force=True) as tmp:
        link_or_copy(src, tmp, own)
        sdir = tmp / STATE_DIR
        sdir.mkdir()
        if (src / STATE_DIR).is_dir():
            link_or_copy(src / STATE_DIR, sdir, {STATE_FILE, LAST_FILE, *([BEST_FILE] if best else [])})
        save_file(adapter, sdir / LAST_FILE, metadata=meta)
        if best:
            save_file(adapter, sdir / BEST_FILE, metadata=meta)
        (sdir / STATE_FILE).write_bytes(blob.getvalue())
        (tmp / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
        if gates is not None:
            (tmp / GATES_FILE).write_text(json.dumps(gates, indent=2) + "\n", encoding="utf-8")
        (tmp / RUN_FILE).write_text(run.meta_json(), encoding="utf-8")
        kept = sdir / BEST_FILE if final and (sdir / BEST_FILE).is_file() else sdir / LAST_FILE
        shutil.copyfile(kept, tmp / ADAPTER_FILE)  # its own copy: a file people may edit, never a link to train/
        if final and finish is not None:
            finish(tmp, run.dir)


def _finite(adapter: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``adapter`` when every weight is finite; else :class:`TrainingError` (the checkpoint is not written)."""
    bad = [k for k, v in adapter.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingError(
            f"non-finite weights in {bad[0]} at step {state['step']}; stopped, the run keeps its last good checkpoint",
            hint="lower --lr, or clip with --max-grad-norm",
        )
    return adapter


def _final_gates(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """gates.json once training ends: the best epoch's statistics at the top (what ``pelt gates``, ``prune`` and
    ``merge`` read, matching the best weights the run keeps)."""
    if not doc or not doc.get("best"):
        return doc
    best = doc["best"]
    return {
        **doc,
        **{k: best[k] for k in ("layers", "domain") if k in best},
        "epoch": best["epoch"],
        "last_epoch": doc.get("epoch"),
    }


def rng_state() -> dict[str, Any]:
    """Every RNG state that training consumes."""
    import numpy as np

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np_state[1].astype("int64")),
        "numpy_pos": int(np_state[2]),
    }


def set_rng_state(s: dict[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype("uint32"), s["numpy_pos"], 0, 0.0))


def read_state(run: Path, cfg: TrainConfig, model: torch.nn.Module, load: bool = True) -> dict[str, Any]:
    """Resume, part 1 (before the optimizer exists): ``train/state.pt`` of a run, checked to be a training state
    with epochs left, and the weights of that same step put into ``model`` (``load=False``: only checked against it,
    an FSDP rank whose ``meta`` model receives its weights from rank 0).

    Raises:
        UsageError: nothing to resume, or ``cfg.epochs`` already done.
        CheckpointError: a file that is not a pelt training state (never executed: ``weights_only``), or weights
            and optimizer state of different steps.
    """
    p = run / STATE_DIR / STATE_FILE
    if not p.is_file():
        raise UsageError(f"{run}: nothing to resume (no {STATE_DIR}/{STATE_FILE})", hint="train without --resume")
    try:
        st = torch.load(p, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler raises on a damaged or foreign file
        raise CheckpointError(
            f"{p}: not a pelt training state ({type(e).__name__})", hint="train without --resume to start over"
        ) from None
    need = ("epoch", "step", "optimizer", "scheduler", "rng", "history", "best", "best_epoch", "bad_epochs")
    if not isinstance(st, dict) or any(k not in st for k in need):
        raise CheckpointError(f"{p}: not a pelt training state (keys missing)", hint="train without --resume")
    if st["epoch"] >= cfg.epochs:
        raise UsageError(
            f"{run}: already trained {st['epoch']} epoch(s); --epochs {cfg.epochs} leaves nothing to resume",
            hint=f"pass --epochs {st['epoch'] + 1} or more",
        )
    weights = resume_weights(run, st)
    check_state(weights, model, run / STATE_DIR / LAST_FILE)
    if load:
        surgery.load_inserted_state(model, weights)
    return st


def resume_weights(run: Path, st: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of the step ``st`` was saved at: ``train/last.safetensors`` when its stamp matches (a run from
    before it: ``adapter.safetensors`` of the same epoch).

    Raises:
        CheckpointError: weights and optimizer state of different checkpoints.
    """
    from pelt_cli.io.header import read_header
    from pelt_cli.io.reader import load_file

    last = run / STATE_DIR / LAST_FILE
    if last.is_file():
        got, want = read_header(last).metadata.get(STAMP), st.get("checkpoint")
    else:
        last = run / ADAPTER_FILE
        got, want = read_header(last).metadata.get("pelt_epoch"), str(st["epoch"])
        want = None if "checkpoint" in st else want
    if got is None or got != want:
        raise CheckpointError(
            f"{last}: weights of checkpoint {got}, but {STATE_DIR}/{STATE_FILE} holds the optimizer state of {want} "
            f"(step {st['step']}): they do not belong to the same step",
            hint="train without --resume to start over",
        )
    return load_file(last)


def load_state(st: dict[str, Any], opt: Any, sched: Any) -> dict[str, Any]:
    """Resume, part 2: the optimizer, scheduler and RNG states of :func:`read_state`'s ``st``; the loop state."""
    opt.load_state_dict(st.pop("optimizer"))
    sched.load_state_dict(st.pop("scheduler"))
    set_rng_state(st.pop("rng"))
    return st
