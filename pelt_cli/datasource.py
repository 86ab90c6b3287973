"""Data at scale: rows held in Arrow by 🤗 datasets (memory-mapped from a cache on disk) instead of Python lists.

Sources that go through here (see :func:`is_arrow_source`):

- a JSONL/CSV/TSV file larger than :data:`ARROW_BYTES` (``PELT_ARROW_BYTES`` overrides; smaller files are read
  into memory as before): converted once with pyarrow's readers into ``$XDG_CACHE_HOME/pelt/arrow`` and reused
  while the file's size and modification time are unchanged;
- a Parquet file (``.parquet``);
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``DIR::split`` picks a split;
  default ``train``);
- a dataset name already in the local Hugging Face cache (``NAME`` or ``NAME::split``), loaded offline.

Rows stay on disk: :class:`ArrowRows` reads the ones a batch needs, label statistics come from Arrow compute, and
tokenization is cached beside the data (:meth:`ArrowRows.tokenized`). Messages keep pelt's ``file:line`` form: a
JSONL/CSV/TSV row's source line is kept in a ``__line__`` column.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pelt_cli.errors import DataError

ARROW_BYTES = 64 * 2**20
LINE = "__line__"
SPLIT_SEP = "::"
TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")


def arrow_bytes() -> int:
    """The size above which a JSONL/CSV/TSV file is held in Arrow (``PELT_ARROW_BYTES``, default 64 MiB)."""
    value = os.environ.get("PELT_ARROW_BYTES", "")
    return int(value) if value.isdigit() else ARROW_BYTES


def cache_dir() -> Path:
    """Where converted files and token caches live: ``$XDG_CACHE_HOME/pelt/arrow`` (``~/.cache/pelt/arrow``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pelt" / "arrow"


def split_spec(arg: str | os.PathLike[str]) -> tuple[str, str | None]:
    """``("DIR", "validation")`` for ``DIR::validation``; ``(arg, None)`` without a split."""
    text = str(arg)
    if SPLIT_SEP in text:
        source, split = text.rsplit(SPLIT_SEP, 1)
        return source, split or None
    return text, None


def is_arrow_source(arg: str | os.PathLike[str]) -> bool:
    """Whether ``arg`` is read through Arrow: a large text file, Parquet, a saved dataset or a split of one."""
    source, split = split_spec(arg)
    p = Path(source)
    if split is not None or p.is_dir() or p.suffix.lower() == ".parquet" or is_cached_name(str(arg)):
        return True
    return p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and p.stat().st_size > arrow_bytes()


def is_cached_name(arg: str) -> bool:
    """Whether ``arg`` looks like a Hub dataset name (``name`` or ``owner/name``, optional ``::split``) rather than
    a path; whether it is in the cache is known only when loading it."""
    source, _ = split_spec(arg)
    parts = source.split("/")
    return not Path(source).exists() and 1 <= len(parts) <= 2 and all(parts) and "." not in parts[-1][-8:]


class ArrowRows(Sequence):
    """A dataset's rows as a read-only sequence of dicts, backed by a memory-mapped ``datasets.Dataset``.

    Args:
        ds: the dataset.
        where: how messages name it (the file, ``DIR::split``, the dataset name).
    """

    def __init__(self, ds: Any, where: str) -> None:
        self.ds, self.where = ds, where

    @property
    def columns(self) -> list[str]:
        """The data columns (without the source-line column)."""
        return [c for c in self.ds.column_names if c != LINE]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.select(range(*i.indices(len(self))))
        return self.take([int(i)])[0]

    def __iter__(self) -> Iterator[dict]:
        for batch in self.ds.iter(batch_size=1024):
            yield from _rows_of(batch)

    def take(self, indices: Sequence[int]) -> list[dict]:
        """The rows at ``indices``, as dicts of the data columns (one Arrow read)."""
        return _rows_of(self.ds[[int(i) for i in indices]])

    def select(self, indices: Any) -> ArrowRows:
        """A view of the rows at ``indices`` (an indices mapping, no copy)."""
        return ArrowRows(self.ds.select(indices, keep_in_memory=True), self.where)  # nothing written beside the data

    def select_columns(self, columns: list[str]) -> ArrowRows:
        """The rows with only ``columns``."""
        return ArrowRows(self.ds.select_columns(columns), self.where)

    def line(self, i: int) -> str:
        """``file:line`` of row ``i`` where the source had lines, else ``where: row i+1``."""
        if LINE in self.ds.column_names:
            return f"{self.where}:{self.ds[int(i)][LINE]}"
        return f"{self.where}: row {int(i) + 1}"

    def arrow_type(self, column: str) -> Any:
        """The column's Arrow type."""
        return self.ds.data.schema.field(column).type

    def first_invalid(self, column: str) -> int | None:
        """The index of the first row whose ``column`` is null or blank, or None."""
        import pyarrow as pa
        import pyarrow.compute as pc

        col = self._column(column)
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        start = 0
        for chunk in col.chunks:  # a chunk at a time: the trimmed copy of a whole column would double the data
            for i in range(0, len(chunk), 1 << 16):
                part = chunk.slice(i, 1 << 16)
                bad = pc.is_null(part)
                if text:
                    bad = pc.or_kleene(bad, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(part)), 0))
                found = pc.index(pc.fill_null(bad, True), True).as_py()
                if found >= 0:
                    return start + i + found
            start += len(chunk)
        return None

    def counts(self, column: str) -> dict[str, int]:
        """How many rows hold each value of ``column`` (Arrow compute; nothing read into Python rows)."""
        import pyarrow.compute as pc

        return {str(d["values"]): int(d["counts"]) for d in pc.value_counts(self._column(column)).to_pylist()}

    def codes(self, column: str, values: list[str]) -> Any:
        """``column`` as int64 indices into ``values`` (numpy; -1 where a value is not among them)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        idx = pc.index_in(self._column(column), value_set=pa.array(values, pa.string()))
        return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype("int64")

    def with_strings(self, column: str) -> ArrowRows:
        """The rows with ``column`` as strings (integer labels as text, a ClassLabel's names), computed once into
        pelt's cache (never beside the source: a saved dataset's directory is an input)."""
        import pyarrow as pa
        from datasets import ClassLabel, Value

        feature = self.ds.features[column]
        if not isinstance(feature, ClassLabel) and pa.types.is_string(self.arrow_type(column)):
            return self
        names = feature.names if isinstance(feature, ClassLabel) else None

        def convert(batch: dict[str, list]) -> dict[str, list]:
            values = batch[column]
            return {column: [None if v is None else names[v] if names else str(v) for v in values]}

        features = self.ds.features.copy()
        features[column] = Value("string")
        return ArrowRows(self._cached_map(convert, ("strings", column), features=features), self.where)

    def tokenized(self, tokenizer: Any, columns: tuple[str, ...], max_length: int) -> ArrowRows:
        """The rows with the tokenizer's outputs (``input_ids``, ``attention_mask``, …; unpadded, truncated to
        ``max_length``) added, computed once and cached beside the data under a key of the data, the tokenizer
        and the settings."""

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = [batch[c] for c in columns]
            return dict(tokenizer(*texts, truncation=True, max_length=max_length))

        key = ("tokens", _tokenizer_key(tokenizer), columns, max_length)
        return ArrowRows(self._cached_map(encode, key, remove=list(columns)), self.where)  # the ids replace the text

    def _cached_map(self, fn: Any, key: tuple, features: Any = None, remove: list[str] | None = None) -> Any:
        """``ds.map(fn, batched=True)`` written once to ``cache_dir()/<kind>/<hash>.arrow``, the hash of the data's
        fingerprint and ``key``; reused while both are unchanged."""
        digest = hashlib.sha256(repr((self.ds._fingerprint, key)).encode()).hexdigest()[:24]
        cache = cache_dir() / key[0] / f"{digest}.arrow"
        cache.parent.mkdir(parents=True, exist_ok=True)
        return self.ds.map(
            fn,
            batched=True,
            features=features,
            remove_columns=remove,
            cache_file_name=str(cache),
            new_fingerprint=digest,
            desc=f"{key[0]} of {self.where}",
        )

    def _column(self, column: str) -> Any:
        """One column as a pyarrow ChunkedArray, through the indices mapping when there is one."""
        ds = (
            self.ds.select_columns([column]).flatten_indices(keep_in_memory=True)
            if self.ds._indices is not None
            else self.ds
        )
        return ds.data.column(column)


def _rows_of(batch: dict[str, list]) -> list[dict]:
    """A columnar batch (``{column: values}``) as row dicts, without the source-line column."""
    cols = [c for c in batch if c != LINE]
    return [dict(zip(cols, values, strict=True)) for values in zip(*(batch[c] for c in cols), strict=True)]


def _tokenizer_key(tokenizer: Any) -> str:
    """What identifies a tokenizer's outputs: its class, name or path, vocabulary size and special tokens."""
    return repr(
        (
            type(tokenizer).__name__,
            getattr(tokenizer, "name_or_path", ""),
            len(tokenizer),
            getattr(tokenizer, "special_tokens_map", {}),
        )
    )


