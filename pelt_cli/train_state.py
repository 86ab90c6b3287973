"""A training run's files: the epoch checkpoint (weights, optimizer, scheduler, RNG, metrics, gates, run.json),
resuming from it, and leaving the best epoch's weights in the run at the end."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from pelt_cli import gates as gatestats
from pelt_cli import surgery
from pelt_cli.errors import UsageError
from pelt_cli.io.atomic import atomic_file, write_bytes_atomic, write_text_atomic
from pelt_cli.run import ADAPTER_FILE, GATES_FILE, METRICS_FILE, RUN_FILE, STATE_DIR, Run
from pelt_cli.train_config import TrainConfig

STATE_FILE = "state.pt"


def save_checkpoint(
    run: Run,
    model: torch.nn.Module,
    state: dict[str, Any],
    metrics: list[dict[str, Any]],
    gate_doc: dict[str, Any] | None,
    best: bool,
) -> None:
    """Write the epoch's checkpoint into the run, each file through a temporary name and a rename."""
    from pelt_cli.io.writer import save_file

    adapter = {k: v.detach().cpu() for k, v in surgery.inserted_state(model).items()}
    save_file(adapter, run.path(ADAPTER_FILE), metadata={"pelt_epoch": str(state["epoch"])})
    sdir = run.path(STATE_DIR)
    sdir.mkdir(exist_ok=True)
    if best:
        save_file(adapter, sdir / "best.safetensors", metadata={"pelt_epoch": str(state["epoch"])})
    with atomic_file(sdir / STATE_FILE) as tmp:
        torch.save(state, tmp)
    write_text_atomic(run.path(METRICS_FILE), "".join(json.dumps(m) + "\n" for m in metrics))
    if gate_doc is not None and (gate_doc.get("layers") or gate_doc.get("domain")):
        write_text_atomic(run.path(GATES_FILE), json.dumps(gate_doc, indent=2) + "\n")
    write_text_atomic(run.path(RUN_FILE), run.meta_json())


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


def load_state(run: Path, opt: Any, sched: Any, cfg: TrainConfig) -> dict[str, Any]:
    p = run / STATE_DIR / STATE_FILE
    if not p.is_file():
        raise UsageError(f"{run}: nothing to resume (no {STATE_DIR}/{STATE_FILE})", hint="train without --resume")
    st = torch.load(p, weights_only=True)
    if st["epoch"] >= cfg.epochs:
        raise UsageError(
            f"{run}: already trained {st['epoch']} epoch(s); --epochs {cfg.epochs} leaves nothing to resume",
            hint=f"pass --epochs {st['epoch'] + 1} or more",
        )
    opt.load_state_dict(st.pop("optimizer"))
    sched.load_state_dict(st.pop("scheduler"))
    set_rng_state(st.pop("rng"))
    return st


def finish_with_best(run: Path) -> None:
    """Leave the best epoch's weights in ``adapter.safetensors`` (early stopping keeps the best model), and their
    gate statistics at the top of ``gates.json`` (what ``pelt gates``, ``prune`` and ``merge`` read)."""
    doc = gatestats.read(run)
    if doc and doc.get("best"):
        best = doc["best"]
        doc = {
            **doc,
            **{k: best[k] for k in ("layers", "domain") if k in best},
            "epoch": best["epoch"],
            "last_epoch": doc.get("epoch"),
        }
        write_text_atomic(run / GATES_FILE, json.dumps(doc, indent=2) + "\n")

    best = run / STATE_DIR / "best.safetensors"
    if best.is_file():
        write_bytes_atomic(run / ADAPTER_FILE, best.read_bytes())
