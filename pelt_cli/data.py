"""Training data for ``pelt train``: read JSONL/CSV/TSV, infer the task, validate rows, map labels, make batches.

Tasks and the columns they read (other columns are ignored):

- ``text-classification``: ``text``, ``label``
- ``pair-classification``: ``text_a``, ``text_b``, ``label`` (MRPC-style paraphrase)
- ``causal-lm``: ``text``
- ``audio-classification``: ``audio`` (a path), ``label``
- ``speech-to-text``: ``audio`` (a path), ``text`` (its transcription; the LM loss of the text given the audio)
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
from pelt_cli.io.guard import is_regular, open_regular, require_regular

TASKS = (
    "text-classification",
    "pair-classification",
    "causal-lm",
    "audio-classification",
    "domain-matching",
    "speech-to-text",
)
COLUMNS = {
    "text-classification": ("text", "label"),
    "pair-classification": ("text_a", "text_b", "label"),
    "causal-lm": ("text",),
    "audio-classification": ("audio", "label"),
    "domain-matching": ("source", "reference"),
    "speech-to-text": ("audio", "text"),
}
AUDIO_COLUMNS = ("audio", "source", "reference")
TEXT_COLUMNS = {  # the text tasks' columns, in the order the tokenizer takes them
    "text-classification": ("text",),
    "pair-classification": ("text_a", "text_b"),
    "causal-lm": ("text",),
}
MAX_ROW_CHARS = 8 * 1024 * 1024  # one JSONL line or CSV/TSV line
MAX_JSON_ARRAY_CHARS = 256 * 1024 * 1024  # a .json array is parsed whole; larger data belongs in JSONL
csv.field_size_limit(MAX_ROW_CHARS)
BUILTIN_DATASETS = {
    "vader": "word sentiment (positive/negative) from the VADER lexicon of the PyPI package vadersentiment 3.3.2",
}
_INFER_ORDER = (
    "pair-classification",
    "domain-matching",
    "audio-classification",
    "speech-to-text",  # audio,text before text (causal-lm); audio,text,label stays audio-classification
    "text-classification",
    "causal-lm",
)


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
    return list(iter_numbered(path))


def _check_file(p: Path) -> str:
    """The lower-case suffix of a data file that exists and has a known format."""
    if not os.path.lexists(p):
        raise DataError(f"{p}: no such file; expected a JSONL, CSV or TSV data file")
    require_regular(p, "a JSONL, CSV or TSV data file", DataError)  # a FIFO or a device is refused, never read
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        raise DataError(
            f"{p}: unknown data format {suffix or '(no suffix)'!r}; "
            "expected .jsonl, .json, .csv, .tsv or .parquet, or a saved dataset directory"
        )
    return suffix


def iter_numbered(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs of a JSONL, JSON-array, CSV or TSV file, read line by line (constant memory; a JSON
    array is read whole).

    Raises:
        DataError: missing, empty or undecodable file, a bad JSON line (file:line), a row of the wrong width.
    """
    p = Path(path)
    suffix = _check_file(p)
    with open_regular(p, "a data file", DataError) as raw, io.TextIOWrapper(raw, "utf-8-sig", newline="") as f:
        try:
            head = f.read(1 << 16)
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); expected a UTF-8 data file") from None
        if not head.strip() and not f.read(1 << 16).strip():
            raise DataError(f"{p}: the file is empty; expected a header row and data rows, or JSON lines")
        f.seek(0)
        try:
            if suffix in (".csv", ".tsv"):
                yield from _iter_csv(p, bounded_lines(p, f), "\t" if suffix == ".tsv" else ",")
            elif suffix == ".json" and head.lstrip().startswith("["):
                yield from _json_array(p, _whole(p, f))
            else:
                yield from _iter_jsonl(p, bounded_lines(p, f))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason}); expected a UTF-8 data file") from None


