"""Training diagnostics for ``pelt train``: the progress event of each optimizer step and, every N steps, a
training row of ``metrics.jsonl``.

A training row is ``{"kind": "train", "step", "epoch", "loss", "lr", "grad_norm", "grad_norm_method"}``:

- ``loss``: the mean training loss (task loss, without the gate sparsity term) of the optimizer steps since the
  previous row or the epoch's start (each step's last micro-batch);
- ``lr``: the learning rate of the first optimizer group (``modules``) at that step;
- ``grad_norm``: the L2 norm of the gradients per optimizer group (``modules``, ``gates``, ``scale``, ``head``),
  after averaging over ranks and before clipping; a group without gradients (frozen, e.g. gates during gate
  warm-up) is absent;
- ``grad_norm_method``: the same per method (``lora``, ``prefix``, ``adapter``, … and ``head``), from each inserted
  parameter's ``pelt_<method>`` segment; only when more than one method trains.

Eval rows carry no ``kind`` (they are as before); the norms are computed only on the logged steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

TRAIN_KIND = "train"


def method_of(name: str) -> str:
    """The method an inserted parameter belongs to: ``…query.pelt_lora.A`` → ``lora``, ``pelt_head.x`` → ``head``."""
    seg = next((s for s in name.split(".") if s.startswith("pelt_")), "pelt_other")
    return seg.removeprefix("pelt_")


def is_train_row(row: dict[str, Any]) -> bool:
    """Whether a ``metrics.jsonl`` row is a training row (else an evaluation's)."""
    return row.get("kind") == TRAIN_KIND


class TrainLog:
    """Per optimizer step: the progress event; every ``every`` steps, a training row appended to the history.

    Args:
        model: the model in training (for the parameters' names).
        every: steps between training rows (0: none).
        total_steps: the run's total optimizer steps (for the progress event).
        emit: the progress callback.
    """

    def __init__(self, model: torch.nn.Module, every: int, total_steps: int, emit: Callable) -> None:
        self.every, self.total_steps, self.emit = every, total_steps, emit
        from pelt_cli.surgery import head_params

        head = set(head_params(model))
        self.method = {
            id(p): "head" if n in head else method_of(n) for n, p in model.named_parameters() if p.requires_grad
        }
        self.losses: list[torch.Tensor] = []
        self.t0 = time.time()

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) gets a training row."""
        return bool(self.every) and step % self.every == 0

    def measure(self, opt: Any) -> dict[str, Any]:
        """The learning rate and gradient norms per group and per method, now (call before clipping; one device
        sync)."""
        named = [
            (g.get("name", str(i)), p)
            for i, g in enumerate(opt.param_groups)
            for p in g["params"]
            if p.grad is not None
        ]
        norms = [torch.linalg.vector_norm(p.grad.detach().float()) for _, p in named]
        norms = torch.stack([getattr(n, "full_tensor", lambda n=n: n)() for n in norms]) if named else None  # FSDP
        groups: dict[str, float] = {}
        methods: dict[str, float] = {}
        for (group, p), v in zip(named, norms.double().pow(2).tolist() if named else [], strict=True):
            groups[group] = groups.get(group, 0.0) + v
            m = self.method.get(id(p), "other")
            methods[m] = methods.get(m, 0.0) + v
        out: dict[str, Any] = {
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": {k: math.sqrt(v) for k, v in groups.items()},
        }
        if len(methods) > 1:
            out["grad_norm_method"] = {k: math.sqrt(v) for k, v in sorted(methods.items())}
        return out

    def step(
        self, st: dict[str, Any], epoch: int, batches: int, loss: torch.Tensor, lr: float, norms: dict | None
    ) -> None:
        """After optimizer step ``st["step"]``: emit the progress event; with ``norms`` (a due step), append the
        training row to ``st["history"]``."""
        self.losses.append(loss.detach())
        rate = batches / max(time.time() - self.t0, 1e-9)
        value = loss.item()
        event = {"step": st["step"], "total_steps": self.total_steps, "epoch": epoch, "loss": value, "lr": lr}
        self.emit({"kind": "step", **event, "rate": rate})
        if norms is None:
            return
        mean = float(torch.stack(self.losses).float().mean())
        self.losses = []
        st["history"].append({"kind": TRAIN_KIND, "step": st["step"], "epoch": epoch, "loss": mean, **norms})