def take_rows(rows: Sequence[dict], indices: Sequence[int]) -> list[dict]:
    """The rows at ``indices`` of a list or an :class:`ArrowRows`."""
    if isinstance(rows, ArrowRows):
        return rows.take(indices)
    return [rows[int(i)] for i in indices]


def subset(rows: Sequence[dict], indices: Sequence[int]) -> Sequence[dict]:
    """The rows at ``indices`` (in that order): a list, or an :class:`ArrowRows` view."""
    if isinstance(rows, ArrowRows):
        return rows.select(indices)
    return [rows[int(i)] for i in indices]


def open_rows(arg: str | os.PathLike[str]) -> ArrowRows:
    """The rows of an Arrow source (see the module docstring).

    Raises:
        DataError: an unreadable or malformed source, a split that is not there, a name not in the local cache.
    """
    source, split = split_spec(arg)
    p = Path(source)
    _quiet_datasets()
    try:
        if p.is_dir():
            return ArrowRows(_from_disk(p, split), str(arg))
        if p.is_file():
            return ArrowRows(_from_file(p), str(p))
        return ArrowRows(_from_cache(source, split), str(arg))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many types for a malformed source
        raise DataError(f"{arg}: cannot read it as a dataset ({type(e).__name__}: {_first_line(e)})") from None


