"""Task heads and losses for ``pelt train``: what sits on top of the model for each task.

Classification trains the family's transformers task class (``AutoModelForSequenceClassification``; audio:
``AutoModelForAudioClassification`` where it fits) on top of the base: the run's modules go into the task model's
base (its ``base_model_prefix`` child, or the task model itself when the base already was one), and the head — the
task model's parameters the base checkpoint does not hold, plus its classifier — trains with them (peft's
``modules_to_save``). Its spec (class, labels, head parameters) lives in ``run.json``; the head's tensors are saved
with the run's as ``pelt_head.<name>``, so a merge writes a plain ``*ForSequenceClassification`` checkpoint.

Where the family has no fitting audio class, audio classification falls back to pelt's own mean-pool head (a
``pelt_head`` child of the model, inserted like any module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pelt_cli import surgery
from pelt_cli.errors import PeltError

CLASSIFICATION = ("text-classification", "pair-classification", "audio-classification")
AUTO_CLASS = {
    "text-classification": "AutoModelForSequenceClassification",
    "pair-classification": "AutoModelForSequenceClassification",
    "audio-classification": "AutoModelForAudioClassification",
}


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
    raise PeltError(
        f"{type(model).__name__} has no audio encoder (audio_tower or encoder); audio tasks need Whisper or Qwen2-Audio"
    )


def forward_hidden(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, Any]:
    """Run the model for a classification task; return the last hidden states and the attention mask."""
    if task == "audio-classification":
        h = audio_encoder(model)(batch["input_features"]).last_hidden_state
        adapter = find_domain_adapter(model)
        return (adapter(h) if adapter is not None else h), None  # a domain run: the adapted features
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out = model(**inputs, output_hidden_states=True)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out.hidden_states[-1]
    return h, batch.get("attention_mask")


def classification_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], task: str, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, Any]:
    """Cross-entropy of the head's logits (a task model's, or pelt's own head's), weighted per class by ``weight``
    if given; returns ``(loss, logits)``."""
    if surgery.head_params(model):
        logits = task_logits(model, batch, task)
    else:
        h, mask = forward_hidden(model, batch, task)
        logits = model.pelt_head(h, mask)
    w = weight.to(logits.device, torch.float32) if weight is not None else None
    return nn.functional.cross_entropy(logits.float(), batch["labels"], weight=w), logits


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


def find_domain_adapter(model: nn.Module) -> nn.Module | None:
    """The run's inserted domain adapter, or None."""
    for name, mod in model.named_modules():
        if name.endswith(".pelt_domain") or name == "pelt_domain":
            return mod
    return None


def domain_adapter(model: nn.Module) -> nn.Module:
    """The run's inserted domain adapter.

    Raises:
        PeltError: the run has none.
    """
    adapter = find_domain_adapter(model)
    if adapter is None:
        raise PeltError("domain-matching needs a run with a domain adapter (pelt apply qwen2-audio-domain-adapter …)")
    return adapter


def domain_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """MSE between adapted source features and reference features."""
    out, ref, _ = domain_features(model, batch)
    return nn.functional.mse_loss(out.float(), ref.float()), None


# ---------------------------------------------------------------------------------------------------- HF task heads


def task_class(config: Any, task: str) -> type | None:
    """The transformers task class for ``task`` on a model with this config, or None when the family has none."""
    import transformers

    auto = AUTO_CLASS.get(task)
    if auto is None:
        return None
    return getattr(transformers, auto)._model_mapping.get(type(config), None)


def is_task_head(spec: dict[str, Any] | None) -> bool:
    """Whether a run's head spec is a transformers task class (else pelt's own head, or none)."""
    return bool(spec) and "class" in spec


def task_config(directory: Any, spec: dict[str, Any]) -> Any:
    """The base's config turned into the task model's: class, labels, problem type, padding token."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(str(directory))
    labels = list(spec["labels"])
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {label: i for i, label in enumerate(labels)}
    cfg.problem_type = spec.get("problem_type", "single_label_classification")
    cfg.architectures = [spec["class"]]
    if spec.get("pad_token_id") is not None:
        cfg.pad_token_id = spec["pad_token_id"]
    return cfg


def root_of(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The module of a task model that the run's recipe paths start from."""
    return model.get_submodule(spec["root"]) if spec.get("root") else model


def build_task_model(directory: Any, spec: dict[str, Any], keys: Any = None, meta: bool = False) -> nn.Module:
    """The task model of a run's head spec: from the base checkpoint's weights, or on ``meta`` (no weights)."""
    import transformers

    cls = getattr(transformers, spec["class"])
    cfg = task_config(directory, spec)
    if meta:
        with torch.device("meta"):
            model = cls(cfg)
    else:
        model = cls.from_pretrained(
            str(directory), config=cfg, dtype="auto", ignore_mismatched_sizes=bool(spec.get("new_head"))
        )
    surgery.set_task_model(model, root_of(model, spec), spec["params"])
    return model