def bounded_lines(p: Path, f: Any) -> Iterator[str]:
    """The lines of an open text file, each at most :data:`MAX_ROW_CHARS` long (a longer one is refused before it
    is read whole, so one giant line cannot exhaust memory)."""
    n = 0
    while line := f.readline(MAX_ROW_CHARS + 1):
        n += 1
        if len(line) > MAX_ROW_CHARS and not line.endswith("\n"):
            raise DataError(
                f"{p}:{n}: a line longer than {MAX_ROW_CHARS:,} characters; expected rows of at most that size "
                "(split the text, or check that the file is JSONL/CSV with line breaks)"
            )
        yield line


def _whole(p: Path, f: Any) -> str:
    """The rest of a JSON-array data file, at most :data:`MAX_JSON_ARRAY_CHARS` characters."""
    text = f.read(MAX_JSON_ARRAY_CHARS + 1)
    if len(text) > MAX_JSON_ARRAY_CHARS:
        raise DataError(
            f"{p}: a JSON array larger than {MAX_JSON_ARRAY_CHARS:,} characters; expected JSON lines (.jsonl) "
            "for a file this size (one object per line is read a row at a time)"
        )
    return text


def _json_array(p: Path, text: str) -> list[tuple[int, dict]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: bad JSON ({e.msg}); expected a JSON array of objects") from None
    except (RecursionError, ValueError) as e:
        raise DataError(f"{p}: bad JSON ({_json_problem(e)}); expected a JSON array of objects") from None
    bad = [i for i, item in enumerate(items, 1) if not isinstance(item, dict)]
    if bad:
        raise DataError(f"{p}: item {bad[0]} is not an object; expected a JSON array of objects")
    return list(enumerate(items, 1))


def _iter_jsonl(p: Path, lines: Iterator[str]) -> Iterator[tuple[int, dict]]:
    from pelt_cli.datasource import json_row

    for n, line in enumerate(lines, 1):
        if line.strip():
            yield n, json_row(str(p), n, line)


def _iter_csv(p: Path, lines: Iterator[str], delimiter: str) -> Iterator[tuple[int, dict]]:
    # TSV is read unquoted, as GLUE's TSVs need (their texts hold unbalanced quotes).
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    try:
        yield from _csv_rows(p, reader)
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: not valid CSV/TSV ({e}); expected one row per line") from None


def _json_problem(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)


def _csv_rows(p: Path, reader: Any) -> Iterator[tuple[int, dict]]:
    header = [h.strip() for h in next(reader, None) or [""]]
    if not any(header) or "" in header:
        raise DataError(
            f"{p}:1: the header row has an empty column name ({header!r}); expected names such as text,label"
        )
    dup = [h for h, c in Counter(header).items() if c > 1]
    if dup:
        raise DataError(f"{p}:1: column {dup[0]!r} appears twice in the header; expected unique column names")
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise DataError(
                f"{p}:{reader.line_num}: {len(row)} fields but the header has {len(header)} "
                f"({', '.join(header)}); expected one field per column"
            )
        yield reader.line_num, dict(zip(header, row, strict=True))


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
    from pelt_cli.datasource import is_arrow_source

    if is_arrow_source(path):
        return _load_arrow(str(path), task, labels)
    p = Path(path)
    numbered = _read(p)
    if not numbered:
        raise DataError(f"{p}: no data rows; expected at least one row after the header")
    task = _task_of(str(p), set().union(*(row.keys() for _, row in numbered)), task)
    need = COLUMNS[task]
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


def _task_of(where: str, columns: set[str], task: str | None) -> str:
    """The task of data with ``columns``: ``task`` checked, or inferred; its columns must all be there."""
    if task is None:
        try:
            task = infer_task(columns)
        except DataError as e:
            raise DataError(f"{where}: {e.message}", e.hint) from None
    elif task not in TASKS:
        raise DataError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    need = COLUMNS[task]
    if missing := [c for c in need if c not in columns]:
        raise DataError(
            f"{where}: task {task} needs column(s) {', '.join(missing)}; found {', '.join(sorted(columns))}; "
            f"expected {'+'.join(need)}"
        )
    return task


def _load_arrow(arg: str, task: str | None, labels: list[str] | None) -> TaskData:
    """:func:`load_data` for a source held in Arrow (see :mod:`pelt_cli.datasource`): the same checks, by Arrow
    compute over the columns, with the same ``file:line`` messages."""
    import pyarrow as pa

    from pelt_cli.datasource import LINE, open_rows

    rows = open_rows(arg)
    task = _task_of(arg, set(rows.columns), task)
    need = COLUMNS[task]
    if audio := [c for c in need if c in AUDIO_COLUMNS]:
        raise DataError(
            f"{arg}: task {task} reads audio paths ({', '.join(audio)}) from a JSONL/CSV/TSV manifest under "
            f"{_mib_limit()}; expected a smaller manifest"
        )
    keep = [*need, *([LINE] if LINE in rows.ds.column_names else [])]
    rows = rows.select_columns(keep)
    if "label" in need:
        rows = rows.with_strings("label")
    for c in need:
        what = "a class name" if c == "label" else "a string"
        if not pa.types.is_string(rows.arrow_type(c)) and not pa.types.is_large_string(rows.arrow_type(c)):
            raise DataError(f"{arg}: column {c!r} holds {rows.arrow_type(c)}; expected {what} in every row")
        if (bad := rows.first_invalid(c)) is not None:
            raise DataError(f"{rows.line(bad)}: column {c!r} is missing or empty; expected {what}")
    found = None if "label" not in need else _arrow_labels(rows, labels)
    return TaskData(task, rows, found, arg)


def _mib_limit() -> str:
    from pelt_cli.datasource import arrow_bytes

    return f"{arrow_bytes() / 2**20:g} MiB"


def _arrow_labels(rows: Any, labels: list[str] | None) -> list[str]:
    """The class names of Arrow rows (sorted as :func:`_sort_labels` does), or ``labels`` when every row's label
    is among them."""
    import numpy as np

    if labels is None:
        return _sort_labels(set(rows.counts("label")))
    known = [str(lab) for lab in labels]
    codes = rows.codes("label", known)
    unknown = np.flatnonzero(codes < 0)
    if unknown.size:
        first = int(unknown[0])
        more = f" ({unknown.size - 1} more rows with unknown labels)" if unknown.size > 1 else ""
        raise DataError(
            f"{rows.line(first)}: label {rows.take([first])[0]['label']!r} is not one of the training labels "
            f"({', '.join(known)}){more}; expected a label seen in the training data"
        )
    return known


def label_codes(td: TaskData) -> Any:
    """Each row's class id (int64 numpy), for a list of rows or Arrow rows alike."""
    import numpy as np

    from pelt_cli.datasource import ArrowRows

    labels = td.labels or []
    if isinstance(td.rows, ArrowRows):
        return td.rows.codes("label", labels)
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index[r["label"]] for r in td.rows], dtype="int64")


