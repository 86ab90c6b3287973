"""``pelt train``'s settings: :class:`TrainConfig`, how a recipe's ``train:`` section and the options combine,
and the small rules they feed (improvement with ``min_delta``, class weights). No torch import."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pelt_cli.errors import UsageError


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
    early_stop_on: str = "metric"  # metric: the task's primary metric; loss: the eval loss
    min_delta: float = 0.0  # an epoch improves only when it beats the best by more than this
    class_weights: str = "none"  # auto: cross-entropy weighted by inverse class frequency (training loss only)
    eval_every: int = 0
    log_every: int = 10  # a "kind": "train" row (loss, lr, gradient norms) in metrics.jsonl every N steps; 0: none
    eval_fraction: float = 0.1
    max_length: int = 128
    max_steps: int | None = None
    save_every: int = 0  # also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends)
    seed: int = 0
    task: str | None = None
    new_head: bool = False
    device: str = "auto"
    precision: str = "fp32"  # autocast dtype of the forward: fp32 (none), bf16, fp16 (with a gradient scaler)
    base_dtype: str = "auto"  # the frozen base's dtype (auto: as stored); trained parameters stay fp32
    grad_checkpoint: bool = False  # activation checkpointing on the blocks
    fsdp: bool = False  # FSDP2: shard the model over the torchrun processes (else DDP replicates it)
    auto_prune: float | None = None  # AutoPELT θ on the relative contribution (see pelt_cli.autopelt); None: off
    window: int = 1000  # AutoPELT's window: steps averaged into a contribution, and between auto-prune decisions

    def check(self) -> None:
        """Raise UsageError for values out of range."""
        rules = [
            (self.epochs >= 1, f"--epochs {self.epochs}: expected ≥ 1"),
            (self.batch_size >= 1, f"--batch-size {self.batch_size}: expected ≥ 1"),
            (self.lr > 0, f"--lr {self.lr}: expected > 0"),
            (self.grad_accum >= 1, f"--grad-accum {self.grad_accum}: expected ≥ 1"),
            (0 <= self.warmup, f"--warmup {self.warmup}: expected a fraction of the steps (0–1) or a step count"),
            (
                self.schedule in ("linear", "cosine", "constant"),
                f"--schedule {self.schedule!r}: expected linear, cosine or constant",
            ),
            (
                self.gate_sparsity in ("none", "entropy", "l1"),
                f"--gate-sparsity {self.gate_sparsity!r}: expected none, entropy or l1",
            ),
            (self.patience >= 0, f"--patience {self.patience}: expected ≥ 0 (0 disables early stopping)"),
            (
                self.early_stop_on in ("metric", "loss"),
                f"--early-stop-on {self.early_stop_on!r}: expected metric or loss",
            ),
            (self.min_delta >= 0, f"--min-delta {self.min_delta}: expected ≥ 0"),
            (self.class_weights in ("none", "auto"), f"--class-weights {self.class_weights!r}: expected none or auto"),
            (0 < self.eval_fraction < 1, f"--eval-fraction {self.eval_fraction}: expected between 0 and 1"),
            (self.eval_every >= 0, f"--eval-every {self.eval_every}: expected ≥ 0 (0: only at epoch ends)"),
            (self.log_every >= 0, f"--log-every {self.log_every}: expected ≥ 0 (0: no training-loss rows)"),
            (self.max_length >= 2, f"--max-length {self.max_length}: expected ≥ 2"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: expected ≥ 0"),
            (self.head_lr is None or self.head_lr > 0, f"--head-lr {self.head_lr}: expected > 0"),
            (self.device in ("auto", "cpu", "cuda"), f"--device {self.device!r}: expected auto, cpu or cuda"),
            (
                self.precision in ("fp32", "bf16", "fp16"),
                f"--precision {self.precision!r}: expected fp32, bf16 or fp16",
            ),
            (
                self.base_dtype in ("auto", "fp32", "bf16", "fp16"),
                f"--base-dtype {self.base_dtype!r}: expected auto, fp32, bf16 or fp16",
            ),
            (
                self.gate_temperature is None or self.gate_temperature > 0,
                f"--gate-temperature {self.gate_temperature}: expected > 0",
            ),
        ]
        for ok, message in [*rules, *self._range_rules()]:
            if not ok:
                raise UsageError(message)

    def _range_rules(self) -> list[tuple[bool, str]]:
        """The numeric options the rules above leave open: finite, and not negative where that means nothing."""
        finite = ("lr", "gate_lr", "scale_lr", "head_lr", "weight_decay", "warmup", "max_grad_norm", "gate_lambda")
        finite += ("gate_temperature", "min_delta", "eval_fraction")
        opt = {f: "--" + f.replace("_", "-") for f in finite}
        return [
            *[
                (
                    getattr(self, f) is None or math.isfinite(getattr(self, f)),
                    f"{opt[f]} {getattr(self, f)}: expected a finite number",
                )
                for f in finite
            ],
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps {self.max_steps}: expected ≥ 1"),
            (self.max_grad_norm >= 0, f"--max-grad-norm {self.max_grad_norm}: expected ≥ 0 (0: no clipping)"),
            (self.gate_lr is None or self.gate_lr > 0, f"--gate-lr {self.gate_lr}: expected > 0"),
            (self.scale_lr > 0, f"--scale-lr {self.scale_lr}: expected > 0"),
            (self.gate_lambda >= 0, f"--gate-lambda {self.gate_lambda}: expected ≥ 0"),
            (self.gate_warmup >= 0, f"--gate-warmup {self.gate_warmup}: expected ≥ 0 (steps with gates frozen)"),
            (self.save_every >= 0, f"--save-every {self.save_every}: expected ≥ 0 (0: only at epoch ends)"),
            (0 <= self.seed < 2**63, f"--seed {self.seed}: expected an integer from 0 to 2**63 - 1"),
            (
                self.auto_prune is None or 0 <= self.auto_prune <= 1,
                f"--auto-prune {self.auto_prune}: expected θ in [0, 1] (a unit's contribution relative to the largest)",
            ),
            (self.window >= 1, f"--window {self.window}: expected ≥ 1 (optimizer steps)"),
            (
                not (self.fsdp and self.auto_prune is not None),
                "--auto-prune: not with --fsdp (sharded gradients); train with DDP or on one device",
            ),
        ]


def resolve_config(cfg: TrainConfig | None, given: Collection[str] | None, recipe_train: dict[str, Any]) -> TrainConfig:
    """The settings a run trains with: TrainConfig defaults < the recipe's ``train:`` section < what was given.

    Args:
        cfg: the caller's settings (the CLI's options); None: the defaults.
        given: the fields of ``cfg`` set on purpose (options given on the command line); None: all of them when
            ``cfg`` is given (the recipe's section then changes nothing), none when it is not.
        recipe_train: the run recipe's validated ``train:`` section (only the keys it sets).
    """
    if cfg is None:
        cfg, given = TrainConfig(), ()
    elif given is None:
        return cfg
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    merged = {k: v for k, v in recipe_train.items() if k in fields and k not in set(given)}
    return dataclasses.replace(cfg, **merged)


def is_improvement(value: float, best: float, higher: bool, min_delta: float) -> bool:
    """Whether an epoch's ``value`` beats ``best`` by more than ``min_delta``."""
    return value > best + min_delta if higher else value < best - min_delta


def class_weights(rows: list[dict[str, Any]], labels: list[str]) -> list[float]:
    """Inverse class frequency, ``N / (K · n_c)`` (1 for every class when balanced); 0 for a class without rows."""
    from pelt_cli.data import label_counts

    counts = label_counts(rows)
    n, k = sum(counts.get(lab, 0) for lab in labels), len(labels)
    return [n / (k * counts.get(lab, 0)) if counts.get(lab, 0) else 0.0 for lab in labels]
