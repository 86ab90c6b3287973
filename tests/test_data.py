"""pelt_cli.data: file formats, task inference, validation errors, batching, audio features, built-in datasets."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures_audio import synth_audio_classes, synth_audio_pairs

from pelt_cli import data as D
from pelt_cli.errors import DataError, PeltError

TEXT = [
    ('a fine, "sunny" day', "pos"),
    ("rain again", "neg"),
    ("it's ok", "neutral"),
    ("great", "pos"),
    ("lovely weather for ducks", "pos"),
]
PAIRS = [("the cat sat", "a cat was sitting", "1"), ("stocks fell", "it rained", "0"), ("he left", "he went", "1")]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    """Write ``rows`` as JSONL, CSV (quoted where needed) or TSV (unquoted, GLUE-style)."""
    path = path.with_suffix("." + fmt)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("\t".join(rows[0]) + "\n" + "".join("\t".join(r.values()) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def librosa_warm(tmp_path_factory: pytest.TempPathFactory) -> None:
    """librosa's first load compiles with numba: pay it once per session."""
    p = tmp_path_factory.mktemp("warm") / "warm.wav"
    sf.write(p, np.zeros(1600, dtype=np.float32), 16000)
    D.load_audio(p)


@pytest.fixture(scope="session")
def bert_tok(minilm: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm))


