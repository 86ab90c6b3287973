"""``pelt predict``: a model, a run or a bundle applied to rows of text, one result per row, in input order.

What ``pelt predict`` (and ``pelt eval``) open, by what the path holds:

* a run directory (``run.json``): :meth:`pelt_cli.run.Run.load_model` rebuilds base + inserted modules + weights;
  the tokenizer is the one ``pelt train`` recorded (``run.json``'s ``tokenizer``), else the base's;
* a bundle (a directory or tar with ``manifest.json``, from ``pelt export``): rebuilt with
  :func:`pelt_cli.bundle.apply_bundle` into a temporary run on the base the manifest names (``base.path_hint``);
  the tokenizer is the bundle's own when it carries one, else the base's;
* a checkpoint directory (``config.json``, e.g. from ``pelt merge``): the transformers class named by
  ``config.architectures[0]``; without ``architectures``, ``AutoModelForSequenceClassification`` when config.json
  lists ``id2label``; the tokenizer is the directory's.

The model must be a classifier (``*ForSequenceClassification``: ``{"label", "score", "scores"}``, softmax over
``config.id2label``), a causal LM (``*ForCausalLM``: ``{"generated"}``) or a Qwen2-Audio (rows of audio paths:
``{"generated": transcription}``, see :mod:`pelt_cli.audio_lm`); a run that has neither a trained head nor
a task-model base was never trained, and says so.

Batch invariance: rows are tokenized alone, sorted by length within a window of rows and padded on the right with
an attention mask, so a real token never sees padding: encoders mask it, decoders are causal and their
sequence-classification pooling takes the last token that is not ``pad_token_id``. A row's scores are the same
(within float rounding, ~1e-7) alone or beside a long row. Generation batches only prompts of equal length (no
padding at all), so greedy output equals ``model.generate`` on the prompt alone.
"""

from __future__ import annotations

import copy
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pelt_cli.audio_lm import MODEL_CLASS as SPEECH_MODEL
from pelt_cli.audio_lm import SPEECH_TO_TEXT, transcribe_rows
from pelt_cli.errors import CheckpointError, DataError, UsageError
from pelt_cli.tokenizer import load_tokenizer

CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
WINDOW_BATCHES = 16  # rows are sorted by length within windows of this many batches
PAIR_COLUMNS = (("text_a", "text_b"), ("text", "text_pair"))
MANIFEST = "manifest.json"


@dataclass
class Predictor:
    """A loaded model with what predicting needs.

    Attributes:
        model: the transformers model (eval mode).
        tokenizer: its tokenizer (``pad_token`` set).
        task: ``classification``, ``causal-lm`` or ``speech-to-text`` (a Qwen2-Audio run: audio rows in).
        labels: class names by class id (classification), else None.
        source: what was opened, for messages.
        max_length: the longest token sequence the model takes (None: no limit known).
        pad_id: the id padding uses (the one decoders' pooling skips).
    """

    model: Any
    tokenizer: Any
    task: str
    labels: list[str] | None
    source: str
    max_length: int | None
    pad_id: int


@dataclass(frozen=True)
class GenerateOptions:
    """How a causal LM continues each prompt: greedy, or sampled at ``temperature`` (seeded)."""

    max_new_tokens: int = 32
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0


# ------------------------------------------------------------------------------------------------ opening


