"""Optimisation pieces of ``pelt train``: AdamW parameter groups, the learning-rate schedule, gate sparsity, gate
warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pelt_cli import gates as gatestats
from pelt_cli import surgery
from pelt_cli.train_config import TrainConfig


def group_classifier() -> Callable[[str], str]:
    """Parameter name → optimizer group: ``head``, what a method's ``param_group`` hook names, else ``modules``."""
    from pelt_cli import methods

    hooks = [h for h in (methods.hook(methods.get(n), "param_group") for n in methods.names()) if h is not None]
    return lambda n: "head" if n.startswith("pelt_head.") else next((g for h in hooks if (g := h(n))), "modules")


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups, each with its learning rate: ``modules``, the head, and the groups the methods name (UniPELT's
    ``gates``, the domain adapter's ``scale``)."""
    group_of = group_classifier()
    groups: dict[str, list] = {"modules": [], "gates": [], "scale": [], "head": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_of(n), []).append(p)
    lrs = {"modules": cfg.lr, "gates": cfg.gate_lr or cfg.lr, "scale": cfg.scale_lr, "head": cfg.head_lr or cfg.lr}
    return [
        {"params": ps, "lr": lrs.get(k, cfg.lr), "name": k, "weight_decay": 0.0 if k == "scale" else cfg.weight_decay}
        for k, ps in groups.items()
        if ps
    ]


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
    """Freeze or unfreeze the gate parameters (the ``gates`` optimizer group; gate warm-up)."""
    group_of = group_classifier()
    for n, p in model.named_parameters():
        if surgery.is_inserted(n) and group_of(n) == "gates":
            p.requires_grad_(trainable)