def new_head_spec(
    run_model: nn.Module,
    base_class: str,
    rows: list[Any],
    task: str,
    labels: list[str],
    new_head: bool,
    pad_token_id: int | None,
) -> dict[str, Any] | None:
    """The head spec for training ``task`` on a run (None: no task class fits, use pelt's own head).

    Raises:
        UsageError: no task class for this family and task (text), or a base task head whose labels do not fit.
    """
    from pelt_cli.errors import UsageError

    cls = task_class(run_model.config, task)
    prefix = getattr(cls, "base_model_prefix", "") if cls is not None else ""
    bare = bool(rows) and not all(r.site.startswith(prefix + ".") for r in rows)
    holds = cls is not None and _holds(cls, run_model.config, rows, prefix if bare else "")
    if not holds and task == "audio-classification":
        return None  # e.g. Whisper: the audio class has no decoder for the run's decoder modules
    if cls is None:
        raise UsageError(
            f"{type(run_model).__name__}: transformers has no {AUTO_CLASS[task]} class for "
            f"{run_model.config.model_type} models, so {task} has no head here",
            hint="pick a base of a family with a sequence-classification class (BERT, LLaMA, GPT-2, …)",
        )
    if not holds:
        raise UsageError(
            f"{cls.__name__} lacks modules this run's recipe inserts into {type(run_model).__name__}, "
            f"so {task} cannot train its head here",
            hint="apply a recipe on the modules it keeps",
        )
    if base_class == cls.__name__ and not new_head:
        _check_fits(run_model.config, labels)
    return {
        "task": task,
        "labels": list(labels),
        "class": cls.__name__,
        "root": prefix if bare else "",
        "problem_type": "single_label_classification",
        "pad_token_id": pad_token_id,
        "new_head": new_head,
        "params": [],
    }


def _holds(cls: type, config: Any, rows: list[Any], root: str) -> bool:
    """Whether the task class has every module the run's insertions sit on (built on ``meta``)."""
    with torch.device("meta"):
        model = cls(config)
    try:
        for r in rows:
            model.get_submodule(f"{root}.{r.site}" if root else r.site)
    except AttributeError:
        return False
    return True


def _check_fits(config: Any, labels: list[str]) -> None:
    from pelt_cli.errors import UsageError

    have = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
    generic = all(str(x).startswith("LABEL_") for x in have)
    if len(have) != len(labels) or (not generic and sorted(have) != sorted(labels)):
        raise UsageError(
            f"the base's head has {len(have)} label(s) {have[:5]}; the data has {len(labels)} "
            f"{list(labels)[:5]}: pass --new-head to train a new head for these labels"
        )


def head_parameters(model: nn.Module, spec: dict[str, Any], missing: list[str]) -> list[str]:
    """The head's parameters of a task model: those outside its base (classifier, score, …) and those the base
    checkpoint did not hold (``missing``, e.g. BERT's pooler under a masked-LM base)."""
    prefix = getattr(type(model), "base_model_prefix", "")
    names = [n for n, _ in model.named_parameters()]
    outside = [n for n in names if not n.startswith(prefix + ".")]
    return sorted(set(outside) | (set(missing) & set(names)), key=names.index)


def task_logits(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The task model's logits for a batch."""
    if task == "audio-classification":
        return model(input_features=batch["input_features"]).logits
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return model(**inputs).logits


def create_task_model(directory: Any, spec: dict[str, Any]) -> nn.Module:
    """A run's task model built for its first training: the base checkpoint's weights, a new head (seeded by the
    caller), and ``spec["params"]`` filled with the head's parameter names."""
    import transformers

    from pelt_cli.keymap import quiet_transformers

    quiet_transformers()
    cls = getattr(transformers, spec["class"])
    model, info = cls.from_pretrained(
        str(directory),
        config=task_config(directory, spec),
        dtype="auto",
        ignore_mismatched_sizes=bool(spec.get("new_head")),
        output_loading_info=True,
    )
    missing = list(info.get("missing_keys", [])) + [k for k, *_ in info.get("mismatched_keys", [])]
    spec["params"] = head_parameters(model, spec, missing)
    surgery.set_task_model(model, root_of(model, spec), spec["params"])
    return model


def require_lm_head(base_class: str, skeleton: nn.Module) -> None:
    """Raise unless the base is a causal language model (has an LM head to train against).

    Raises:
        UsageError: a bare base (``LlamaModel``, ``BertModel``, …).
    """
    import transformers

    from pelt_cli.errors import UsageError

    causal = transformers.AutoModelForCausalLM._model_mapping.get(type(skeleton.config), None)
    if causal is None or type(skeleton).__name__ != causal.__name__:
        have = causal.__name__ if causal is not None else "a *ForCausalLM checkpoint"
        raise UsageError(
            f"causal-lm needs a base with a language-model head; {base_class or type(skeleton).__name__} has none",
            hint=f"save the base as {have} (save_pretrained), or pick another task",
        )