def _quiet_datasets() -> None:
    """datasets' own log lines off (pelt's error says what failed); its progress bars only on a terminal."""
    import sys

    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 10)
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _from_disk(p: Path, split: str | None) -> Any:
    """A dataset saved with ``save_to_disk`` (a split of a DatasetDict: ``split``, default ``train``)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if not (p / "dataset_info.json").is_file() and not (p / "dataset_dict.json").is_file():
        raise DataError(
            f"{p}: a directory, but not a dataset saved with save_to_disk (no dataset_info.json or "
            "dataset_dict.json); expected a data file or a saved dataset"
        )
    ds = load_from_disk(str(p))
    if isinstance(ds, DatasetDict):
        return _pick_split(ds, split, str(p))
    if split is not None:
        raise DataError(f"{p}{SPLIT_SEP}{split}: the saved dataset has no splits; expected {p} alone")
    assert isinstance(ds, Dataset)
    return ds


def _pick_split(dd: Any, split: str | None, where: str) -> Any:
    want = split or "train"
    if want not in dd:
        raise DataError(f"{where}: no split {want!r}; expected one of {', '.join(dd)} (as {where}{SPLIT_SEP}SPLIT)")
    return dd[want]


def eval_split(arg: str | os.PathLike[str]) -> str | None:
    """For a saved DatasetDict or a cached dataset given without a split: its ``validation`` (or ``test``) split
    as ``SOURCE::split``, the eval set that goes with ``train``; else None."""
    source, split = split_spec(arg)
    if split is not None:
        return None
    names = _split_names(source)
    return next((f"{source}{SPLIT_SEP}{s}" for s in ("validation", "test") if s in names), None)


def _split_names(source: str) -> list[str]:
    """The splits of a saved DatasetDict directory, or of a dataset in the local cache (none for a file)."""
    import json

    p = Path(source)
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        return list(json.loads((p / "dataset_dict.json").read_text()).get("splits", []))
    if p.exists() or not is_cached_name(source):
        return []
    _quiet_datasets()
    try:
        return list(_load_cached(source))
    except DataError:
        return []


def _from_file(p: Path) -> Any:
    """A Parquet file, or a large JSONL/CSV/TSV file converted once into the cache (with its source lines)."""
    import json

    from datasets import load_dataset

    suffix = p.suffix.lower()
    stat = p.stat()
    cache = cache_dir() / "files"
    files = {"train": str(p.resolve())}
    if suffix == ".parquet":
        return load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache))
    if suffix in (".csv", ".tsv"):
        return _from_csv(p, cache)
    from datasets import Features, Value

    key = f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    columns = _jsonl_columns(p)
    features = Features({**{c: Value("string") for c in columns}, LINE: Value("int64")})
    kwargs = {"path": str(p), "key": key, "columns": json.dumps(columns)}  # no lists: datasets shards over lists
    return _from_generator(_jsonl_lines, kwargs, features, cache)


def _from_csv(p: Path, cache: Path) -> Any:
    """A CSV/TSV file through pandas' reader: every column a string, nothing turned into NaN, TSV unquoted."""
    import csv

    from datasets import Features, Value, load_dataset

    with open(p, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ","), [])
    features = Features({h.strip(): Value("string") for h in header})
    tsv = p.suffix.lower() == ".tsv"
    return load_dataset(
        "csv",
        data_files={"train": str(p.resolve())},
        split="train",
        cache_dir=str(cache),
        features=features,
        sep="\t" if tsv else ",",
        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
        keep_default_na=False,
        na_filter=False,
        encoding="utf-8-sig",
    )


