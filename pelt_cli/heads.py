"""Task heads and losses for ``pelt train``: what sits on top of the model for each task.

A classification head is inserted like any module (a ``pelt_head`` child of the root, so it trains and saves with
the other inserted parameters); its spec lives in ``run.json`` so :func:`pelt_cli.apply.load_run` rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import PeltError

CLASSIFICATION = ("text-classification", "pair-classification", "audio-classification")


class ClassificationHead(nn.Module):
    """Mean-pool the (masked) hidden states, then dropout and a linear layer to ``n_labels`` logits."""

    def __init__(self, hidden: int, n_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, n_labels)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, n_labels]`` for hidden states ``[B, T, d]``."""
        return self.out(self.dropout(mean_pool(h, mask).to(self.out.weight.dtype)))


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the positions a mask keeps (all positions without a mask)."""
    if mask is None:
        return h.mean(dim=1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def hidden_width(model: nn.Module, task: str) -> int:
    """The width of the hidden states a head reads (the audio encoder's for audio tasks)."""
    cfg = model.config
    if task == "audio-classification":
        sub = getattr(cfg, "audio_config", None) or cfg
        return int(getattr(sub, "d_model", None) or sub.hidden_size)
    text = getattr(cfg, "text_config", None) or cfg
    return int(getattr(text, "hidden_size", None) or getattr(text, "d_model", None) or text.n_embd)


def attach_head(model: nn.Module, spec: dict[str, Any]) -> None:
    """Insert the head a run's spec describes (``{"task", "labels", "hidden", "dropout"}``)."""
    if spec["task"] not in CLASSIFICATION:
        return
    weight = next(model.parameters())
    with torch.device(weight.device):
        head = ClassificationHead(spec["hidden"], len(spec["labels"]), spec.get("dropout", 0.1))
    surgery.attach(model, "", "head", head)


def audio_encoder(model: nn.Module) -> nn.Module:
    """The audio encoder of a speech model: Qwen2-Audio's audio tower or Whisper's encoder."""
    for path in ("model.audio_tower", "audio_tower", "model.encoder", "encoder"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise PeltError(f"{type(model).__name__} has no audio encoder (audio_tower or encoder); audio tasks need "
                    "Whisper or Qwen2-Audio")


def forward_hidden(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, Any]:
    """Run the model for a classification task; return the last hidden states and the attention mask."""
    if task == "audio-classification":
        out = audio_encoder(model)(batch["input_features"])
        return out.last_hidden_state, None
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out = model(**inputs, output_hidden_states=True)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out.hidden_states[-1]
    return h, batch.get("attention_mask")


def classification_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, Any]:
    """Cross-entropy of the head's logits; returns ``(loss, logits)``."""
    h, mask = forward_hidden(model, batch, task)
    logits = model.pelt_head(h, mask)
    return nn.functional.cross_entropy(logits.float(), batch["labels"]), logits


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """Causal-LM loss (the model shifts the labels itself)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    if out.loss is None:
        raise PeltError(f"{type(model).__name__} returned no loss for labels; causal-lm needs a *ForCausalLM model")
    return out.loss, None


def domain_features(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Domain matching: ``(adapted source features, reference features, unadapted source features)``.

    The audio encoder is frozen, so it runs without gradients; only the domain adapter sees the graph.
    """
    adapter = domain_adapter(model)
    enc = audio_encoder(model)
    with torch.no_grad():
        ref = enc(batch["reference_features"]).last_hidden_state
        src = enc(batch["source_features"]).last_hidden_state
    return adapter(src), ref, src


def domain_adapter(model: nn.Module) -> nn.Module:
    """The run's inserted domain adapter."""
    for name, mod in model.named_modules():
        if name.endswith(".pelt_domain") or name == "pelt_domain":
            return mod
    raise PeltError("domain-matching needs a run with a domain adapter (pelt apply qwen2-audio-domain-adapter …)")


def domain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """MSE between adapted source features and reference features."""
    out, ref, _ = domain_features(model, batch)
    return nn.functional.mse_loss(out.float(), ref.float()), None
