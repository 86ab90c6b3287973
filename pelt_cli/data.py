"""Training data for ``pelt train``: read JSONL/CSV/TSV, infer the task, validate rows, map labels, make batches.

Tasks and the columns they read (other columns are ignored):

- ``text-classification``: ``text``, ``label``
- ``pair-classification``: ``text_a``, ``text_b``, ``label`` (MRPC-style paraphrase)
- ``causal-lm``: ``text``
- ``audio-classification``: ``audio`` (a path), ``label``
- ``domain-matching``: ``source``, ``reference`` (paths: e.g. laser-vibrometer and microphone recordings)

Audio paths are relative to the manifest's directory. torch, transformers and librosa are imported lazily.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pelt_cli.errors import DataError
from pelt_cli.io.atomic import write_bytes_atomic

TASKS = ("text-classification", "pair-classification", "causal-lm", "audio-classification", "domain-matching")
COLUMNS = {
    "text-classification": ("text", "label"),
    "pair-classification": ("text_a", "text_b", "label"),
    "causal-lm": ("text",),
    "audio-classification": ("audio", "label"),
    "domain-matching": ("source", "reference"),
}
AUDIO_COLUMNS = ("audio", "source", "reference")
BUILTIN_DATASETS = {
    "vader": "word sentiment (positive/negative) from the VADER lexicon of the PyPI package vadersentiment 3.3.2",
}
_INFER_ORDER = ("pair-classification", "domain-matching", "audio-classification", "text-classification", "causal-lm")


@dataclass
class TaskData:
    """Validated rows of one data file.

    Attributes:
        task: one of ``TASKS``.
        rows: dicts holding the task's columns (labels as strings, audio paths resolved and absolute).
        labels: class names, index = class id; None for tasks without labels.
        path: the file the rows came from.
    """

    task: str
    rows: list[dict]
    labels: list[str] | None
    path: str


def _read(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL, JSON-array, CSV or TSV file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file; expected a JSONL, CSV or TSV data file")
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        raise DataError(f"{p}: unknown data format {suffix or '(no suffix)'!r}; expected .jsonl, .json, .csv or .tsv")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); expected a UTF-8 data file") from None
    if not text.strip():
        raise DataError(f"{p}: the file is empty; expected a header row and data rows, or JSON lines")
    if suffix in (".csv", ".tsv"):
        return _read_csv(p, text, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: bad JSON ({e.msg}); expected a JSON array of objects") from None
        bad = [i for i, item in enumerate(items, 1) if not isinstance(item, dict)]
        if bad:
            raise DataError(f"{p}: item {bad[0]} is not an object; expected a JSON array of objects")
        return list(enumerate(items, 1))
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{p}:{n}: bad JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{n}: a JSON {type(row).__name__}, not an object; expected one object per line")
        out.append((n, row))
    return out


def _read_csv(p: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    # TSV is read unquoted, as GLUE's TSVs need (their texts hold unbalanced quotes).
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting)
    header = [h.strip() for h in next(reader)]
    if not any(header) or "" in header:
        raise DataError(
            f"{p}:1: the header row has an empty column name ({header!r}); expected names such as text,label"
        )
    dup = [h for h, c in Counter(header).items() if c > 1]
    if dup:
        raise DataError(f"{p}:1: column {dup[0]!r} appears twice in the header; expected unique column names")
    out = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise DataError(
                f"{p}:{reader.line_num}: {len(row)} fields but the header has {len(header)} "
                f"({', '.join(header)}); expected one field per column"
            )
        out.append((reader.line_num, dict(zip(header, row, strict=True))))
    return out


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a data file as dicts: ``.jsonl``/``.json`` (JSON lines), ``.csv`` or ``.tsv`` (header required).

    Raises:
        DataError: missing, empty or undecodable file, a bad JSON line (file:line), a row of the wrong width.
    """
    return [row for _, row in _read(path)]


def _expected_sets() -> str:
    return "; ".join(f"{'+'.join(COLUMNS[t])} ({t})" for t in _INFER_ORDER)


def infer_task(columns: set[str]) -> str:
    """The task a set of column names describes (extra columns are ignored).

    Raises:
        DataError: no task fits; lists the column sets pelt understands.
    """
    for task in _INFER_ORDER:
        if set(COLUMNS[task]) <= set(columns):
            return task
    found = ", ".join(sorted(columns)) or "none"
    raise DataError(
        f"columns {found} fit no task; expected one of: {_expected_sets()}",
        hint="rename the columns, or check that a CSV/TSV file starts with a header row",
    )


