"""Evaluation: the task's loss and metrics on an eval set, and gate statistics gathered on the way.

``pelt train`` evaluates after each epoch; ``pelt prune --data`` and ``pelt gates --data`` measure a run on data.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from pelt_cli import audio_lm, heads
from pelt_cli import gates as gatestats
from pelt_cli.errors import UsageError
from pelt_cli.tokenizer import load_tokenizer

EVAL_BATCH = 32
EVAL_MAX_LENGTH = 128


def compute_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str, class_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, Any]:
    """The task's loss (and logits for classification; ``class_weight``: a weighted cross-entropy)."""
    if task in heads.CLASSIFICATION:
        return heads.classification_loss(model, batch, task, class_weight)
    if task == "causal-lm":
        return heads.lm_loss(model, batch)
    if task == "domain-matching":
        return heads.domain_loss(model, batch)
    if task == audio_lm.SPEECH_TO_TEXT:
        return audio_lm.lm_loss(model, batch)
    raise UsageError(
        f"task {task!r}: expected one of {', '.join(heads.CLASSIFICATION)}, causal-lm, domain-matching, speech-to-text"
    )


def evaluate(
    model: torch.nn.Module, batcher: Any, cfg: Any, task: str, device: torch.device, labels: list[str] | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics on the eval set (loss; accuracy and macro-F1, perplexity, or feature MSE/cosine) and gate stats."""
    model.eval()
    gatestats.reset(model)
    adapter = heads.find_domain_adapter(model) if task == audio_lm.SPEECH_TO_TEXT else None
    meter = gatestats.DomainGateMeter() if task == "domain-matching" or adapter is not None else None
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
            if task == audio_lm.SPEECH_TO_TEXT:  # a mean per transcription token, the gate over real audio frames
                bsz = int((batch["labels"][:, 1:] != audio_lm.IGNORE).sum())
                if adapter is not None:
                    meter.add(audio_lm.audio_gate(adapter.last_gate, batch["feature_attention_mask"]))
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
    elif task in ("causal-lm", audio_lm.SPEECH_TO_TEXT):
        metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    else:
        metrics.update(
            {
                "feature_mse": metrics["eval_loss"],
                "feature_mse_unadapted": mse_before / max(n, 1),
                "cosine": cos_after / max(n, 1),
                "cosine_unadapted": cos_before / max(n, 1),
            }
        )
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
    if task in ("causal-lm", audio_lm.SPEECH_TO_TEXT):
        return "perplexity", False
    return "feature_mse", False


def data_inputs(base_path: str | os.PathLike[str], task: str, tokenizer_path: str | None = None) -> tuple[Any, Any]:
    """A tokenizer for text tasks, a feature extractor for audio tasks, both for speech-to-text (the processor,
    see :func:`pelt_cli.audio_lm.load_processor`)."""
    from pelt_cli.data import feature_extractor_for

    base_dir = Path(base_path)
    base_dir = base_dir if base_dir.is_dir() else base_dir.parent
    if task in ("audio-classification", "domain-matching"):
        import transformers

        return None, feature_extractor_for(transformers.AutoConfig.from_pretrained(str(base_dir)))
    src = tokenizer_path or str(base_dir)
    tok = load_tokenizer(src, hint="pass --tokenizer DIR pointing at tokenizer files for this model")
    if task == audio_lm.SPEECH_TO_TEXT:  # the tokenizer, and the processor in the feature extractor's place
        import transformers

        return tok, audio_lm.load_processor(base_dir, tok, transformers.AutoConfig.from_pretrained(str(base_dir)))
    return tok, None


def measure_run(
    run_dir: str | os.PathLike[str],
    data: str,
    batch_size: int = EVAL_BATCH,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, gate statistics)`` of a run on ``data`` (a file, or a built-in dataset's eval split); the
    statistics in ``gates.json`` layout, the metrics with the eval wall time and row count."""
    from types import SimpleNamespace

    from pelt_cli.data import Batcher, load_data, resolve_data
    from pelt_cli.run import Run

    run = Run.open(run_dir)
    model = run.load_model()
    head = run.head or {}
    task = head.get("task") or (run.meta.training or {}).get("task")
    path, builtin_eval = resolve_data(data)
    td = load_data(builtin_eval or path, task=task, labels=head.get("labels"))
    if td.task in heads.CLASSIFICATION and not head:
        raise UsageError(f"{run_dir}: no trained task head to evaluate {td.task} with", hint="pelt train the run first")
    tok, fe = data_inputs(run.meta.base.path, td.task)
    batcher = Batcher(td, tokenizer=tok, feature_extractor=fe, max_length=EVAL_MAX_LENGTH)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = SimpleNamespace(batch_size=batch_size, seed=0)
    metrics, snap = evaluate(model, batcher, cfg, td.task, torch.device("cpu"), head.get("labels"))
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    metrics["rows"] = len(td.rows)
    return metrics, snap


def evaluate_run(run_dir: str | os.PathLike[str], data: str, batch_size: int = EVAL_BATCH) -> dict[str, Any]:
    """The run's eval metrics on ``data`` and the eval wall time (see :func:`measure_run`)."""
    return measure_run(run_dir, data, batch_size)[0]


# ------------------------------------------------------------------------------------------------ pelt eval


def classification_report(preds: list[int], golds: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (as :func:`macro_f1`), per-class precision/recall/F1/support and the confusion matrix
    (rows: gold class, columns: predicted class) of class ids against ``labels``."""
    n = len(labels)
    matrix = [[0] * n for _ in range(n)]
    for p, g in zip(preds, golds, strict=True):
        matrix[g][p] += 1
    per_class = []
    for c, name in enumerate(labels):
        tp, predicted, support = matrix[c][c], sum(row[c] for row in matrix), sum(matrix[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * tp / (predicted + support) if predicted + support else 0.0
        per_class.append({"label": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    accuracy = sum(matrix[c][c] for c in range(n)) / max(len(golds), 1)
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1(preds, golds, n),
        "per_class": per_class,
        "confusion": {"labels": list(labels), "matrix": matrix},
    }


def eval_data(pred: Any, data: str) -> Any:
    """The labelled (or, for a causal LM, plain-text) rows of ``data`` (a file or a built-in dataset's eval split).

    Raises:
        DataError: rows that do not fit the model's task, or labels the model never saw in training.
    """
    from pelt_cli.data import load_data, resolve_data
    from pelt_cli.errors import DataError
    from pelt_cli.predict import CAUSAL_LM

    path, builtin_eval = resolve_data(data)
    path = builtin_eval or path
    if pred.task == CAUSAL_LM:
        return load_data(path, task="causal-lm")
    td = load_data(path)
    if td.task not in ("text-classification", "pair-classification"):
        raise DataError(
            f"{path}: task {td.task}; expected text,label (or text_a,text_b,label) rows to evaluate "
            f"the classifier {pred.source}"
        )
    unseen = [lab for lab in td.labels or [] if lab not in pred.labels]
    if unseen:
        raise DataError(
            f"{path}: label(s) {', '.join(map(repr, unseen))} never seen in training; the model knows "
            f"{', '.join(pred.labels)}"
        )
    return td


def evaluate_predictor(pred: Any, data: str, batch_size: int = EVAL_BATCH, on_batch: Any = None) -> dict[str, Any]:
    """``pelt eval``: a loaded model (see :func:`pelt_cli.predict.load_predictor`) measured on ``data``.

    Classifiers: accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix and the mean cross-entropy
    ``loss``; causal LMs: ``loss`` (mean negative log-likelihood per predicted token) and ``perplexity``. Batched as
    ``pelt predict`` batches, so no number depends on the batch size.
    """
    from pelt_cli.predict import CAUSAL_LM, batched, logits, text_columns

    if pred.task == audio_lm.SPEECH_TO_TEXT:
        return speech_report(pred, data, batch_size, on_batch)
    td = eval_data(pred, data)
    columns = text_columns(td.rows, td.path, pred.task)
    doc: dict[str, Any] = {"source": pred.source, "data": td.path, "task": td.task, "rows": len(td.rows)}
    if pred.task == CAUSAL_LM:
        nll = list(batched(pred, td.rows, columns, batch_size, lambda f: token_nll(pred, f), on_batch=on_batch))
        tokens = sum(n for _, n in nll)
        loss = sum(s for s, _ in nll) / max(tokens, 1)
        return {**doc, "tokens": tokens, "loss": loss, "perplexity": math.exp(min(loss, 50))}
    rows = list(
        batched(
            pred, td.rows, columns, batch_size, lambda f: logits(pred, f).log_softmax(-1).tolist(), on_batch=on_batch
        )
    )
    index = {lab: i for i, lab in enumerate(pred.labels)}
    golds = [index[r["label"]] for r in td.rows]
    preds = [max(range(len(lp)), key=lp.__getitem__) for lp in rows]
    loss = -sum(lp[g] for lp, g in zip(rows, golds, strict=True)) / max(len(golds), 1)
    return {**doc, **classification_report(preds, golds, pred.labels), "loss": loss}


def speech_report(pred: Any, data: str, batch_size: int = EVAL_BATCH, on_batch: Any = None) -> dict[str, Any]:
    """``pelt eval`` of a speech-to-text run on ``audio,text`` rows: ``loss`` (mean negative log-likelihood per
    transcription token, eos included, transcriptions never truncated), ``perplexity`` and the token count."""
    from types import SimpleNamespace

    from pelt_cli.data import Batcher, load_data, resolve_data

    path, builtin_eval = resolve_data(data)
    td = load_data(builtin_eval or path, task=audio_lm.SPEECH_TO_TEXT)
    speech = audio_lm.load_processor(None, pred.tokenizer, pred.model.config)
    batcher = Batcher(td, tokenizer=pred.tokenizer, feature_extractor=speech, max_length=10**9)
    device = next(pred.model.parameters()).device
    cfg = SimpleNamespace(batch_size=batch_size, seed=0)
    metrics, _ = evaluate(pred.model, batcher, cfg, td.task, device, None)
    pred.model.eval()
    if on_batch is not None:
        on_batch(len(td.rows), len(td.rows))
    tokens = sum(len(audio_lm.target_ids(pred.tokenizer, r["text"], 10**9)) for r in td.rows)
    doc = {"source": pred.source, "data": td.path, "task": td.task, "rows": len(td.rows), "tokens": tokens}
    return {**doc, "loss": metrics["eval_loss"], "perplexity": metrics["perplexity"]}


def token_nll(pred: Any, feats: list[dict]) -> list[tuple[float, int]]:
    """Per tokenized row: the summed negative log-likelihood of each token after the first, and how many."""
    from pelt_cli.predict import pad

    batch = pad(feats, pred.pad_id)
    with torch.inference_mode():
        out = pred.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = out.logits[:, :-1].float().log_softmax(-1)
    target, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask
    return [(s, int(n)) for s, n in zip(nll.sum(1).tolist(), mask.sum(1).tolist(), strict=True)]


ABLATED = ("accuracy", "macro_f1", "loss", "perplexity")


def ablate_gates(pred: Any, data: str, batch_size: int = EVAL_BATCH, on_batch: Any = None) -> dict[str, Any]:
    """``pelt eval --ablate-gates``: the report of :func:`evaluate_predictor` with its learned UniPELT gates, plus
    ``ablation``: the same measurement with every gate held at 1 (the modules' outputs added unscaled), and the
    change per metric (ablated − gated; a drop in accuracy says what the gates buy).

    Raises:
        UsageError: the model has no UniPELT gates (a merged model, or another method).
    """
    from pelt_cli.methods.unipelt import gates_fixed

    doc = evaluate_predictor(pred, data, batch_size, on_batch=on_batch)
    with gates_fixed(pred.model, 1.0) as held:
        if not held:
            raise UsageError(
                f"--ablate-gates: {pred.source} has no UniPELT gates",
                hint="give the unmerged run or bundle of a unipelt recipe",
            )
        ablated = evaluate_predictor(pred, data, batch_size, on_batch=on_batch)
    keys = [k for k in ABLATED if k in doc]
    doc["ablation"] = {
        "gates": "fixed at 1",
        "controllers": held,
        **{k: ablated[k] for k in keys},
        "delta": {k: ablated[k] - doc[k] for k in keys},
    }
    return doc
