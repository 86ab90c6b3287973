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
tokenization is cached beside the data (:meth:`ArrowRows.tokenized`; above :data:`TOKENIZE_ROWS` rows without a
cache, rows are tokenized per batch as training reads them instead of all before the first step). Messages keep
pelt's ``file:line`` form: a JSONL/CSV/TSV row's source line is kept in a ``__line__`` column.

Memory: pages of a memory-mapped file count in the process's RSS once touched, so a pass over a whole file (the
checks, label counts, tokenization, an epoch of batches) would grow RSS to the file's size although the kernel could
drop them. Whenever the resident mapped pages have grown by :data:`RELEASE_BYTES`, :func:`release_mapped` unmaps
them from the process (``madvise(MADV_DONTNEED)``; they stay in the page cache), so RSS stays bounded by that
budget whatever the data's size (:func:`bound_mapped`, called as rows are read).
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pelt_cli.errors import DataError

ARROW_BYTES = 64 * 2**20
RELEASE_BYTES = 64 * 2**20
WRITE_ROWS = 16_384
TOKENIZE_ROWS = 500_000
LINE = "__line__"
ROW = "__row__"
BATCHES_SUFFIX = ".batches.arrow"
SPLIT_SEP = "::"
TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")


def arrow_bytes() -> int:
    """The size above which a JSONL/CSV/TSV file is held in Arrow (``PELT_ARROW_BYTES``, default 64 MiB)."""
    value = os.environ.get("PELT_ARROW_BYTES", "")
    return int(value) if value.isdigit() else ARROW_BYTES


def tokenize_rows() -> int:
    """Rows above which text is tokenized per batch unless a token cache exists (``PELT_TOKENIZE_ROWS``, default
    500,000: about a minute of tokenizing on two cores before the first step)."""
    value = os.environ.get("PELT_TOKENIZE_ROWS", "")
    return int(value) if value.isdigit() else TOKENIZE_ROWS