def _sort_labels(labels: set[str]) -> list[str]:
    """Sorted class names; numerically when all are integers (so "2" < "10")."""
    if all(re.fullmatch(r"-?\d+", lab) for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _field(p: Path, line: int, row: dict, col: str) -> str:
    """One validated, non-empty field as a string."""
    value = row.get(col)
    what = "a class name" if col == "label" else "a file path" if col in AUDIO_COLUMNS else "a string"
    if value is None:
        raise DataError(f"{p}:{line}: column {col!r} is missing; expected {what}")
    if col == "label" and isinstance(value, (bool, int)):
        value = str(value)
    elif col == "label" and isinstance(value, float) and value.is_integer():
        value = str(int(value))
    if not isinstance(value, str):
        raise DataError(f"{p}:{line}: column {col!r} is a {type(value).__name__} ({value!r}); expected {what}")
    if not value.strip():
        raise DataError(f"{p}:{line}: column {col!r} is empty; expected {what}")
    return value.strip() if col == "label" or col in AUDIO_COLUMNS else value


def load_data(
    path: str | Path, task: str | None = None, labels: list[str] | None = None, base_dir: str | Path | None = None
) -> TaskData:
    """Read, validate and label-map a data file.

    Args:
        path: the data file.
        task: one of ``TASKS``; inferred from the columns when None.
        labels: the class names to use (the training set's, when loading ``--eval``); sorted from the data if None.
        base_dir: where relative audio paths start; the data file's directory when None.

    Raises:
        DataError: naming file:line and the column for every kind of bad input; every missing audio file at once.
    """
    p = Path(path)
    numbered = _read(p)
    if not numbered:
        raise DataError(f"{p}: no data rows; expected at least one row after the header")
    columns = set().union(*(row.keys() for _, row in numbered))
    if task is None:
        try:
            task = infer_task(columns)
        except DataError as e:
            raise DataError(f"{p}: {e.message}", e.hint) from None
    elif task not in TASKS:
        raise DataError(f"{p}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    need = COLUMNS[task]
    if missing := [c for c in need if c not in columns]:
        raise DataError(
            f"{p}: task {task} needs column(s) {', '.join(missing)}; found {', '.join(sorted(columns))}; "
            f"expected {'+'.join(need)}"
        )
    rows = [{c: _field(p, line, row, c) for c in need} for line, row in numbered]
    found_labels = None
    if "label" in need:
        if labels is None:
            found_labels = _sort_labels({r["label"] for r in rows})
        else:
            found_labels = [str(lab) for lab in labels]
            known = set(found_labels)
            bad = [(line, r["label"]) for (line, _), r in zip(numbered, rows, strict=True) if r["label"] not in known]
            if bad:
                more = f" ({len(bad) - 1} more rows with unknown labels)" if len(bad) > 1 else ""
                raise DataError(
                    f"{p}:{bad[0][0]}: label {bad[0][1]!r} is not one of the training labels "
                    f"({', '.join(found_labels)}){more}; expected a label seen in the training data"
                )
    audio_cols = [c for c in need if c in AUDIO_COLUMNS]
    if audio_cols:
        _resolve_audio(p, numbered, rows, audio_cols, Path(base_dir) if base_dir is not None else p.parent)
    return TaskData(task, rows, found_labels, str(p))


def _resolve_audio(p: Path, numbered: list, rows: list[dict], cols: list[str], base: Path) -> None:
    """Make the rows' audio paths absolute (relative ones start at ``base``); every missing file at once."""
    absent = []
    for (line, _), r in zip(numbered, rows, strict=True):
        for c in cols:
            f = Path(r[c]).expanduser()
            f = f if f.is_absolute() else base / f
            r[c] = str(f.resolve())
            if not f.is_file():
                absent.append(f"{p.name}:{line} {c} {f}")
    if absent:
        more = f"; and {len(absent) - 5} more" if len(absent) > 5 else ""
        raise DataError(
            f"{p}: {len(absent)} audio file(s) do not exist (relative paths start at {base}): "
            f"{'; '.join(absent[:5])}{more}; expected existing audio files"
        )


def label_mapping(td: TaskData) -> dict[str, int]:
    """Class name → class id (empty for tasks without labels); this is what training saves next to the run."""
    return {lab: i for i, lab in enumerate(td.labels or [])}


def class_balance(td: TaskData) -> dict:
    """Counts per class, the imbalance ratio (largest/smallest present class) and the majority-class accuracy.

    Returns:
        ``{"counts": {label: n}, "imbalance": float|None, "majority_baseline": float|None, "missing": [labels]}``;
        ``missing`` names mapped classes without rows (possible in an eval set).
    """
    if td.labels is None:
        return {"counts": {}, "imbalance": None, "majority_baseline": None, "missing": []}
    c = Counter(r["label"] for r in td.rows)
    counts = {lab: c.get(lab, 0) for lab in td.labels}
    present = [n for n in counts.values() if n]
    return {
        "counts": counts,
        "imbalance": max(present) / min(present),
        "majority_baseline": max(present) / len(td.rows),
        "missing": [k for k, n in counts.items() if not n],
    }


def split(td: TaskData, eval_fraction: float, seed: int) -> tuple[TaskData, TaskData]:
    """A deterministic (train, eval) split, stratified by label for classification; rows keep their order.

    Each class gives ``round(n_class × eval_fraction)`` rows to eval (at least one row overall on each side).
    """
    import numpy as np

    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval fraction {eval_fraction}: expected a number between 0 and 1 (exclusive)")
    if len(td.rows) < 2:
        raise DataError(f"{td.path}: {len(td.rows)} row(s) cannot be split; expected at least 2")
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(td.rows):
        groups.setdefault(r.get("label") if td.labels is not None else None, []).append(i)
    chosen: list[int] = []
    for key in sorted(groups, key=str):
        idx = groups[key]
        k = int(math.floor(len(idx) * eval_fraction + 0.5))
        chosen.extend(int(i) for i in rng.permutation(idx)[:k])
    if not chosen:
        chosen = [int(rng.integers(len(td.rows)))]
    if len(chosen) == len(td.rows):
        chosen = chosen[1:]
    held = set(chosen)
    train = [r for i, r in enumerate(td.rows) if i not in held]
    ev = [r for i, r in enumerate(td.rows) if i in held]
    return TaskData(td.task, train, td.labels, td.path), TaskData(td.task, ev, td.labels, td.path)


def load_audio(path: str | Path, sr: int = 16000) -> Any:
    """A mono float32 waveform at ``sr`` Hz, loaded (and resampled) with librosa.

    Raises:
        DataError: naming the file when it cannot be read or holds no samples.
    """
    import warnings

    import librosa

    try:
        with warnings.catch_warnings():  # librosa warns when it falls back to audioread; the error says enough
            warnings.simplefilter("ignore")
            y, _ = librosa.load(str(path), sr=sr, mono=True)
    except Exception as e:  # noqa: BLE001 - soundfile/audioread raise many types
        raise DataError(
            f"{path}: cannot load audio ({type(e).__name__}: {e}); expected a readable audio file"
        ) from None
    if y.size == 0:
        raise DataError(f"{path}: the audio holds no samples; expected a non-empty recording")
    return y


def feature_extractor_for(config: Any) -> Any:
    """A ``WhisperFeatureExtractor`` whose mel bins and window fit the audio encoder of ``config``.

    Works for Whisper configs and for configs with an ``audio_config`` (Qwen2-Audio). The window gives exactly
    ``2 × max_source_positions`` frames at hop 160 (3000 frames = 30 s for real checkpoints), which is what the
    encoders accept. Built directly, no download.
    """
    from transformers import WhisperFeatureExtractor

    audio = getattr(config, "audio_config", None) or config
    n_mels = getattr(audio, "num_mel_bins", None)
    positions = getattr(audio, "max_source_positions", None)
    if n_mels is None or positions is None:
        kind = getattr(config, "model_type", type(config).__name__)
        raise DataError(f"config {kind}: no num_mel_bins/max_source_positions; expected a Whisper-style audio encoder")
    sr, hop, frames = 16000, 160, 2 * int(positions)
    fe = WhisperFeatureExtractor(
        feature_size=int(n_mels), sampling_rate=sr, hop_length=hop, chunk_length=max(1, frames * hop // sr), n_fft=400
    )
    fe.n_samples, fe.nb_max_frames, fe.chunk_length = frames * hop, frames, frames * hop / sr
    return fe


class Batcher:
    """Turns a ``TaskData`` into model inputs, deterministically for (seed, epoch) and sharded by rank.

    Args:
        td: the validated data.
        tokenizer: needed by the text tasks; its ``pad_token`` is set to ``eos_token`` when missing (GPT-2 style).
        feature_extractor: needed by the audio tasks (see ``feature_extractor_for``).
        max_length: token limit; longer texts are truncated.
        audio_seconds: keep at most this many seconds of each recording (from its start) before featurising.
        cache_mb: memory for caching audio features between epochs.
    """

    def __init__(
        self,
        td: TaskData,
        tokenizer: Any = None,
        feature_extractor: Any = None,
        max_length: int = 128,
        audio_seconds: float | None = None,
        cache_mb: int = 256,
    ) -> None:
        self.td, self.tokenizer, self.feature_extractor = td, tokenizer, feature_extractor
        self.max_length, self.audio_seconds = max_length, audio_seconds
        self._ids = label_mapping(td)
        self._cache: dict[str, Any] = {}
        self._cache_left = cache_mb * 2**20
        audio = td.task in ("audio-classification", "domain-matching")
        if audio and feature_extractor is None:
            raise DataError(f"{td.path}: task {td.task} needs an audio feature extractor; expected one from the model")
        if not audio and tokenizer is None:
            raise DataError(f"{td.path}: task {td.task} needs a tokenizer; expected the checkpoint's tokenizer")
        if not audio and tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise DataError(f"{td.path}: the tokenizer has neither a pad nor an eos token; expected one of them")
            tokenizer.pad_token = tokenizer.eos_token

    def __len__(self) -> int:
        """The number of rows (see ``n_batches`` for batches)."""
        return len(self.td.rows)

    def n_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank gets per epoch."""
        n = len(self.td.rows)
        per_rank = n // world_size if drop_last else -(-n // world_size)
        return per_rank // batch_size if drop_last else -(-per_rank // batch_size)

    def order(
        self, shuffle: bool, seed: int, epoch: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1
    ) -> list[int]:
        """Row indices this rank reads this epoch (before batching).

        Rows are permuted with (seed, epoch), then dealt round-robin to ranks. Without ``drop_last`` the list is
        padded with rows from its start so every rank gets the same count; with it the tail is dropped.
        """
        import numpy as np

        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank}: expected 0 ≤ rank < world size {world_size}")
        n = len(self.td.rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        per_rank = n // world_size if drop_last else -(-n // world_size)
        total = per_rank * world_size
        perm = np.resize(perm, total)  # repeats from the start when padding, truncates when dropping
        return [int(i) for i in perm[rank::world_size]]

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[dict]:
        """Yield model-input dicts of torch tensors for this rank; ``n_batches`` of them.

        Keys: text tasks the tokenizer's (``input_ids``, ``attention_mask``, …) + ``labels`` (class ids; causal LM:
        ``input_ids`` with padding set to -100); ``audio-classification`` ``input_features`` [B, n_mels, frames] +
        ``labels``; ``domain-matching`` ``source_features`` and ``reference_features`` [B, n_mels, frames].
        """
        if batch_size < 1:
            raise DataError(f"batch size {batch_size}: expected ≥ 1")
        idx = self.order(shuffle, seed, epoch, drop_last, rank, world_size)
        for b in range(self.n_batches(batch_size, world_size, drop_last)):
            yield self.collate([self.td.rows[i] for i in idx[b * batch_size : (b + 1) * batch_size]])

    def collate(self, rows: list[dict]) -> dict:
        """Model inputs for a list of rows."""
        import numpy as np
        import torch

        task = self.td.task
        if task in ("audio-classification", "domain-matching"):
            cols = (
                {"audio": "input_features"}
                if task == "audio-classification"
                else {"source": "source_features", "reference": "reference_features"}
            )
            out = {key: torch.from_numpy(np.stack([self.features(r[c]) for r in rows])) for c, key in cols.items()}
        else:
            kw = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            if task == "pair-classification":
                enc = self.tokenizer([r["text_a"] for r in rows], [r["text_b"] for r in rows], **kw)
            else:
                enc = self.tokenizer([r["text"] for r in rows], **kw)
            out = dict(enc)
            if task == "causal-lm":
                out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
                out["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if self.td.labels is not None:
            out["labels"] = torch.tensor([self._ids[r["label"]] for r in rows], dtype=torch.long)
        return out

    def features(self, path: str) -> Any:
        """Log-mel features ``[n_mels, frames]`` (float32 numpy) of one recording, cached while memory allows."""
        if path in self._cache:
            return self._cache[path]
        fe = self.feature_extractor
        y = load_audio(path, sr=fe.sampling_rate)
        if self.audio_seconds is not None:
            y = y[: int(self.audio_seconds * fe.sampling_rate)]
        feats = fe(y, sampling_rate=fe.sampling_rate, return_tensors="np")["input_features"][0].astype("float32")
        if feats.nbytes <= self._cache_left:
            self._cache[path] = feats
            self._cache_left -= feats.nbytes
        return feats


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pelt" / "data"


_VADER_WORD = re.compile(r"[a-z]{2,}(?:['-][a-z]+)*")  # letters, inner hyphen/apostrophe; drops "x-d"-style emoticons


def vader_rows() -> tuple[list[dict], str]:
    """Word-sentiment rows from the VADER lexicon (|mean rating| ≥ 1), and a provenance line.

    Raises:
        DataError: the package vadersentiment is not installed.
    """
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or spec.origin is None:
        raise DataError(
            "built-in dataset 'vader' needs the PyPI package vadersentiment; it is not installed",
            hint="pip install vadersentiment==3.3.2",
        )
    lexicon = Path(spec.origin).parent / "vader_lexicon.txt"
    seen: set[str] = set()
    rows = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split("\t")
        if len(parts) < 2 or not _VADER_WORD.fullmatch(parts[0]) or parts[0] in seen:
            continue
        seen.add(parts[0])
        mean = float(parts[1])
        if abs(mean) >= 1.0:
            rows.append({"text": parts[0], "label": "positive" if mean > 0 else "negative"})
    try:
        from importlib.metadata import version

        ver = version("vadersentiment")
    except Exception:  # noqa: BLE001 - metadata may be missing in odd installs
        ver = "unknown version"
    note = (
        f"vader: built by pelt from {lexicon} (PyPI vadersentiment {ver}, MIT License; Hutto & Gilbert 2014, "
        "ICWSM: 7,500 lexical features rated -4..+4 by 10 human raters). Kept: lowercase words (inner - or ') "
        "with |mean rating| >= 1.0; label positive if mean > 0 else negative; stratified 85/15 split, seed 0."
    )
    return rows, note


def builtin_dataset(name: str, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Build (or reuse) a built-in dataset and return its (train, eval) JSONL paths.

    Files go to ``cache_dir/<name>/`` (default ``$XDG_CACHE_HOME/pelt/data`` or ``~/.cache/pelt/data``), written
    atomically; existing files whose content hash matches are reused untouched. A ``README`` there states provenance.

    Raises:
        DataError: unknown name, or the package the dataset is built from is missing.
    """
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; known built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    rows, note = vader_rows()
    train, ev = split(TaskData("text-classification", rows, ["negative", "positive"], name), 0.15, 0)
    blobs = [b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in part.rows) for part in (train, ev)]
    digest = hashlib.sha256(blobs[0] + b"\0" + blobs[1]).hexdigest()
    out = _cache_root(cache_dir) / name
    paths = (out / "train.jsonl", out / "eval.jsonl")
    readme = out / "README"
    text = f"{note}\ntrain {len(train.rows)} rows, eval {len(ev.rows)} rows; sha256 {digest}\n"
    if all(p.is_file() for p in paths):
        have = hashlib.sha256(paths[0].read_bytes() + b"\0" + paths[1].read_bytes()).hexdigest()
        if have == digest:
            if not readme.is_file():
                write_bytes_atomic(readme, text.encode())
            return paths
    out.mkdir(parents=True, exist_ok=True)
    for p, blob in zip(paths, blobs, strict=True):
        write_bytes_atomic(p, blob)
    write_bytes_atomic(readme, text.encode())
    return paths


def resolve_data(arg: str) -> tuple[Path, Path | None]:
    """``--data`` argument → (train, eval or None): an existing file, else a built-in dataset name.

    Raises:
        DataError: neither an existing path nor a built-in name.
    """
    p = Path(arg)
    if p.exists():
        return p, None
    if arg in BUILTIN_DATASETS:
        return builtin_dataset(arg)
    raise DataError(f"{arg}: DATA path does not exist; known built-in datasets: {', '.join(BUILTIN_DATASETS)}")