def task_of_class(name: str | None) -> str | None:
    """``classification`` for a transformers sequence-classification class name, ``causal-lm`` for a causal LM
    class, ``speech-to-text`` for Qwen2-Audio (audio rows in, transcriptions out), else None."""
    from transformers.models.auto import modeling_auto as ma

    def names(mapping: dict[str, Any]) -> set[str]:
        return {n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v)}

    if not name:
        return None
    if name == SPEECH_MODEL:  # Qwen2-Audio: its own LM head transcribes audio rows
        return SPEECH_TO_TEXT
    cls_names = names(ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    if name in cls_names or name.endswith("ForSequenceClassification"):
        return CLASSIFICATION
    if name in names(ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or name.endswith("ForCausalLM"):
        return CAUSAL_LM
    return None


def load_predictor(path: str | os.PathLike[str]) -> Predictor:
    """Open a run directory, a bundle (directory or tar) or a checkpoint directory for prediction.

    Raises:
        CheckpointError: none of the three, or a bundle whose base is missing.
        UsageError: a run never trained, a model without a task head, or no tokenizer.
    """
    p = Path(path)
    if (p / "run.json").is_file():
        return _from_run(p)
    if (p / MANIFEST).is_file() or (p.is_file() and tarfile.is_tarfile(p)):
        return _from_bundle(p)
    if (p / "config.json").is_file():
        return _from_checkpoint(p)
    what = "no such file or directory" if not p.exists() else "not a model, run or bundle"
    raise CheckpointError(
        f"{p}: {what}; expected a checkpoint directory (config.json), a run directory (run.json) "
        f"or a bundle (a directory or tar with {MANIFEST})"
    )


def run_task(run: Any, where: str | os.PathLike[str]) -> str:
    """The task a run predicts: its trained head's, else its base class's.

    Raises:
        UsageError: the run has no head and its base is not a task model (it was never trained).
    """
    from pelt_cli.heads import is_task_head

    head = run.head or {}
    if head.get("task") == CAUSAL_LM:
        return CAUSAL_LM
    if head.get("task") in ("text-classification", "pair-classification"):
        if not is_task_head(head):
            raise UsageError(
                f"{where}: its head is the mean-pool head of an earlier pelt, not a transformers task model",
                hint=f"train it again: pelt train {where} --data FILE",
            )
        return CLASSIFICATION
    if head.get("task"):
        raise UsageError(f"{where}: pelt predict reads text; this run's task is {head['task']}")
    task = task_of_class(run.meta.base.model_class)
    if task is None:
        raise UsageError(
            f"{where}: this run was never trained: it has no task head and its base "
            f"{run.meta.base.model_class or 'model'} is not a task model",
            hint=f"pelt train {where} --data FILE first",
        )
    return task


def _from_run(run_dir: Path, source: str | None = None) -> Predictor:
    from pelt_cli.keymap import quiet_transformers
    from pelt_cli.run import Run

    run = Run.open(run_dir)
    task = run_task(run, source or run_dir)
    quiet_transformers()
    model = run.load_model()
    tok_dir = run.meta.extra.get("tokenizer") or run.meta.base.path
    labels = (run.head or {}).get("labels")
    return _predictor(model, tok_dir, task, source or str(run_dir), labels)


def _from_checkpoint(directory: Path) -> Predictor:
    import transformers

    from pelt_cli.io.checkpoint import open_checkpoint
    from pelt_cli.keymap import read_config

    raw = open_checkpoint(directory).config or {}  # headers and config.json checked at the boundary
    config = read_config(directory)
    arch = next((a for a in getattr(config, "architectures", None) or [] if hasattr(transformers, a)), None)
    cls_name = arch or ("AutoModelForSequenceClassification" if raw.get("id2label") else None)
    task = CLASSIFICATION if cls_name == "AutoModelForSequenceClassification" else task_of_class(cls_name)
    if task is None:
        raise UsageError(
            f"{directory}: a {cls_name or 'model without architectures'} has no task head; predict "
            "needs a *ForSequenceClassification or *ForCausalLM checkpoint",
            hint="pelt train a run on it, then pelt merge RUN -o DIR (or predict with the run)",
        )
    model = getattr(transformers, cls_name).from_pretrained(str(directory), dtype="auto").eval()
    return _predictor(model, directory, task, str(directory), None)


def read_manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` of a bundle directory or tar.

    Raises:
        CheckpointError: no readable manifest.
    """
    try:
        if path.is_dir():
            text = (path / MANIFEST).read_text(encoding="utf-8")
        else:
            with tarfile.open(path) as tar:
                member = tar.extractfile(MANIFEST)
                text = member.read().decode("utf-8") if member is not None else ""
        manifest = json.loads(text)
    except (OSError, KeyError, json.JSONDecodeError, UnicodeDecodeError, tarfile.TarError) as e:
        raise CheckpointError(f"{path}: no readable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("base"), dict):
        raise CheckpointError(f"{path}: {MANIFEST} is not a pelt bundle manifest")
    return manifest


def _from_bundle(path: Path) -> Predictor:
    from pelt_cli.bundle import apply_bundle

    base = read_manifest(path)["base"].get("path_hint")
    if not base or not Path(base).exists():
        raise CheckpointError(
            f"{path}: the bundle's base {base} does not exist",
            hint=f"pelt apply-bundle {path} BASE -o RUN puts it on a base elsewhere; then predict with RUN",
        )
    with tempfile.TemporaryDirectory(prefix="pelt-predict-") as tmp:
        run_dir = apply_bundle(path, base, Path(tmp) / "run")
        return _from_run(run_dir, str(path))  # apply_bundle records the bundle's tokenizer, if it has one


def _predictor(
    model: Any, tok_dir: str | os.PathLike[str], task: str, source: str, labels: list[str] | None
) -> Predictor:
    tok = load_tokenizer(tok_dir)
    text_cfg = model.config.get_text_config()
    for cfg in {id(c): c for c in (model.config, text_cfg)}.values():
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tok.pad_token_id  # decoders' sequence-classification pooling needs it
    if task == CLASSIFICATION:
        id2label = model.config.id2label
        names = [str(id2label[i]) for i in range(len(id2label))]
        labels = [str(x) for x in labels] if labels and len(labels) == len(names) else names
    else:
        tok.truncation_side = "left"  # a long prompt keeps its end
        labels = None
    limits = [
        getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", None),
        tok.model_max_length if tok.model_max_length < 10**6 else None,
    ]
    max_length = min((n for n in limits if n), default=None)
    return Predictor(model.eval(), tok, task, labels, source, max_length, int(text_cfg.pad_token_id))


# ------------------------------------------------------------------------------------------------ input rows


def read_inputs(data: str, stdin: IO[str] | None = None) -> tuple[list[dict], str]:
    """Rows to predict and where they came from: ``-`` reads plain text lines (blank ones skipped) from ``stdin``, a
    ``.txt`` file the same from the file; otherwise a JSONL/CSV/TSV file (or a built-in dataset's eval split).

    Raises:
        DataError: a missing or malformed file.
    """
    import sys

    from pelt_cli.data import read_rows, resolve_data

    if data == "-":
        lines = (stdin or sys.stdin).read().splitlines()
        return [{"text": line} for line in lines if line.strip()], "<stdin>"
    path, builtin_eval = resolve_data(data)
    path = builtin_eval or path
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read it as UTF-8 text ({e}); expected one text per line") from None
        return [{"text": line} for line in lines if line.strip()], str(path)
    return read_rows(path), str(path)


def text_columns(rows: list[dict], where: str, task: str) -> tuple[str, str | None]:
    """The text column (and the pair's second column) to read: ``text_a``+``text_b`` or ``text``+``text_pair`` for
    a classifier when present, else ``text``; every row's values checked.

    Raises:
        DataError: no such column, or a row whose value is missing or not a string.
    """
    columns = set().union(*(r.keys() for r in rows)) if rows else {"text"}
    pair = next((p for p in PAIR_COLUMNS if task == CLASSIFICATION and set(p) <= columns), None)
    first, second = pair or ("text", None)
    if first not in columns:
        raise DataError(
            f"{where}: columns {', '.join(sorted(columns)) or 'none'}; expected text (or text_a+text_b, "
            "text+text_pair for pairs)"
        )
    for i, r in enumerate(rows, 1):
        for c in (first, second):
            if c is not None and not isinstance(r.get(c), str):
                got = "missing" if r.get(c) is None else f"a {type(r[c]).__name__}"
                raise DataError(f"{where}: row {i}: column {c!r} is {got}; expected a string")
    return first, second


def encode(
    pred: Predictor, rows: list[dict], columns: tuple[str, str | None], max_new_tokens: int = 0
) -> list[dict[str, list[int]]]:
    """Each row tokenized on its own (truncated to the model's length; no padding)."""
    first, second = columns
    limit = pred.max_length - max_new_tokens if pred.max_length else None
    if limit is not None and limit < 1:
        raise UsageError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {pred.source}'s "
            f"{pred.max_length} positions"
        )
    texts = [r[first] for r in rows]
    pairs = [r[second] for r in rows] if second else None
    enc = pred.tokenizer(texts, pairs, truncation=limit is not None, max_length=limit)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(rows))]


def pad(feats: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Model inputs for tokenized rows, padded on the right (``input_ids`` with ``pad_id``, masks and type ids with
    0)."""
    import torch

    width = max(len(f["input_ids"]) for f in feats)
    out = {}
    for key in feats[0]:
        fill = pad_id if key == "input_ids" else 0
        t = torch.full((len(feats), width), fill, dtype=torch.long)
        for i, f in enumerate(feats):
            t[i, : len(f[key])] = torch.tensor(f[key], dtype=torch.long)
        out[key] = t
    return out


def batch_plan(lengths: list[int], batch_size: int, same_length: bool = False) -> list[list[int]]:
    """Index batches of one window: rows sorted by length (stable), cut every ``batch_size`` rows (and, with
    ``same_length``, wherever the length changes)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size or (same_length and lengths[batches[-1][0]] != lengths[i]):
            batches.append([])
        batches[-1].append(i)
    return batches


def batched(
    pred: Predictor,
    rows: list[dict],
    columns: tuple[str, str | None],
    batch_size: int,
    fn: Callable[[list[dict]], list[Any]],
    *,
    same_length: bool = False,
    max_new_tokens: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[Any]:
    """``fn``'s per-row results for every row, in input order: rows are tokenized and length-sorted a window at a
    time, and ``fn`` gets each batch's tokenized rows (``on_batch`` the batch's size and the row count after
    each)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: expected ≥ 1")
    window = batch_size * WINDOW_BATCHES
    for start in range(0, len(rows), window):
        feats = encode(pred, rows[start : start + window], columns, max_new_tokens)
        results: list[Any] = [None] * len(feats)
        for b in batch_plan([len(f["input_ids"]) for f in feats], batch_size, same_length):
            for i, r in zip(b, fn([feats[i] for i in b]), strict=True):
                results[i] = r
            if on_batch is not None:
                on_batch(len(b), len(rows))
        yield from results


# ------------------------------------------------------------------------------------------------ predicting


def logits(pred: Predictor, feats: list[dict]) -> Any:
    """Float32 logits ``[B, n_labels]`` of a classifier on tokenized rows."""
    import torch

    with torch.inference_mode():
        out = pred.model(**pad(feats, pred.pad_id))
    if getattr(out, "logits", None) is None:
        raise UsageError(f"{pred.source}: {type(pred.model).__name__} gives no logits; expected a classifier")
    return out.logits.float()


def classify(pred: Predictor, feats: list[dict]) -> list[dict[str, Any]]:
    """``{"label", "score", "scores"}`` per tokenized row (softmax probabilities by label name)."""
    probs = logits(pred, feats).softmax(-1).tolist()
    names = pred.labels or []
    out = []
    for p in probs:
        best = max(range(len(p)), key=p.__getitem__)
        out.append({"label": names[best], "score": p[best], "scores": dict(zip(names, p, strict=True))})
    return out


def generate(pred: Predictor, feats: list[dict], opts: GenerateOptions) -> list[dict[str, str]]:
    """``{"generated"}`` per tokenized prompt (all of one length: no padding), new tokens only."""
    import torch

    cfg = copy.deepcopy(pred.model.generation_config)
    cfg.update(
        max_new_tokens=opts.max_new_tokens,
        do_sample=opts.sample,
        pad_token_id=pred.pad_id,
        **(
            {"temperature": opts.temperature, "top_k": 0, "top_p": 1.0}
            if opts.sample
            else {"temperature": None, "top_k": None, "top_p": None}
        ),
    )
    ids = torch.tensor([f["input_ids"] for f in feats], dtype=torch.long)
    with torch.inference_mode():
        out = pred.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    texts = pred.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [{"generated": t} for t in texts]


def predict_rows(
    pred: Predictor,
    rows: list[dict],
    where: str = "<rows>",
    batch_size: int = 32,
    opts: GenerateOptions | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """One result per row, in input order (see the module's docstring for what and how).

    Raises:
        DataError: rows without the text column(s).
        UsageError: a bad batch size or generation option.
    """
    import torch

    opts = opts or GenerateOptions()
    if pred.task == SPEECH_TO_TEXT:
        return transcribe_rows(pred.model, pred.tokenizer, rows, where, batch_size, opts, on_batch)
    columns = text_columns(rows, where, pred.task)
    if pred.task == CLASSIFICATION:
        return batched(pred, rows, columns, batch_size, lambda f: classify(pred, f), on_batch=on_batch)
    if opts.max_new_tokens < 1 or (opts.sample and not opts.temperature > 0):
        raise UsageError(
            f"--max-new-tokens {opts.max_new_tokens}, --temperature {opts.temperature}: expected "
            "≥ 1 new tokens and a temperature > 0"
        )
    torch.manual_seed(opts.seed)
    return batched(
        pred,
        rows,
        columns,
        batch_size,
        lambda f: generate(pred, f, opts),
        same_length=True,
        max_new_tokens=opts.max_new_tokens,
        on_batch=on_batch,
    )
