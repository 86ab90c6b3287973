"""Task heads are transformers' own classes: a trained run merges into a checkpoint ``pipeline`` loads as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_models
import torch
import transformers
from conftest import pelt_main, word_tokenizer

from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.errors import UsageError
from pelt_cli.merge import merge_run
from pelt_cli.run import Run, load_run
from pelt_cli.train import TrainConfig, train_run

FAST = dict(epochs=1, batch_size=16, lr=1e-2, warmup=0.0, patience=0, max_length=16)
SENTENCES = ["the film was good", "a very dull story", "it was superb and fun", "the plot was awful"]


def _base(tiny_dir: Path, family: str, tmp_path: Path, tokenizer: bool) -> Path:
    base = tmp_path / family
    shutil.copytree(tiny_dir / family, base)
    if tokenizer:
        word_tokenizer(base)
    return base


def _run_probs(run: Path, tok_dir: Path) -> torch.Tensor:
    model, _ = load_run(run)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    with torch.no_grad():
        rows = [model(**tok(s, return_tensors="pt")).logits.softmax(-1)[0] for s in SENTENCES]
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("family", "cls"),
    [
        ("bert", "BertForSequenceClassification"),
        ("llama", "LlamaForSequenceClassification"),
        ("gpt2", "GPT2ForSequenceClassification"),
    ],
)
def test_classification_merges_into_a_pipeline_model(
    tiny_dir: Path, sentiment: tuple[Path, Path], words: Path, tmp_path: Path, family: str, cls: str
) -> None:
    in_base = family == "bert"  # BERT: the tokenizer sits beside the base; the decoders: train --tokenizer
    base = _base(tiny_dir, family, tmp_path, tokenizer=in_base)
    run = apply(rc.load("lora-gpt2" if family == "gpt2" else "lora"), base, tmp_path / "run")
    train_run(run, str(sentiment[0]), str(sentiment[1]), TrainConfig(**FAST), tokenizer=None if in_base else str(words))
    head = Run.open(run).head
    assert head["class"] == cls and head["labels"] == ["negative", "positive"]
    assert head["params"] and all(not p.startswith(head["root"] + ".encoder") for p in head["params"])
    merge_run(run, tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == [cls] and cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # the tokenizer travels
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "merged"), top_k=None)
    got = [{d["label"]: d["score"] for d in row} for row in pipe(SENTENCES)]
    want = _run_probs(run, base if in_base else words)
    for row, p in zip(got, want, strict=True):
        assert abs(row["negative"] - p[0].item()) <= 1e-5 and abs(row["positive"] - p[1].item()) <= 1e-5


def test_a_task_model_base_keeps_its_head(tiny_dir: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = tiny_models.config("bert", num_labels=2)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "cls")
    word_tokenizer(tmp_path / "cls")
    base_head = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "cls").classifier.weight
    run = apply(rc.load("lora"), tmp_path / "cls", tmp_path / "run")
    train_run(run, str(sentiment[0]), str(sentiment[1]), TrainConfig(**FAST))
    head = Run.open(run).head
    assert head["root"] == "" and head["params"] == ["classifier.weight", "classifier.bias"]
    trained = load_run(run)[0].classifier.weight
    assert 0 < (trained - base_head).abs().max().item() < 0.2  # fine-tuned from the base's head, not re-drawn

    three = tmp_path / "three.jsonl"
    three.write_text(
        "".join(
            json.dumps({"text": t, "label": lab}) + "\n" for t, lab in [("good", "a"), ("bad", "b"), ("dull", "c")] * 6
        )
    )
    run2 = apply(rc.load("lora"), tmp_path / "cls", tmp_path / "run2")
    with pytest.raises(UsageError, match="--new-head"):
        train_run(run2, str(three), str(three), TrainConfig(**FAST))
    train_run(run2, str(three), str(three), TrainConfig(**FAST, new_head=True))
    assert load_run(run2)[0].config.id2label == {0: "a", 1: "b", 2: "c"}


def test_causal_lm_on_a_base_without_an_lm_head_is_one_line(tmp_path: Path, words: Path) -> None:
    cfg = tiny_models.config("llama")
    transformers.LlamaModel(cfg).save_pretrained(tmp_path / "bare")
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": "the film was good"}) + "\n" for _ in range(8)))
    assert pelt_main("apply", "lora", str(tmp_path / "bare"), "-o", str(tmp_path / "run")).returncode == 0
    r = pelt_main("train", str(tmp_path / "run"), "--data", str(data), "--tokenizer", str(words), "--epochs", "1")
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "language-model head" in r.stderr
    assert "LlamaModel" in r.stderr and "Traceback" not in r.stderr


def test_classification_without_a_head_class_is_one_line(
    tiny_dir: Path, sentiment: tuple[Path, Path], words: Path, tmp_path: Path
) -> None:
    assert pelt_main("apply", "lora", str(tiny_dir / "whisper"), "-o", str(tmp_path / "run")).returncode == 0
    r = pelt_main("train", str(tmp_path / "run"), "--data", str(sentiment[0]), "--tokenizer", str(words))
    assert r.returncode == 2 and r.stderr.count("error:") == 1
    assert "no AutoModelForSequenceClassification class for whisper" in r.stderr


def test_causal_lm_merge_generates_with_pipeline(tiny_dir: Path, words: Path, tmp_path: Path) -> None:
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES * 4))
    run = apply(rc.load("lora"), tiny_dir / "llama", tmp_path / "run")
    train_run(run, str(data), str(data), TrainConfig(**FAST), tokenizer=str(words))
    merge_run(run, tmp_path / "merged")
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "merged"))
    got = pipe("the film", max_new_tokens=4, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    model, _ = load_run(run)
    tok = transformers.AutoTokenizer.from_pretrained(words)
    ids = model.generate(**tok("the film", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert list(got) == ids[0].tolist() and len(got) == 2 + 4


def test_the_tokenizer_travels_through_bundles(
    tiny_bert: Path, sentiment: tuple[Path, Path], words: Path, tmp_path: Path
) -> None:
    import io
    import tarfile

    from pelt_cli.bundle import apply_bundle, export_bundle

    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    train_run(run, str(sentiment[0]), str(sentiment[1]), TrainConfig(**dict(FAST, max_steps=2)))
    manifest = export_bundle(run, tmp_path / "bundle")
    assert "tokenizer.json" in manifest["tokenizer"] and (tmp_path / "bundle" / "vocab.txt").is_file()
    buf = io.BytesIO()
    export_bundle(run, "-", stream=buf)
    names = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames()
    assert names[:2] == ["manifest.json", "bundle.safetensors"] and "tokenizer.json" in names
    (tmp_path / "b.tar").write_bytes(buf.getvalue())
    rebuilt = apply_bundle(tmp_path / "b.tar", tiny_bert, tmp_path / "rebuilt")
    assert (rebuilt / "tokenizer.json").read_bytes() == (tiny_bert / "tokenizer.json").read_bytes()
    assert Run.open(rebuilt).meta.extra["tokenizer"] == str(rebuilt.resolve())
    merge_run(rebuilt, tmp_path / "merged")
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "merged"), top_k=None)
    want = _run_probs(run, tiny_bert)
    for row, p in zip(pipe(SENTENCES), want, strict=True):
        assert abs({d["label"]: d["score"] for d in row}["positive"] - p[1].item()) <= 1e-5