def label_counts(rows: Any) -> dict[str, int]:
    """How many rows hold each label, for a list of rows or Arrow rows alike."""
    from pelt_cli.datasource import ArrowRows

    if isinstance(rows, ArrowRows):
        return rows.counts("label")
    return dict(Counter(r["label"] for r in rows))


def _resolve_audio(p: Path, numbered: list, rows: list[dict], cols: list[str], base: Path) -> None:
    """Make the rows' audio paths absolute (relative ones start at ``base``); every missing file at once."""
    absent = []
    for (line, _), r in zip(numbered, rows, strict=True):
        for c in cols:
            f = Path(r[c]).expanduser()
            f = f if f.is_absolute() else base / f
            try:
                r[c] = str(f.resolve())
            except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte: reported as absent below
                r[c] = str(f)
            if not is_regular(f):
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
    c = label_counts(td.rows)
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
    from pelt_cli.datasource import subset

    rng = np.random.default_rng(seed)
    n = len(td.rows)
    if td.labels is None:
        groups = [np.arange(n)]
    else:  # by label, in the order of the labels' text; each group's rows in file order
        codes = label_codes(td)
        order = sorted(range(len(td.labels)), key=lambda i: str(td.labels[i]))
        groups = [g for i in order if (g := np.flatnonzero(codes == i)).size]
    chosen: list[int] = []
    for idx in groups:
        k = int(math.floor(len(idx) * eval_fraction + 0.5))
        chosen.extend(int(i) for i in rng.permutation(idx)[:k])
    if not chosen:
        chosen = [int(rng.integers(n))]
    if len(chosen) == n:
        chosen = chosen[1:]
    held = np.zeros(n, dtype=bool)
    held[chosen] = True
    train, ev = subset(td.rows, np.flatnonzero(~held)), subset(td.rows, np.flatnonzero(held))
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
        feature_extractor: needed by the audio tasks (see ``feature_extractor_for``); ``speech-to-text``: the
            model's processor (a :class:`pelt_cli.audio_lm.SpeechProcessor`).
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
        self._source: Any = td.rows  # what batches read rows from (Arrow rows: their cached tokenization)
        self._writer: Any = None  # large Arrow rows without a token cache: tokenized per batch, kept as they go
        self._ids = label_mapping(td)
        self._cache: dict[str, Any] = {}
        self._cache_left = cache_mb * 2**20
        audio = td.task in ("audio-classification", "domain-matching")
        if audio and feature_extractor is None:
            raise DataError(f"{td.path}: task {td.task} needs an audio feature extractor; expected one from the model")
        if td.task == "speech-to-text" and feature_extractor is None:
            raise DataError(f"{td.path}: task speech-to-text needs the model's processor; expected Qwen2-Audio's")
        if not audio and tokenizer is None:
            raise DataError(f"{td.path}: task {td.task} needs a tokenizer; expected the checkpoint's tokenizer")
        if not audio and tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise DataError(f"{td.path}: the tokenizer has neither a pad nor an eos token; expected one of them")
            tokenizer.pad_token = tokenizer.eos_token
        self._pretokenize()

    def _pretokenize(self) -> None:
        """Arrow rows of a text task: tokenize once, cached on disk beside the data (batches then only pad); above
        ``PELT_TOKENIZE_ROWS`` rows without that cache, per batch as they are read, written to the cache as they go
        (see :class:`pelt_cli.datasource.TokenWriter`)."""
        from pelt_cli.datasource import ArrowRows

        if isinstance(self.td.rows, ArrowRows) and self.td.task in TEXT_COLUMNS:
            cols = TEXT_COLUMNS[self.td.task]
            self._source = self.td.rows.tokenized(self.tokenizer, cols, self.max_length)
            if self._source is self.td.rows:
                self._writer = self.td.rows.token_writer(self.tokenizer, cols, self.max_length)

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
        return [int(i) for i in self.order_array(shuffle, seed, epoch, drop_last, rank, world_size)]

    def order_array(
        self, shuffle: bool, seed: int, epoch: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1
    ) -> Any:
        """:meth:`order` as an int64 numpy array (8 bytes a row, for datasets of any size)."""
        import numpy as np

        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank}: expected 0 ≤ rank < world size {world_size}")
        n = len(self.td.rows)
        perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        per_rank = n // world_size if drop_last else -(-n // world_size)
        total = per_rank * world_size
        perm = np.resize(perm, total)  # repeats from the start when padding, truncates when dropping
        return perm[rank::world_size]

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> Iterator[dict]:
        """Yield model-input dicts of torch tensors for this rank; ``n_batches`` of them, from batch ``start`` on
        (the batches before it are skipped unread: a resumed epoch). Made one at a time, as they are consumed.

        Keys: text tasks the tokenizer's (``input_ids``, ``attention_mask``, …) + ``labels`` (class ids; causal LM:
        ``input_ids`` with padding set to -100); ``audio-classification`` ``input_features`` [B, n_mels, frames] +
        ``labels``; ``domain-matching`` ``source_features`` and ``reference_features`` [B, n_mels, frames];
        ``speech-to-text`` see :func:`pelt_cli.audio_lm.collate`.
        """
        if batch_size < 1:
            raise DataError(f"batch size {batch_size}: expected ≥ 1")
        from pelt_cli.datasource import take_rows

        idx = self.order_array(shuffle, seed, epoch, drop_last, rank, world_size)
        for b in range(start, self.n_batches(batch_size, world_size, drop_last)):
            at = idx[b * batch_size : (b + 1) * batch_size]
            rows = take_rows(self._source, at)
            if self._writer is not None:
                rows = self._writer(at, rows)
                if self._writer.cached is not None:  # every row written: the batches that follow read the cache
                    self._source, self._writer = self._writer.cached, None
            yield self.collate(rows)

    def collate(self, rows: list[dict]) -> dict:
        """Model inputs for a list of rows."""
        import numpy as np
        import torch

        task = self.td.task
        if task == "speech-to-text":  # ``feature_extractor``: a pelt_cli.audio_lm.SpeechProcessor
            waves = [self.waveform(r["audio"]) for r in rows]
            return self.feature_extractor.collate(waves, [r["text"] for r in rows], self.max_length)
        if task in ("audio-classification", "domain-matching"):
            cols = (
                {"audio": "input_features"}
                if task == "audio-classification"
                else {"source": "source_features", "reference": "reference_features"}
            )
            out = {key: torch.from_numpy(np.stack([self.features(r[c]) for r in rows])) for c, key in cols.items()}
        elif "input_ids" in rows[0]:  # tokenized once (Arrow rows): pad the cached token ids
            keys = [k for k in rows[0] if k not in COLUMNS[task] and k != "label"]
            enc = self.tokenizer.pad([{k: r[k] for k in keys} for r in rows], padding=True, return_tensors="pt")
            out = self._text_inputs(enc)
        else:
            kw = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            if task == "pair-classification":
                enc = self.tokenizer([r["text_a"] for r in rows], [r["text_b"] for r in rows], **kw)
            else:
                enc = self.tokenizer([r["text"] for r in rows], **kw)
            out = self._text_inputs(enc)
        if self.td.labels is not None:
            out["labels"] = torch.tensor([self._ids[r["label"]] for r in rows], dtype=torch.long)
        return out

    def _text_inputs(self, enc: Any) -> dict:
        """The model inputs of a tokenized text batch (a causal LM's labels: its ids, padding set to -100)."""
        if self.td.task != "causal-lm":
            return dict(enc)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        out["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return out

    def waveform(self, path: str) -> Any:
        """The 16 kHz waveform of one recording (cut to ``audio_seconds``), cached while memory allows."""
        if path in self._cache:
            return self._cache[path]
        sr = self.feature_extractor.sampling_rate
        y = load_audio(path, sr=sr)
        y = y[: int(self.audio_seconds * sr)] if self.audio_seconds is not None else y
        if y.nbytes <= self._cache_left:
            self._cache[path] = y
            self._cache_left -= y.nbytes
        return y

    def features(self, path: str) -> Any:
        """Log-mel features ``[n_mels, frames]`` (float32 numpy) of one recording, cached while memory allows."""
        if path in self._cache:
            return self._cache[path]
        fe = self.feature_extractor
        y = load_audio(path, sr=fe.sampling_rate)
        if self.audio_seconds is not None:
            y = y[: int(self.audio_seconds * fe.sampling_rate)]
        import torch

        with torch.autocast("cpu", enabled=False):  # the extractor computes in torch: fp32 under --precision bf16
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
    from pelt_cli.datasource import eval_split, is_cached_name, split_spec

    if Path(split_spec(arg)[0]).exists():
        ev = eval_split(arg)
        return Path(arg), Path(ev) if ev else None
    if arg in BUILTIN_DATASETS:
        return builtin_dataset(arg)
    if is_cached_name(arg):
        ev = eval_split(arg)
        return Path(arg), Path(ev) if ev else None
    raise DataError(f"{arg}: DATA path does not exist; known built-in datasets: {', '.join(BUILTIN_DATASETS)}")