def release_mapped() -> int:
    """Drop this process's pages of memory-mapped Arrow files (read-only mappings of ``*.arrow`` files, found in
    ``/proc/self/maps``) with ``madvise(MADV_DONTNEED)``: RSS falls, the pages stay in the page cache and are read
    again from it when next touched. Returns the bytes of the mappings released (0 where not Linux)."""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    madvise = _madvise()
    done = 0
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            # read-only file mappings only: never anonymous or writable memory, whose contents DONTNEED would lose
            if len(fields) == 6 and fields[1][:2] == "r-" and fields[5].endswith(".arrow"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if madvise(lo, hi - lo, mmap.MADV_DONTNEED) == 0:
                    done += hi - lo
    return done


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise(addr, length, advice)``, loaded once."""
    import ctypes

    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


class _Mapped:
    """The process's resident file-backed bytes just after the last :func:`release_mapped` (None: not yet read)."""

    base: int | None = None


def resident_file_bytes() -> int:
    """The process's resident file-backed (and shared) memory: ``/proc/self/statm``'s third field (0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return 0


def bound_mapped() -> None:
    """Called as mapped data is read: once the resident file pages have grown :data:`RELEASE_BYTES` since the last
    release, release them (:func:`release_mapped`). Measured rather than counted: a fault maps the neighbouring
    cached pages too (fault-around, and the whole of a large page-cache folio: a row read far from the last was
    measured to map about 1 MB on Linux 6.18), far more than the bytes read."""
    now = resident_file_bytes()
    if _Mapped.base is None or now < _Mapped.base:
        _Mapped.base = now
    elif now - _Mapped.base >= RELEASE_BYTES:
        release_mapped()
        _Mapped.base = resident_file_bytes()


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
            rows = _rows_of(batch)
            bound_mapped()
            yield from rows

    def take(self, indices: Sequence[int]) -> list[dict]:
        """The rows at ``indices``, as dicts of the data columns (one Arrow read)."""
        rows = _rows_of(self.ds[[int(i) for i in indices]])
        bound_mapped()
        return rows

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

        kind = self.arrow_type(column)
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        start = 0
        for part in self._slices(column):  # a slice at a time: a trimmed copy of a whole column doubles the data
            bad = pc.is_null(part)
            if text:
                bad = pc.or_kleene(bad, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(part)), 0))
            found = pc.index(pc.fill_null(bad, True), True).as_py()
            if found >= 0:
                return start + found
            start += len(part)
        return None

    def counts(self, column: str) -> dict[str, int]:
        """How many rows hold each value of ``column`` (Arrow compute; nothing read into Python rows)."""
        import pyarrow.compute as pc

        total: dict[str, int] = {}
        for part in self._slices(column):
            for d in pc.value_counts(part).to_pylist():
                total[str(d["values"])] = total.get(str(d["values"]), 0) + int(d["counts"])
        return total

    def codes(self, column: str, values: list[str]) -> Any:
        """``column`` as int64 indices into ``values`` (numpy; -1 where a value is not among them)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        value_set = pa.array(values, pa.string())
        out = np.empty(len(self), dtype="int64")
        start = 0
        for part in self._slices(column):
            idx = pc.fill_null(pc.index_in(part, value_set=value_set), -1)
            out[start : start + len(part)] = idx.to_numpy(zero_copy_only=False)
            start += len(part)
        return out

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
        ``max_length``) in place of the text, computed once and cached beside the data under a key of the data,
        the tokenizer and the settings. Above :func:`tokenize_rows` rows with no cache yet: these rows themselves,
        for the caller to tokenize per batch through :meth:`token_writer` (a short run on a large file does not
        wait for all of it; a full epoch leaves the cache)."""

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = [batch[c] for c in columns]
            return dict(tokenizer(*texts, truncation=True, max_length=max_length))

        key = ("tokens", _tokenizer_key(tokenizer), columns, max_length)
        if not self._cache_path(key).is_file():
            written = self._cache_path(key).with_suffix(BATCHES_SUFFIX)
            if written.is_file() and (ordered := _in_row_order(written, self.where, len(self))) is not None:
                return ordered
            if len(self) > tokenize_rows():
                return self
        cached = self._cached_map(encode, key, remove=list(columns), batch_rows=4096)  # the ids replace the text
        return ArrowRows(cached, self.where)

    def token_writer(self, tokenizer: Any, columns: tuple[str, ...], max_length: int) -> TokenWriter:
        """A :class:`TokenWriter` that tokenizes these rows per batch and leaves the cache :meth:`tokenized` reads."""
        key = ("tokens", _tokenizer_key(tokenizer), columns, max_length)
        path = self._cache_path(key).with_suffix(BATCHES_SUFFIX)
        path.parent.mkdir(parents=True, exist_ok=True)
        return TokenWriter(
            self, lambda *texts: tokenizer(*texts, truncation=True, max_length=max_length), columns, path
        )

    def _cache_path(self, key: tuple) -> Path:
        """``cache_dir()/<kind>/<hash>.arrow``, the hash of the data's fingerprint and ``key``."""
        digest = hashlib.sha256(repr((self.ds._fingerprint, key)).encode()).hexdigest()[:24]
        return cache_dir() / key[0] / f"{digest}.arrow"

    def _cached_map(
        self, fn: Any, key: tuple, features: Any = None, remove: list[str] | None = None, batch_rows: int = WRITE_ROWS
    ) -> Any:
        """``ds.map(fn, batched=True)`` written once to :meth:`_cache_path` (record batches of ``batch_rows``) and
        reused while the data and ``key`` are unchanged; the mapped pages it reads are released as it goes."""
        cache = self._cache_path(key)
        cache.parent.mkdir(parents=True, exist_ok=True)

        def releasing(batch: dict[str, list]) -> dict[str, list]:
            bound_mapped()
            return fn(batch)

        return self.ds.map(
            releasing,
            batched=True,
            features=features,
            remove_columns=remove,
            cache_file_name=str(cache),
            new_fingerprint=cache.stem,
            batch_size=batch_rows,
            writer_batch_size=batch_rows,
            desc=f"{key[0]} of {self.where}",
        )

    def _slices(self, column: str, rows: int = 1 << 16) -> Iterator[Any]:
        """``column`` as pyarrow arrays of up to ``rows`` rows, in row order (through the indices mapping when there
        is one), the mapped pages read released as they add up (see :func:`bound_mapped`)."""
        if self.ds._indices is None:
            for chunk in self.ds.data.column(column).chunks:
                for i in range(0, len(chunk), rows):
                    part = chunk.slice(i, rows)
                    yield part
                    bound_mapped()
            return
        one = self.ds.select_columns([column]).with_format("arrow")
        for i in range(0, len(one), rows):
            part = one[i : i + rows].column(column).combine_chunks()
            yield part
            bound_mapped()


