"""Data at scale, memory and the first step (pelt_cli/datasource.py): whole-file passes and an epoch of batches over
a memory-mapped Arrow file keep the process's peak RSS within a small budget (the mapped pages are released as they
add up), and above the row threshold text is tokenized per batch with the same batches as the in-memory reader."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import pelt_main

import pelt_cli.datasource as datasource
from pelt_cli.data import Batcher, class_balance, label_codes, load_data
from pelt_cli.datasource import ArrowRows, cache_dir, release_mapped, take_rows

ROWS = 150_000  # about 38 MB of JSONL, 36 MB of Arrow


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 38 MB JSONL file of distinct rows and the pelt cache it was converted into."""
    d = tmp_path_factory.mktemp("big")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    with open(d / "big.jsonl", "w") as f:
        for i in range(ROWS):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(30, 50)))
            f.write(json.dumps({"text": f"{i} {text}", "label": "abc"[i % 3]}) + "\n")
    return d / "big.jsonl", d / "xdg"


@pytest.fixture
def arrow_env(big: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(big[1]))
    monkeypatch.setenv("PELT_ARROW_BYTES", "0")
    return big[0]


def status(key: str) -> int:
    """A ``/proc/self/status`` memory line in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def peak_growth(fn: Callable[[], object]) -> int:
    """How far the process's peak RSS (``VmHWM``, which counts mapped file pages) rose above its RSS while ``fn``
    ran (the peak is reset first through ``/proc/self/clear_refs``)."""
    release_mapped()
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


def arrow_bytes(td: object) -> int:
    return sum(Path(f["filename"]).stat().st_size for f in td.rows.ds.cache_files)  # type: ignore[attr-defined]


def test_whole_file_passes_stay_within_the_release_budget(arrow_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    td = load_data(arrow_env)  # converted once (cold); the passes below read the memory-mapped copy
    size = arrow_bytes(td)
    assert size > 30e6 and len(td.rows) == ROWS and td.rows.ds.data.table.num_rows == ROWS
    assert len(td.rows.ds.data.table.to_batches()) == 10  # record batches of 16,384 rows: opening touches few pages

    def passes() -> None:
        again = load_data(arrow_env, labels=["a", "b", "c"])  # blank/null checks of each column, label codes
        assert class_balance(again)["counts"] == {"a": 50_000, "b": 50_000, "c": 50_000}
        assert int(label_codes(again).sum()) == 150_000  # 50,000 × (0 + 1 + 2)
        assert sum(1 for _ in again.rows) == ROWS  # a sequential pass over the rows

    monkeypatch.setattr(datasource, "RELEASE_BYTES", 1 << 60)  # never released: the pages stay in RSS
    kept = peak_growth(passes)
    monkeypatch.setattr(datasource, "RELEASE_BYTES", 4 * 2**20)
    released = peak_growth(passes)
    assert kept > 0.8 * size, (kept, size)  # the measure sees the mapped pages
    assert released < 12e6, (released, kept, size)  # 4 MiB between releases, a record batch (4 MB), Python rows


def test_an_epoch_of_shuffled_batches_stays_within_the_release_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    n, f = 16_000, tmp_path / "epoch.arrow"  # 96 MB: rows of 6 kB, written as datasets writes (IPC stream)
    rng = np.random.default_rng(0)
    with pa.OSFile(str(f), "wb") as out, pa.ipc.new_stream(out, pa.schema([("text", pa.string())])) as w:
        for s in range(0, n, 4000):
            letters = rng.integers(97, 123, size=(4000, 6000), dtype=np.uint8)
            w.write_batch(
                pa.record_batch(
                    [pa.array([f"{s + i} {r.tobytes().decode()}" for i, r in enumerate(letters)])], ["text"]
                )
            )
    rows = ArrowRows(Dataset.from_file(str(f)), str(f))
    order = rng.permutation(n)

    def epoch() -> None:
        for b in range(0, n, 8):
            batch = take_rows(rows, order[b : b + 8])
            assert batch[-1]["text"][:8].split()[0] == str(order[min(b + 7, n - 1)])

    monkeypatch.setattr(datasource, "RELEASE_BYTES", 1 << 60)
    kept = peak_growth(epoch)
    monkeypatch.setattr(datasource, "RELEASE_BYTES", 4 * 2**20)
    released = peak_growth(epoch)
    assert kept > 0.8 * f.stat().st_size, kept
    # 4 MiB between releases plus one batch: a row read maps the page-cache folios holding it (up to 2 MiB each,
    # a row across two: 8 rows up to 34 MB; measured 19-21 MB) and its Python rows
    assert released < 40e6, (released, kept)


def test_release_keeps_the_data_readable(arrow_env: Path) -> None:
    td = load_data(arrow_env)
    first = td.rows.take([0, 77_777, ROWS - 1])
    assert release_mapped() >= arrow_bytes(td)  # the file's whole mapping
    assert td.rows.take([0, 77_777, ROWS - 1]) == first and first[1]["text"].startswith("77777 ")
    assert td.rows.line(77_777) == f"{arrow_env}:77778"


def test_above_the_row_threshold_batches_are_tokenized_per_batch_and_an_epoch_leaves_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path
) -> None:
    import gc

    from transformers import AutoTokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    f = tmp_path / "d.jsonl"
    f.write_text(
        "".join(json.dumps({"text": f"film {i} " * (i % 7 + 1), "label": "xy"[i % 2]}) + "\n" for i in range(41))
    )
    small = Batcher(load_data(f), tokenizer=tok, max_length=9)
    expected = list(small.batches(8, seed=3, epoch=1))
    monkeypatch.setenv("PELT_ARROW_BYTES", "0")
    monkeypatch.setenv("PELT_TOKENIZE_ROWS", "40")  # 41 rows: above it
    tokens = cache_dir() / "tokens"

    def same(batches: object) -> None:
        got = list(batches)  # type: ignore[call-overload]
        assert len(got) == len(expected) == 6
        for a, b in zip(expected, got, strict=True):
            assert a.keys() == b.keys() == {"input_ids", "token_type_ids", "attention_mask", "labels"}
            assert all(torch.equal(a[k], b[k]) for k in a)

    short = Batcher(load_data(f), tokenizer=tok, max_length=9)
    assert short._writer is not None and "text" in short._source.columns
    assert [p.name for p in tokens.iterdir()] == []  # nothing tokenized before the first batch
    monkeypatch.setattr(datasource, "WRITE_ROWS", 8)  # a record batch every 8 rows
    first = next(short.batches(8, seed=3, epoch=1))  # a run that stops early: its partial file goes with it
    assert all(torch.equal(first[k], expected[0][k]) for k in first) and short._writer.count == 8
    assert [p.name.split(".pelt-tmp-")[0] for p in tokens.iterdir()] == [f".{short._writer.path.name}"]
    del short, first
    gc.collect()
    assert list(tokens.iterdir()) == []
    monkeypatch.setattr(datasource, "WRITE_ROWS", 16)  # the epoch below: two record batches and a last one of 9

    lazy = Batcher(load_data(f), tokenizer=tok, max_length=9)
    same(lazy.batches(8, seed=3, epoch=1))  # per batch, as the in-memory reader makes them
    assert lazy._writer is None and lazy._source.columns == ["label", "input_ids", "token_type_ids", "attention_mask"]
    written = sorted(tokens.iterdir())
    assert [p.suffixes for p in written] == [[".batches", ".arrow"]]  # the epoch left the cache, no temporary
    same(lazy.batches(8, seed=3, epoch=1))  # the next epoch reads it
    again = Batcher(load_data(f), tokenizer=tok, max_length=9)  # and so does the next run
    assert again._writer is None and again._source.ds.cache_files[0]["filename"] == str(written[0])
    same(again.batches(8, seed=3, epoch=1))
    assert [len(b) for b in again._source.ds.data.table.to_batches()] == [16, 16, 9]
    assert sorted(tokens.iterdir()) == written

    monkeypatch.setenv("PELT_TOKENIZE_ROWS", "41")  # at the threshold: tokenized at once, for another length
    cached = Batcher(load_data(f), tokenizer=tok, max_length=8)
    assert cached._writer is None and cached._source.columns == [
        "label",
        "input_ids",
        "token_type_ids",
        "attention_mask",
    ]
    assert len(sorted(tokens.glob("*.arrow"))) == 2
    monkeypatch.setenv("PELT_TOKENIZE_ROWS", "0")  # above it again, but that cache exists: used
    reused = Batcher(load_data(f), tokenizer=tok, max_length=8)
    assert reused._writer is None and reused._source.ds.cache_files == cached._source.ds.cache_files


def test_train_on_a_large_file_tokenizes_per_batch_and_caches_after_an_epoch(tmp_path: Path, tiny_bert: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        "".join(
            json.dumps({"text": f"good film {i}" if i % 2 else f"bad film {i}", "label": "np"[i % 2]}) + "\n"
            for i in range(60)
        )
    )
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PELT_ARROW_BYTES": "0", "PELT_TOKENIZE_ROWS": "10"}
    out = tmp_path / "run"
    assert pelt_main("apply", "lora", str(tiny_bert), "-o", str(out), env=env).returncode == 0
    r = pelt_main("train", str(out), "--data", str(f), "--epochs", "2", "--batch-size", "8", "-q", env=env)
    assert r.returncode == 0, r.stderr
    training = json.loads((out / "run.json").read_text())["training"]
    assert training["train_rows"] == 54 and training["eval_rows"] == 6  # 10% held out, by label
    tokens = sorted((tmp_path / "xdg" / "pelt" / "arrow" / "tokens").iterdir())
    # the train set's 54 rows: per batch, cached after epoch 1; the eval set's 6 (under 10): all at once
    assert sorted(p.name.split(".", 1)[1] for p in tokens) == ["arrow", "batches.arrow"]