@pytest.fixture()
def gpt_tok():
    """A tiny byte-level BPE tokenizer (GPT-2 style: no pad token), trained offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([t for t, _ in TEXT] * 5, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_audio_model():
    import tiny_models

    return tiny_models.build("qwen2_audio").eval()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, librosa_warm: None) -> Path:
    return synth_audio_pairs(tmp_path_factory.mktemp("pairs"), 4, seed=1)


# --- formats and task inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_text_classification_every_format(tmp_path: Path, fmt: str) -> None:
    rows = [{"id": str(i), "text": t, "label": lab} for i, (t, lab) in enumerate(TEXT)]
    td = D.load_data(write(tmp_path / "train", rows, fmt))
    assert td.task == "text-classification"
    assert [r["text"] for r in td.rows] == [t for t, _ in TEXT]  # quotes and commas survive every format
    assert td.labels == ["neg", "neutral", "pos"]
    assert D.label_mapping(td) == {"neg": 0, "neutral": 1, "pos": 2}
    bal = D.class_balance(td)
    assert bal["counts"] == {"neg": 1, "neutral": 1, "pos": 3}
    assert bal["imbalance"] == 3.0 and bal["majority_baseline"] == 0.6 and bal["missing"] == []


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_pair_and_causal_lm_every_format(tmp_path: Path, fmt: str) -> None:
    pair = D.load_data(write(tmp_path / "pairs", [{"text_a": a, "text_b": b, "label": y} for a, b, y in PAIRS], fmt))
    assert pair.task == "pair-classification" and len(pair.rows) == 3
    assert pair.labels == ["0", "1"] and [r["label"] for r in pair.rows] == ["1", "0", "1"]
    assert pair.rows[1] == {"text_a": "stocks fell", "text_b": "it rained", "label": "0"}
    lm = D.load_data(write(tmp_path / "lm", [{"text": t} for t, _ in TEXT], fmt))
    assert lm.task == "causal-lm" and len(lm.rows) == 5 and lm.labels is None
    assert D.label_mapping(lm) == {} and D.class_balance(lm)["imbalance"] is None
    forced = D.load_data(write(tmp_path / "tc", [{"text": t, "label": y} for t, y in TEXT], fmt), task="causal-lm")
    assert forced.task == "causal-lm" and forced.labels is None and set(forced.rows[0]) == {"text"}


def test_infer_task_and_labels() -> None:
    assert D.infer_task({"text", "label"}) == "text-classification"
    assert D.infer_task({"text_a", "text_b", "label", "idx"}) == "pair-classification"
    assert D.infer_task({"text"}) == "causal-lm"
    assert D.infer_task({"audio", "label"}) == "audio-classification"
    assert D.infer_task({"source", "reference", "speaker"}) == "domain-matching"
    with pytest.raises(DataError) as e:
        D.infer_task({"sentence", "tag"})
    for expected in ("sentence, tag", "text+label", "text_a+text_b+label", "audio+label", "source+reference"):
        assert expected in str(e.value)


def test_integer_labels_sort_numerically_and_json_ints(tmp_path: Path) -> None:
    td = D.load_data(
        write(tmp_path / "n", [{"text": f"t{i}", "label": y} for i, y in enumerate([10, 2, 0, 1, 2])], "jsonl")
    )
    assert td.labels == ["0", "1", "2", "10"] and [r["label"] for r in td.rows] == ["10", "2", "0", "1", "2"]


def test_read_rows_json_array_and_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert D.read_rows(tmp_path / "a.json") == [{"text": "x"}, {"text": "y"}]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y"}\n')
    assert len(D.read_rows(tmp_path / "b.jsonl")) == 2


# --- bad inputs -------------------------------------------------------------------------------------------------


def err(path: Path, **kw) -> str:
    with pytest.raises(DataError) as e:
        D.load_data(path, **kw)
    assert isinstance(e.value, PeltError) and e.value.exit_code == 2
    return str(e.value)


BAD_FILES = {  # file name: (its text, what the error says)
    "miss.jsonl": (
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c"}\n',
        ["miss.jsonl:3", "'label'", "missing"],
    ),
    "empty.csv": ('text,label\nok,a\n"fine, really",b\n  ,a\n', ["empty.csv:4", "'text'", "empty"]),
    "bad.jsonl": ('{"text": "a"}\n{"text": "b",}\n', ["bad.jsonl:2: bad JSON"]),
    "type.jsonl": ('{"text": "a"}\n{"text": 5}\n', ["type.jsonl:2", "'text'", "int"]),
    "wide.tsv": ("text\tlabel\na\tb\nc\td\te\n", ["wide.tsv:3: 3 fields but the header has 2"]),
    "zero.jsonl": ("\n \n", ["zero.jsonl: the file is empty"]),
    "head.csv": ("text,label\n", ["head.csv: no data rows"]),
}


def test_errors_name_file_line_and_column(tmp_path: Path) -> None:
    for name, (text, says) in BAD_FILES.items():
        (tmp_path / name).write_text(text)
        msg = err(tmp_path / name)
        for part in says:
            assert part in msg, (name, msg)
    (tmp_path / "unk.csv").write_text("hello world,positive\nbad day,negative\n")  # header row forgotten
    msg = err(tmp_path / "unk.csv")
    assert msg.startswith(str(tmp_path / "unk.csv")) and "hello world, positive" in msg and "text+label" in msg
    ok = write(tmp_path / "tc", [{"text": t, "label": y} for t, y in TEXT], "csv")
    msg = err(ok, task="pair-classification")
    assert "needs column(s) text_a, text_b" in msg and "found label, text" in msg
    assert "unknown task 'regression'" in err(ok, task="regression")
    assert "no such file" in err(tmp_path / "nope.csv")
    (tmp_path / "x.xlsx").write_text("x")
    assert "unknown data format '.xlsx'" in err(tmp_path / "x.xlsx")
    (tmp_path / "x.parquet").write_text("x")
    assert "x.parquet: cannot read it as a dataset (ArrowInvalid" in err(tmp_path / "x.parquet")


def test_eval_label_not_in_training_labels(tmp_path: Path) -> None:
    train = D.load_data(write(tmp_path / "train", [{"text": t, "label": y} for t, y in TEXT], "jsonl"))
    ev = write(
        tmp_path / "eval",
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "angry"}, {"text": "c", "label": "bored"}],
        "jsonl",
    )
    msg = err(ev, task=train.task, labels=train.labels)
    assert "eval.jsonl:2" in msg and "'angry'" in msg and "neg, neutral, pos" in msg and "1 more" in msg
    ok = D.load_data(write(tmp_path / "ok", [{"text": "a", "label": "pos"}], "jsonl"), labels=train.labels)
    assert ok.labels == train.labels
    assert D.class_balance(ok) == {
        "counts": {"neg": 0, "neutral": 0, "pos": 1},
        "imbalance": 1.0,
        "majority_baseline": 1.0,
        "missing": ["neg", "neutral"],
    }


def test_missing_audio_files_all_reported(tmp_path: Path) -> None:
    sub = tmp_path / "clips"
    sub.mkdir()
    sf.write(sub / "here.wav", np.zeros(160, dtype=np.float32), 16000)
    rows = [{"audio": "here.wav", "label": "a"}] + [{"audio": f"gone{i}.wav", "label": "b"} for i in range(7)]
    manifest = write(sub / "m", rows, "jsonl")
    msg = err(manifest)
    assert "7 audio file(s) do not exist" in msg and "and 2 more" in msg
    assert re.findall(r"m\.jsonl:(\d+) audio", msg) == ["2", "3", "4", "5", "6"]
    assert str(sub / "gone0.wav") in msg and "here.wav" not in msg
    td = D.load_data(write(sub / "one", rows[:1], "csv"))
    assert td.task == "audio-classification" and td.rows[0]["audio"] == str((sub / "here.wav").resolve())
    msg = err(write(tmp_path / "elsewhere", rows[:1], "jsonl"))  # relative to the manifest's own directory
    assert "1 audio file(s)" in msg and str(tmp_path / "here.wav") in msg
    assert D.load_data(tmp_path / "elsewhere.jsonl", base_dir=sub).rows[0]["audio"].endswith("clips/here.wav")


# --- split ------------------------------------------------------------------------------------------------------


def test_split_stratified_deterministic(tmp_path: Path) -> None:
    rows = [{"text": f"w{i}", "label": "a" if i % 4 else "b"} for i in range(40)]  # 30 a, 10 b
    td = D.TaskData("text-classification", rows, ["a", "b"], "x")
    tr, ev = D.split(td, 0.2, seed=1)
    assert D.class_balance(ev)["counts"] == {"a": 6, "b": 2} and len(tr.rows) == 32
    assert {r["text"] for r in tr.rows}.isdisjoint(r["text"] for r in ev.rows)
    assert [r["text"] for r in tr.rows] == sorted((r["text"] for r in tr.rows), key=lambda s: int(s[1:]))
    assert D.split(td, 0.2, seed=1)[1].rows == ev.rows and D.split(td, 0.2, seed=2)[1].rows != ev.rows
    with pytest.raises(DataError, match="between 0 and 1"):
        D.split(td, 1.0, 0)


# --- batches ----------------------------------------------------------------------------------------------------


def test_text_classification_batches(tmp_path: Path, bert_tok) -> None:
    td = D.load_data(write(tmp_path / "t", [{"text": t, "label": y} for t, y in TEXT], "jsonl"))
    b = D.Batcher(td, tokenizer=bert_tok, max_length=6)
    assert len(b) == 5 and b.n_batches(2) == 3 and b.n_batches(2, drop_last=True) == 2
    out = list(b.batches(2, shuffle=False))
    assert [x["input_ids"].shape[0] for x in out] == [2, 2, 1]
    first = out[0]
    assert first["input_ids"].shape[1] == 6  # "a fine, "sunny" day" truncated to max_length
    assert first["labels"].tolist() == [2, 0] and out[1]["labels"].tolist() == [1, 2]
    assert str(first["labels"].dtype) == "torch.int64"
    ids, mask = out[1]["input_ids"], out[1]["attention_mask"]  # "it's ok" (6 tokens) and "great" (3) → padding
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert ids[1, 3:].tolist() == [bert_tok.pad_token_id] * 3 and ids[1, 0].item() == bert_tok.cls_token_id


def test_pair_batches(tmp_path: Path, bert_tok) -> None:
    td = D.load_data(write(tmp_path / "p", [{"text_a": a, "text_b": b, "label": y} for a, b, y in PAIRS], "tsv"))
    batch = next(D.Batcher(td, tokenizer=bert_tok).batches(3, shuffle=False))
    assert batch["labels"].tolist() == [1, 0, 1]
    assert [(row == bert_tok.sep_token_id).sum().item() for row in batch["input_ids"]] == [2, 2, 2]
    first = batch["input_ids"][0][batch["attention_mask"][0] == 1]  # [CLS] the cat sat [SEP] a cat was sitting [SEP]
    assert batch["token_type_ids"][0][: len(first)].tolist() == [0] * 5 + [1] * (len(first) - 5)


def test_causal_lm_batches_mask_padding(tmp_path: Path, gpt_tok) -> None:
    td = D.load_data(write(tmp_path / "lm", [{"text": t} for t, _ in TEXT], "jsonl"))
    assert gpt_tok.pad_token is None
    b = D.Batcher(td, tokenizer=gpt_tok)
    assert gpt_tok.pad_token == "<|endoftext|>"
    batch = next(b.batches(5, shuffle=False))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (labels == -100).sum().item() == (mask == 0).sum().item() > 0
    assert torch_equal(labels[mask == 1], ids[mask == 1]) and (labels[mask == 0] == -100).all()
    assert (ids[mask == 0] == gpt_tok.pad_token_id).all()


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_order_determinism_and_sharding(tmp_path: Path, bert_tok) -> None:
    rows = [{"text": f"w{i}", "label": "a"} for i in range(11)]
    b = D.Batcher(D.TaskData("text-classification", rows, ["a"], "x"), tokenizer=bert_tok)
    assert b.order(False, 0) == list(range(11))
    e0 = b.order(True, seed=7, epoch=0)
    assert e0 == b.order(True, seed=7, epoch=0) and sorted(e0) == list(range(11))
    assert e0 != b.order(True, seed=7, epoch=1) and e0 != b.order(True, seed=8, epoch=0)
    r0, r1 = (b.order(True, 7, 0, rank=r, world_size=2) for r in (0, 1))
    assert len(r0) == len(r1) == 6 and set(r0) | set(r1) == set(range(11)) and len(set(r0) & set(r1)) == 1
    d0, d1 = (b.order(True, 7, 0, drop_last=True, rank=r, world_size=2) for r in (0, 1))
    assert len(d0) == len(d1) == 5 and not set(d0) & set(d1)
    n0, n1 = (len(list(b.batches(4, True, 7, 0, rank=r, world_size=2))) for r in (0, 1))
    assert n0 == n1 == b.n_batches(4, world_size=2) == 2
    b10 = D.Batcher(D.TaskData("text-classification", rows[:10], ["a"], "x"), tokenizer=bert_tok)
    s0, s1 = (b10.order(True, 3, 2, rank=r, world_size=2) for r in (0, 1))
    assert not set(s0) & set(s1) and set(s0) | set(s1) == set(range(10))
    texts = [[t.item() for t in x["input_ids"][:, 1]] for x in b10.batches(5, True, 3, 2)]
    assert texts == [[t.item() for t in x["input_ids"][:, 1]] for x in b10.batches(5, True, 3, 2)]
    with pytest.raises(DataError, match="rank 2"):
        b.order(True, 0, rank=2, world_size=2)


def test_batcher_needs_tokenizer_or_extractor(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a tokenizer"):
        D.Batcher(D.TaskData("causal-lm", [{"text": "x"}], None, "f.jsonl"))
    with pytest.raises(DataError, match="needs an audio feature extractor"):
        D.Batcher(D.TaskData("domain-matching", [{"source": "a", "reference": "b"}], None, "m.jsonl"))


# --- audio ------------------------------------------------------------------------------------------------------


def test_feature_extractor_for_configs(tiny_audio_model) -> None:
    import transformers as tf

    fe = D.feature_extractor_for(tiny_audio_model.config)
    assert (fe.feature_size, fe.nb_max_frames, fe.n_samples, fe.sampling_rate) == (16, 200, 32000, 16000)
    big = D.feature_extractor_for(tf.WhisperConfig())
    assert (big.feature_size, big.nb_max_frames, big.n_samples) == (80, 3000, 480000)
    assert D.feature_extractor_for(tf.Qwen2AudioConfig()).feature_size == 128
    odd = D.feature_extractor_for(tf.WhisperConfig(num_mel_bins=16, max_source_positions=75))
    x = odd(np.zeros(40000, dtype=np.float32), sampling_rate=16000, return_tensors="np")["input_features"]
    assert x.shape == (1, 16, 150)
    with pytest.raises(DataError, match="num_mel_bins"):
        D.feature_extractor_for(tf.BertConfig())


def test_domain_pairs_features(pairs: Path, tiny_audio_model, tmp_path: Path) -> None:
    import torch
    from scipy.signal import butter, sosfiltfilt

    td = D.load_data(pairs)
    assert td.task == "domain-matching" and len(td.rows) == 4 and td.labels is None
    ref = D.load_audio(td.rows[0]["reference"])
    assert ref.dtype == np.float32 and ref.shape == (32000,) and 0.49 < np.abs(ref).max() < 0.51
    sos = butter(4, [300, 1500], btype="bandpass", fs=16000, output="sos")
    corr = np.array(
        [
            [np.corrcoef(D.load_audio(r["source"]), ref_y)[0, 1] for ref_y in (sosfiltfilt(sos, y), y)]
            for r in td.rows
            for y in [D.load_audio(r["reference"])]
        ]
    )
    assert (corr[:, 0] > 0.85).all() and (corr[:, 0] - corr[:, 1]).max() > 0.2, corr  # source = band-passed ref
    fe = D.feature_extractor_for(tiny_audio_model.config)
    batch = next(D.Batcher(td, feature_extractor=fe).batches(4, shuffle=False))
    src, refs = batch["source_features"], batch["reference_features"]
    assert src.shape == refs.shape == (4, 16, 200) and src.dtype == torch.float32
    msd = ((src - refs) ** 2).mean(dim=(1, 2))
    assert (msd > 0.3).all(), msd  # the band-pass + noise shift is large in log-mel space
    again = synth_audio_pairs(tmp_path, 4, seed=1)  # same content → identical reference features
    other = next(D.Batcher(D.load_data(again), feature_extractor=fe).batches(4, shuffle=False))
    assert torch.equal(other["reference_features"], refs) and torch.equal(other["source_features"], src)
    different = synth_audio_pairs(tmp_path / "s2", 1, seed=2)
    assert D.load_audio(Path(different).parent / "ref_0000.wav").tolist() != ref.tolist()
    with torch.no_grad():
        hidden = tiny_audio_model.model.audio_tower(refs).last_hidden_state
    assert hidden.shape == (4, 50, 32) and torch.isfinite(hidden).all()


def test_audio_classification_batches(tmp_path: Path, tiny_audio_model, librosa_warm: None) -> None:
    td = D.load_data(synth_audio_classes(tmp_path, 3, seed=0))
    assert td.task == "audio-classification" and td.labels == ["high", "low"]
    fe = D.feature_extractor_for(tiny_audio_model.config)
    batch = next(D.Batcher(td, feature_extractor=fe).batches(6, shuffle=False))
    assert batch["input_features"].shape == (6, 16, 200) and batch["labels"].tolist() == [1, 1, 1, 0, 0, 0]
    peak_bin = batch["input_features"][:, :, :100].mean(dim=2).argmax(dim=1)  # the tone sits in the first second
    assert (peak_bin[:3] < 6).all() and (peak_bin[3:] >= 9).all(), peak_bin
    short = next(D.Batcher(td, feature_extractor=fe, audio_seconds=0.5).batches(1, shuffle=False))["input_features"]
    tail = short[0, :, 52:]  # 0.5 s = 50 frames; the rest is padding at the floor value
    assert (tail == tail.min()).all() and not (short[0, :, :48] == tail.min()).all()


def test_load_audio_resamples_and_names_bad_files(tmp_path: Path, librosa_warm: None) -> None:
    sf.write(tmp_path / "cd.wav", np.sin(np.arange(22050) / 10).astype(np.float32) * 0.3, 22050)
    assert D.load_audio(tmp_path / "cd.wav").shape == (16000,)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(DataError, match="junk.wav: cannot load audio"):
        D.load_audio(tmp_path / "junk.wav")


# --- built-in dataset -------------------------------------------------------------------------------------------


def lexicon_words() -> dict[str, float]:
    """The filter, written independently: the first entry of each lowercase word with |mean| ≥ 1."""
    lexicon = Path(importlib.util.find_spec("vaderSentiment").origin).parent / "vader_lexicon.txt"
    words: dict[str, float] = {}
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        word, mean = line.split("\t")[0], float(line.split("\t")[1])
        if re.fullmatch(r"[a-z]{2,}(['-][a-z]+)*", word) and word not in words:
            words[word] = mean
    return {w: m for w, m in words.items() if abs(m) >= 1.0}


def test_vader_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bert_tok) -> None:
    train, ev = D.builtin_dataset("vader", cache_dir=tmp_path)
    words = lexicon_words()
    assert len(words) == 5583 and sum(m > 0 for m in words.values()) == 2436
    a, b = D.load_data(train), D.load_data(ev)
    assert (len(a.rows), len(b.rows)) == (4746, 837) and a.labels == b.labels == ["negative", "positive"]
    assert D.class_balance(a)["counts"] == {"negative": 2675, "positive": 2071}
    assert D.class_balance(b)["counts"] == {"negative": 472, "positive": 365}
    both = a.rows + b.rows
    assert len({r["text"] for r in both}) == 5583
    assert all(r["label"] == ("positive" if words[r["text"]] > 0 else "negative") for r in both)
    readme = (tmp_path / "vader" / "README").read_text()
    assert "vadersentiment 3.3.2" in readme and "MIT" in readme and "Hutto & Gilbert 2014" in readme
    stamp = [p.stat().st_mtime_ns for p in (train, ev)]
    assert D.builtin_dataset("vader", cache_dir=tmp_path) == (train, ev)
    assert [p.stat().st_mtime_ns for p in (train, ev)] == stamp
    assert readme == (tmp_path / "vader" / "README").read_text()
    train.write_text('{"text": "tampered", "label": "positive"}\n')
    D.builtin_dataset("vader", cache_dir=tmp_path)
    assert len(D.read_rows(train)) == 4746
    batch = next(D.Batcher(a, tokenizer=bert_tok).batches(8, seed=0))
    assert batch["input_ids"].shape[0] == 8 and set(batch["labels"].tolist()) <= {0, 1}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.resolve_data("vader") == (
        tmp_path / "xdg/pelt/data/vader/train.jsonl",
        tmp_path / "xdg/pelt/data/vader/eval.jsonl",
    )
    assert D.resolve_data(str(train)) == (train, None)
    with pytest.raises(DataError, match="DATA path does not exist; known built-in datasets: vader"):
        D.resolve_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown built-in dataset 'imdb'"):
        D.builtin_dataset("imdb", cache_dir=tmp_path)
