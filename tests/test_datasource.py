"""Data at scale (pelt_cli/datasource.py): large JSONL/CSV/TSV files, Parquet, saved datasets and cached dataset
names held in Arrow give the same rows, labels, splits and batches as the in-memory reader, keep its file:line
messages, and cache their tokenization."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import pelt_main

from pelt_cli.data import Batcher, class_balance, load_data, resolve_data, split
from pelt_cli.datasource import ArrowRows, cache_dir
from pelt_cli.errors import DataError


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def rows(n: int) -> list[dict]:
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    return [{"text": f"{words[i % 6]} film number {i}", "label": ["neg", "pos", "mid"][i % 3]} for i in range(n)]


def jsonl(path: Path, items: list[dict], blank_every: int = 0) -> Path:
    lines = []
    for i, r in enumerate(items):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def arrow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PELT_ARROW_BYTES", "0")


def test_large_jsonl_matches_the_in_memory_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = jsonl(tmp_path / "d.jsonl", rows(50), blank_every=7)
    small = load_data(f)
    arrow(monkeypatch)
    big = load_data(f)
    assert isinstance(big.rows, ArrowRows) and not isinstance(small.rows, ArrowRows)
    assert big.task == small.task == "text-classification" and big.labels == small.labels == ["mid", "neg", "pos"]
    assert list(big.rows) == small.rows and len(big.rows) == 50
    assert class_balance(big) == class_balance(small)
    for a, b in zip(split(big, 0.2, 3), split(small, 0.2, 3), strict=True):
        assert list(a.rows) == b.rows
    tr_big, _ = split(big, 0.2, 3)
    assert isinstance(tr_big.rows, ArrowRows) and len(tr_big.rows) == 41  # 3 of each class (17, 17, 16) held out


def test_batches_from_cached_tokens_equal_the_in_memory_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_bert: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    f = jsonl(tmp_path / "d.jsonl", rows(37))
    small = Batcher(load_data(f), tokenizer=tok, max_length=6)
    arrow(monkeypatch)
    big = Batcher(load_data(f), tokenizer=tok, max_length=6)
    caches = sorted((cache_dir() / "tokens").glob("*.arrow"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    for b_small, b_big in zip(small.batches(8, seed=1, epoch=2), big.batches(8, seed=1, epoch=2), strict=True):
        assert b_small.keys() == b_big.keys()
        for k in b_small:
            assert torch.equal(b_small[k], b_big[k]), k
    again = Batcher(load_data(f), tokenizer=tok, max_length=6)  # the tokenization is reused, not redone
    assert sorted((cache_dir() / "tokens").glob("*.arrow")) == caches and caches[0].stat().st_mtime_ns == stamp
    assert again._source.ds.cache_files[0]["filename"] == str(caches[0])


def test_errors_keep_file_and_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrow(monkeypatch)
    good = [json.dumps(r) for r in rows(6)]

    def err(lines: list[str], **kw: object) -> str:
        f = tmp_path / f"e{len(list(tmp_path.iterdir()))}.jsonl"
        f.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError) as e:
            load_data(f, **kw)
        return e.value.message.replace(str(f), "F")

    assert err([*good[:4], "{bad", *good[4:]]).startswith("F:5: bad JSON")
    assert err([*good[:2], "", json.dumps({"text": "x", "label": None})]) == (
        "F:4: column 'label' is missing or empty; expected a class name"
    )
    assert err([*good[:3], json.dumps({"text": "  ", "label": "pos"})]).startswith("F:4: column 'text' is missing")
    assert err([*good, json.dumps({"text": "x", "label": "other"})], labels=["mid", "neg", "pos"]).startswith(
        "F:7: label 'other' is not one of the training labels (mid, neg, pos)"
    )
    assert "needs column(s) text_a, text_b" in err(good, task="pair-classification")


def test_parquet_with_integer_labels(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(9)], "label": [i % 2 for i in range(9)]}), f)
    td = load_data(f)
    assert td.task == "text-classification" and td.labels == ["0", "1"] and len(td.rows) == 9
    assert td.rows[3] == {"text": "t3", "label": "1"}
    with pytest.raises(DataError, match=r"d.parquet: row 2: column 'text' is missing or empty"):
        pq.write_table(pa.table({"text": ["a", None], "label": [0, 1]}), f)
        load_data(f)


def test_saved_dataset_dict_gives_train_and_eval_splits(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    dd = DatasetDict(
        train=Dataset.from_dict({"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]}, feats),
        validation=Dataset.from_dict({"text": ["v0", "v1", "v2"], "label": [1, 0, 1]}, feats),
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "saved").rglob("*") if p.is_file())
    train, ev = resolve_data(str(tmp_path / "saved"))
    assert ev == Path(f"{tmp_path / 'saved'}::validation")
    td, ed = load_data(train), load_data(ev)
    assert td.labels == ["neg", "pos"] and len(td.rows) == 10 and ed.rows[0] == {"text": "v0", "label": "pos"}
    with pytest.raises(DataError, match=r"no split 'test'; expected one of train, validation"):
        load_data(f"{tmp_path / 'saved'}::test")
    a, b = split(td, 0.3, 0)  # label strings and a split: computed in pelt's cache, never beside the input
    assert len(a.rows) + len(b.rows) == 10 and class_balance(a)["counts"] == {"neg": 3, "pos": 3}
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "saved").rglob("*") if p.is_file()) == before


def cached_dataset(home: Path, name: str, items: dict[str, list[dict]]) -> None:
    """Put ``owner/name`` into the datasets cache under ``home`` as a download would leave it (built offline from
    local JSON files with the json builder, then filed under the dataset's name)."""
    import subprocess
    import sys

    src = home / "src"
    src.mkdir(parents=True)
    files = {k: str(jsonl(src / f"{k}.jsonl", v)) for k, v in items.items()}
    code = (
        "import json, os, sys\nfrom pathlib import Path\nimport datasets\n"
        "datasets.load_dataset('json', data_files=json.loads(sys.argv[1]))\n"
        "cache = Path(datasets.config.HF_DATASETS_CACHE)\nowner, name = sys.argv[2].split('/')\n"
        "cfg = next((cache / 'json').iterdir())\nos.rename(cfg, cache / 'json' / 'default')\n"
        "for f in (cache / 'json').rglob('json-*.arrow'):\n"
        "    os.rename(f, f.with_name(f.name.replace('json-', name + '-')))\n"
        "os.rename(cache / 'json', cache / f'{owner}___{name}')\n"
    )
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code, json.dumps(files), name], env=env, check=True, capture_output=True)


def test_a_dataset_name_from_the_local_cache(tmp_path: Path, tiny_bert: Path) -> None:
    home = tmp_path / "hf"
    cached_dataset(home, "someone/tiny-sst", {"train": rows(24), "validation": rows(6)})
    env = {"HF_HOME": str(home), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = tmp_path / "run"
    assert pelt_main("apply", "lora", str(tiny_bert), "-o", str(out), env=env).returncode == 0
    r = pelt_main("train", str(out), "--data", "someone/tiny-sst", "--epochs", "1", "-q", env=env)
    assert r.returncode == 0, r.stderr
    training = json.loads((out / "run.json").read_text())["training"]
    assert training["train_rows"] == 24 and training["eval_rows"] == 6
    assert training["eval"] == "someone/tiny-sst::validation"
    r = pelt_main("train", str(out), "--data", "nobody/absent", "--epochs", "1", env=env)
    assert r.returncode == 2 and "not a dataset in the local Hugging Face cache" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