def _jsonl_columns(p: Path) -> list[str]:
    """The keys of a JSONL file's first row: the columns its Arrow copy holds (later rows' other keys are ignored,
    a key a row lacks is null there)."""
    with open(p, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                return [k for k in json_row(str(p), n, line) if k != LINE]
    raise DataError(f"{p}: no data rows; expected one JSON object per line")


def json_row(path: str, n: int, line: str) -> dict:
    """Line ``n`` of a JSONL file as an object; every way it can be bad as one ``file:line`` DataError.

    Raises:
        DataError: not JSON, nested too deeply, a number Python cannot convert, or not an object.
    """
    import json

    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{n}: bad JSON ({e.msg} at column {e.colno}); expected one JSON object per line"
        ) from None
    except (RecursionError, ValueError) as e:  # nesting too deep; an integer with too many digits
        problem = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise DataError(f"{path}:{n}: bad JSON ({problem}); expected one JSON object per line") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{n}: a JSON {type(row).__name__}, not an object; expected one object per line")
    return row


def _text(value: Any) -> str | None:
    """A JSON value as the string Arrow holds: numbers and booleans as text (``1.0`` → ``"1"``), lists and objects as
    JSON, null stays null (reported as missing by the caller)."""
    import json

    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _jsonl_lines(path: str, key: str, columns: str) -> Iterator[dict]:
    """Rows of a JSONL file (``columns``, a JSON list, of each, as strings) with their source line, for
    ``Dataset.from_generator`` (``key`` only names the cache: the file's path, size and modification time)."""
    import json

    names = json.loads(columns)
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json_row(path, n, line)
                yield {**{c: _text(row.get(c)) for c in names}, LINE: n}


def _from_generator(gen: Any, kwargs: dict[str, Any], features: Any, cache: Path) -> Any:
    """``Dataset.from_generator`` cached by ``kwargs``; a DataError from the rows (pelt's file:line) comes out as
    itself, not wrapped in datasets' generation error."""
    from datasets import Dataset

    try:
        return Dataset.from_generator(gen, gen_kwargs=kwargs, features=features, cache_dir=str(cache))
    except Exception as e:  # noqa: BLE001 - datasets wraps the generator's error
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
            if isinstance(cause, DataError):
                raise cause from None
        raise


def _from_cache(name: str, split: str | None) -> Any:
    """A dataset name from the local Hugging Face cache, offline (nothing is downloaded)."""
    return _pick_split(_load_cached(name), split, name)


def _load_cached(name: str) -> Any:
    """Every split of a dataset in the local cache (a DatasetDict), offline."""
    import datasets
    from datasets import load_dataset

    datasets.config.HF_DATASETS_OFFLINE = True  # the cache only: nothing is downloaded
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_DATASETS_CACHE") or (str(Path(home) / "datasets") if home else None)
    try:
        return load_dataset(name, cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - not cached: datasets raises ConnectionError, FileNotFoundError, …
        raise DataError(
            f"{name}: not a file, not a built-in dataset, and not a dataset in the local Hugging Face cache "
            f"({type(e).__name__}); expected a JSONL/CSV/TSV/Parquet file, a saved dataset directory, or a cached "
            "dataset name"
        ) from None