class TokenWriter:
    """Rows tokenized per batch as training reads them, each row also written (once) to a cache file in the order
    the rows came, with its index in a ``__row__`` column. Once every row is in it (after an epoch on one process),
    the file is committed under its name (``atomic_file``), :attr:`cached` holds it in row order, and later runs
    and epochs read it (:meth:`ArrowRows.tokenized`). Unfinished (a short run, a shard of a distributed run), the
    file is removed when the writer goes or the process ends.

    Args:
        rows: the text rows.
        encode: the tokenizer call (texts of each column → ``{key: [ids per row]}``, unpadded).
        columns: the text columns the token ids replace.
        path: the cache file to commit.
    """

    def __init__(self, rows: ArrowRows, encode: Any, columns: tuple[str, ...], path: Path) -> None:
        import weakref

        import numpy as np

        from pelt_cli.io.atomic import clean_stale_temps, temp_sibling

        self.encode, self.columns, self.path, self.where = encode, columns, path, rows.where
        self.done = np.zeros(len(rows), dtype=bool)
        self.order = np.empty(len(rows), dtype="int64")  # the rows' indices in the order written
        self.count = 0
        self.pending: list[dict] = []
        self.cached: ArrowRows | None = None
        clean_stale_temps(path)  # partial files of processes that no longer run
        self._tmp = temp_sibling(path)
        self._out: dict[str, Any] = {}
        self._discard = weakref.finalize(self, _discard_partial, self._out, self._tmp)

    def __call__(self, indices: Sequence[int], rows: list[dict]) -> list[dict]:
        """The rows at ``indices`` with their token ids in place of the text (rows not yet written are kept)."""
        enc = self.encode(*([r[c] for r in rows] for c in self.columns))
        out = [
            {**{k: v for k, v in r.items() if k not in self.columns}, **{k: enc[k][j] for k in enc}}
            for j, r in enumerate(rows)
        ]
        for i, r in zip(indices, out, strict=True):
            if not self.done[int(i)]:
                self.done[int(i)] = True
                self.order[self.count] = int(i)
                self.count += 1
                self.pending.append(r)
        complete = self.count == len(self.done)
        if len(self.pending) >= WRITE_ROWS or (complete and self.pending):
            self._flush()
        if complete and "writer" in self._out:
            self._commit()
        return out

    def _flush(self) -> None:
        """Append the pending rows to the file (a record batch of them with their indices)."""
        import pyarrow as pa

        rows, self.pending = self.pending, []
        cols = {ROW: pa.array(self.order[self.count - len(rows) : self.count])}
        for k in rows[0]:
            values = [r[k] for r in rows]
            cols[k] = pa.array(values, pa.list_(pa.int32())) if isinstance(values[0], list) else pa.array(values)
        table = pa.table(cols)
        if "writer" not in self._out:
            self._out["sink"] = pa.OSFile(str(self._tmp), "wb")
            self._out["writer"] = pa.ipc.new_stream(self._out["sink"], table.schema)
        self._out["writer"].write_table(table)

    def _commit(self) -> None:
        """Close the file, rename it into place and open it in row order."""
        from pelt_cli.io.atomic import atomic_file

        self._out.pop("writer").close()
        self._out.pop("sink").close()
        with atomic_file(self.path) as tmp:
            os.replace(self._tmp, tmp)  # the same name (temp_sibling) today: then a no-op
        self._discard.detach()
        self.cached = _in_row_order(self.path, self.where, len(self.done))


def _discard_partial(out: dict[str, Any], tmp: Path) -> None:
    """Close and remove an unfinished :class:`TokenWriter` file."""
    for key in ("writer", "sink"):
        if key in out:
            out.pop(key).close()
    tmp.unlink(missing_ok=True)


def _in_row_order(path: Path, where: str, n: int) -> ArrowRows | None:
    """A cache a :class:`TokenWriter` committed, as rows in the data's order (an indices mapping from its
    ``__row__`` column; nothing rewritten); None unless it holds each of the ``n`` rows once."""
    import numpy as np
    from datasets import Dataset

    ds = Dataset.from_file(str(path))
    if len(ds) != n or ROW not in ds.column_names:
        return None
    pos = np.full(n, -1, dtype="int64")
    start = 0
    for chunk in ds.data.column(ROW).chunks:
        pos[chunk.to_numpy()] = np.arange(start, start + len(chunk))
        start += len(chunk)
        bound_mapped()
    if (pos < 0).any():
        return None
    return ArrowRows(ds.remove_columns([ROW]).select(pos, keep_in_memory=True), where)


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
            rows = ArrowRows(_from_disk(p, split), str(arg))
        elif p.is_file():
            rows = ArrowRows(_from_file(p), str(p))
        else:
            rows = ArrowRows(_from_cache(source, split), str(arg))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many types for a malformed source
        raise DataError(f"{arg}: cannot read it as a dataset ({type(e).__name__}: {_first_line(e)})") from None
    bound_mapped()  # opening read a header page (and the kernel its neighbours) of every record batch
    return rows


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

    key = f"{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{WRITE_ROWS}"
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
        # record batches of WRITE_ROWS rows: opening the file touches a page of each (and the kernel maps 64 KiB
        # around it), so datasets' 1,000-row default would map ~600 MB of a 2 GB file just to open it
        return Dataset.from_generator(
            gen, gen_kwargs=kwargs, features=features, cache_dir=str(cache), writer_batch_size=WRITE_ROWS
        )
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
