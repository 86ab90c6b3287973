"""pelt eval: classifier metrics checked against pelt predict's labels, a run and its merged checkpoint agreeing,
labels never seen in training refused, causal-LM loss and perplexity, and the table/tsv output."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import fixtures_predict as fp
import pytest
import torch
from conftest import pelt_main


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fp.shared_root(tmp_path_factory)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    yield from fp.single_thread()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    rows = fp.sentences(60, 5, labels=True)
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def evaluate(target: Path, data: Path, *args: str) -> dict:
    r = pelt_main("eval", str(target), "--data", str(data), "--format", "json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_classification_report_by_hand() -> None:
    from pelt_cli.evaluate import classification_report

    rep = classification_report([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], ["a", "b", "c"])
    assert rep["confusion"]["matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert rep["accuracy"] == 4 / 6
    a, b, c = rep["per_class"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == (0.5, 0.5, 0.5, 2)
    assert (b["precision"], b["recall"], b["f1"]) == (1.0, 0.5, 2 / 3)
    assert (c["precision"], c["recall"], c["f1"]) == (2 / 3, 1.0, 0.8)
    assert rep["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3, abs=1e-12)


def test_eval_metrics_match_predictions(root: Path, minilm: Path, labelled: tuple[Path, list[dict]]) -> None:
    from pelt_cli.predict import load_predictor, predict_rows

    data, rows = labelled
    run = fp.method_run(root, minilm, "lora")
    doc = evaluate(run, data, "-b", "7")
    preds = list(predict_rows(load_predictor(run), rows))
    hits = [p["label"] == r["label"] for p, r in zip(preds, rows, strict=True)]
    assert doc["rows"] == 60 and doc["task"] == "text-classification"
    assert doc["accuracy"] == sum(hits) / 60
    names = ["neg", "pos"]
    matrix = [
        [sum(1 for p, r in zip(preds, rows, strict=True) if r["label"] == t and p["label"] == q) for q in names]
        for t in names
    ]
    assert doc["confusion"] == {"labels": names, "matrix": matrix}
    f1s = []
    for c, row in zip(names, doc["per_class"], strict=True):
        i = names.index(c)
        tp, predicted, support = matrix[i][i], matrix[0][i] + matrix[1][i], sum(matrix[i])
        assert row == {
            "label": c,
            "precision": tp / predicted,
            "recall": tp / support,
            "f1": 2 * tp / (predicted + support),
            "support": support,
        }
        f1s.append(row["f1"])
    assert doc["macro_f1"] == pytest.approx(sum(f1s) / 2, abs=1e-12)
    loss = -sum(math.log(p["scores"][r["label"]]) for p, r in zip(preds, rows, strict=True)) / 60
    assert doc["loss"] == pytest.approx(loss, abs=1e-5)


def test_eval_of_a_run_and_of_its_merge_agree(root: Path, minilm: Path, labelled: tuple[Path, list[dict]]) -> None:
    data, _ = labelled
    run_doc = evaluate(fp.method_run(root, minilm, "lora"), data)
    merged_doc = evaluate(fp.merged_lora(root, minilm), data, "-b", "5")
    for key in ("accuracy", "macro_f1", "per_class", "confusion", "rows"):
        assert run_doc[key] == merged_doc[key], key
    assert abs(run_doc["loss"] - merged_doc["loss"]) <= 1e-5


def test_a_trained_run_its_merge_and_training_agree(root: Path, tiny_bert: Path, sentiment: tuple[Path, Path]) -> None:
    run, merged = fp.trained_lora(root, tiny_bert, sentiment)
    run_doc, merged_doc = evaluate(run, sentiment[1]), evaluate(merged, sentiment[1], "-b", "3")
    for key in ("accuracy", "macro_f1", "per_class", "confusion", "rows"):
        assert run_doc[key] == merged_doc[key], key
    assert abs(run_doc["loss"] - merged_doc["loss"]) <= 1e-5
    trained = json.loads((run / "run.json").read_text())["training"]["result"]
    assert run_doc["accuracy"] == trained["accuracy"] and run_doc["confusion"]["labels"] == ["negative", "positive"]


def test_labels_never_seen_in_training_are_one_line(root: Path, minilm: Path, tmp_path: Path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "".join(json.dumps({"text": "good film", "label": lab}) + "\n" for lab in ("neg", "pos", "meh", "ugh", "meh"))
    )
    r = pelt_main("eval", str(fp.method_run(root, minilm, "lora")), "--data", str(data))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == f"error: {data}: label(s) 'meh', 'ugh' never seen in training; the model knows neg, pos\n"


def test_causal_lm_loss_and_perplexity(root: Path, tmp_path: Path) -> None:
    import transformers

    llama = fp.causal_lm(root)
    rows = fp.sentences(9, 8)
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    doc = evaluate(llama, data, "-b", "4")
    model = transformers.LlamaForCausalLM.from_pretrained(llama).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = tok(r["text"], return_tensors="pt")["input_ids"]
            nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert doc["task"] == "causal-lm" and doc["tokens"] == tokens
    assert doc["loss"] == pytest.approx(nll / tokens, abs=1e-5)
    assert doc["perplexity"] == pytest.approx(math.exp(doc["loss"]), rel=1e-9)
    assert evaluate(llama, data, "-b", "1")["loss"] == pytest.approx(doc["loss"], abs=1e-6)


def test_table_and_tsv_output(root: Path, minilm: Path, labelled: tuple[Path, list[dict]]) -> None:
    data, _ = labelled
    run = str(fp.method_run(root, minilm, "lora"))
    table = pelt_main("eval", run, "--data", str(data), "--format", "table")
    assert table.returncode == 0, table.stderr
    for text in ("accuracy", "macro-F1", "precision", "confusion matrix", "true \\ predicted", "neg", "pos"):
        assert text in table.stdout, text
    tsv = pelt_main("eval", run, "--data", str(data), "--format", "tsv")
    assert tsv.stdout.splitlines()[0] == "label\tprecision\trecall\tf1\tsupport"
    assert len(tsv.stdout.splitlines()) == 3 and tsv.stderr.startswith("accuracy ")


def test_no_gate_ablation(trained_unipelt: Path, sentiment: tuple[Path, Path], tmp_path: Path) -> None:
    """--ablate-gates measures the run again with every gate held at 1. For sigmoid gates that is the run whose gate
    biases are pushed to +60 (σ = 1 in float32): its plain eval gives the ablated numbers."""
    from safetensors.torch import load_file, save_file

    doc = evaluate(trained_unipelt, sentiment[1], "--ablate-gates")
    ab = doc["ablation"]
    assert ab["gates"] == "fixed at 1" and ab["controllers"] == 2  # the tiny BERT's two layers
    for k in ("accuracy", "macro_f1", "loss"):
        assert ab["delta"][k] == pytest.approx(ab[k] - doc[k], abs=1e-12)
    assert abs(ab["loss"] - doc["loss"]) > 1e-6  # the gates change the outputs
    assert doc["loss"] == pytest.approx(evaluate(trained_unipelt, sentiment[1])["loss"], abs=1e-9)  # restored after
    if json.loads((trained_unipelt / "run.json").read_text())["recipe"]["inserts"][0]["params"]["gate"] != "sigmoid":
        return
    opened = tmp_path / "open"
    shutil.copytree(trained_unipelt, opened)
    tensors = load_file(opened / "adapter.safetensors")
    biases = [k for k in tensors if k.endswith("pelt_gate.net.bias")]
    assert len(biases) == 2
    for k in biases:
        tensors[k] = torch.full_like(tensors[k], 60.0)
    save_file(tensors, opened / "adapter.safetensors")
    forced = evaluate(opened, sentiment[1])
    assert forced["accuracy"] == ab["accuracy"] and abs(forced["loss"] - ab["loss"]) <= 1e-5


def test_no_gate_ablation_needs_gates(root: Path, minilm: Path, labelled: tuple[Path, list[dict]]) -> None:
    r = pelt_main("eval", str(fp.method_run(root, minilm, "lora")), "--data", str(labelled[0]), "--ablate-gates")
    assert r.returncode == 2 and "has no UniPELT gates" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
