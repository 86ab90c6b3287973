"""pelt predict: JSONL/CSV/stdin inputs, input order, label names, batch invariance per method, generation, bundles,
bad inputs (one line, exit 2), and the transformers pipeline on a merged run giving pelt's labels."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import fixtures_predict as fp
import pytest
import torch
from conftest import pelt_main

LONG = {"text": " ".join(["the story was really quite dull and the plot was sad"] * 4)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    yield from fp.single_thread()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fp.shared_root(tmp_path_factory)


def lines(r: object) -> list[dict]:
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def alone(pred: object, rows: list[dict]) -> list[dict]:
    from pelt_cli.predict import predict_rows

    return [next(iter(predict_rows(pred, [r], batch_size=1))) for r in rows]


def max_diff(a: list[dict], b: list[dict]) -> float:
    assert [x["scores"].keys() for x in a] == [y["scores"].keys() for y in b]
    return max(abs(x["scores"][k] - y["scores"][k]) for x, y in zip(a, b, strict=True) for k in x["scores"])


# ------------------------------------------------------------------------------------------------ inputs and order


def test_jsonl_csv_and_stdin_give_the_same_rows_in_input_order(root: Path, minilm: Path, tmp_path: Path) -> None:
    from pelt_cli.predict import load_predictor

    run = fp.method_run(root, minilm, "lora")
    rows = fp.sentences(40, 1)
    rows.insert(3, LONG)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, **r}) + "\n" for i, r in enumerate(rows)))
    with open(tmp_path / "in.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "id"], *[[r["text"], i] for i, r in enumerate(rows)]])
    (tmp_path / "in.txt").write_text("\n".join(r["text"] for r in rows))
    got = [
        lines(pelt_main("predict", str(run), "--data", str(tmp_path / name), "-b", "8"))
        for name in ("in.jsonl", "in.csv", "in.txt")
    ]
    got.append(
        lines(
            pelt_main("predict", str(run), "--data", "-", "-b", "8", stdin="\n".join(r["text"] for r in rows) + "\n\n")
        )
    )
    want = alone(load_predictor(run), rows)
    for out in got:
        assert len(out) == len(rows)
        assert max_diff(out, want) <= 1e-5
        assert [o["label"] for o in out] == [w["label"] for w in want]
    assert {o["label"] for o in want} == {"neg", "pos"}  # the fixture's head splits the rows
    for o in want:
        assert list(o["scores"]) == ["neg", "pos"]
        assert abs(sum(o["scores"].values()) - 1) < 1e-6 and o["score"] == o["scores"][o["label"]] == max(
            o["scores"].values()
        )


def test_pair_rows_read_text_a_and_text_b(root: Path, minilm: Path) -> None:
    from pelt_cli.predict import load_predictor, predict_rows

    pred = load_predictor(fp.method_run(root, minilm, "lora"))
    pairs = [
        {"text_a": a["text"], "text_b": b["text"]} for a, b in zip(fp.sentences(6, 3), fp.sentences(6, 4), strict=True)
    ]
    got = list(predict_rows(pred, pairs, batch_size=4))
    with torch.no_grad():
        enc = pred.tokenizer(pairs[0]["text_a"], pairs[0]["text_b"], return_tensors="pt")
        want = pred.model(**enc).logits.softmax(-1)[0].tolist()
    assert max(abs(x - y) for x, y in zip(got[0]["scores"].values(), want, strict=True)) <= 1e-6
    as_text_pair = [{"text": p["text_a"], "text_pair": p["text_b"]} for p in pairs]
    assert max_diff(list(predict_rows(pred, as_text_pair, batch_size=4)), got) == 0.0


# ------------------------------------------------------------------------------------------------ batch invariance


@pytest.mark.parametrize("method", fp.METHODS)
def test_scores_do_not_depend_on_the_batch(root: Path, minilm: Path, method: str) -> None:
    from pelt_cli.predict import load_predictor, predict_rows

    pred = load_predictor(fp.method_run(root, minilm, method))
    rows = fp.sentences(16, 2)
    want = alone(pred, rows)
    beside_long = [next(iter(predict_rows(pred, [r, LONG], batch_size=2))) for r in rows]
    batched = list(predict_rows(pred, [*rows, LONG], batch_size=8))[:-1]
    assert max(max_diff(beside_long, want), max_diff(batched, want)) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_classifiers_pool_the_last_real_token_in_any_batch(root: Path, family: str) -> None:
    from pelt_cli.predict import load_predictor, predict_rows

    pred = load_predictor(fp.decoder_classifier(root, family))
    assert pred.pad_id == pred.tokenizer.eos_token_id  # the tokenizer has no pad token: eos pads
    rows = fp.sentences(12, 4)
    want = alone(pred, rows)
    got = list(predict_rows(pred, [*rows, LONG], batch_size=13))[:-1]
    assert max_diff(got, want) <= 1e-5 and len({round(w["score"], 3) for w in want}) > 3


# ------------------------------------------------------------------------------------------------ causal LM


def test_greedy_generation_equals_model_generate(root: Path) -> None:
    from conftest import make_run

    from pelt_cli.predict import GenerateOptions, load_predictor, predict_rows
    from pelt_cli.run import Run

    llama = fp.causal_lm(root)
    run = fp.once("llama-lora", lambda: make_run("lora", llama, root / "llama-lora"))
    prompts = [r["text"] for r in fp.sentences(7, 5)]
    pred = load_predictor(llama)
    for target, model in ((llama, pred.model), (run, Run.open(run).load_model().eval())):
        r = pelt_main(
            "predict", str(target), "--data", "-", "-b", "4", "--max-new-tokens", "6", stdin="\n".join(prompts)
        )
        want = []
        for p in prompts:
            ids = pred.tokenizer(p, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
            want.append(pred.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        assert [o["generated"] for o in lines(r)] == want and all(want)
    rows = [{"text": p} for p in prompts]
    sampled = [
        list(predict_rows(pred, rows, batch_size=4, opts=GenerateOptions(6, True, 1.5, seed=3))) for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and sampled[0] != list(predict_rows(pred, rows, batch_size=4))


# ------------------------------------------------------------------------------------------------ bundles, pipeline


def test_bundle_directory_and_tar_predict_as_the_run(root: Path, minilm: Path, tmp_path: Path) -> None:
    from pelt_cli.bundle import export_bundle
    from pelt_cli.predict import load_predictor, predict_rows

    run = fp.method_run(root, minilm, "adapter")
    export_bundle(run, tmp_path / "bundle")
    with open(tmp_path / "bundle.tar", "wb") as f:
        export_bundle(run, "-", stream=f)
    rows = fp.sentences(12, 6)
    want = list(predict_rows(load_predictor(run), rows))
    for b in ("bundle", "bundle.tar"):
        (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert (
            max_diff(lines(pelt_main("predict", str(tmp_path / b), "--data", str(tmp_path / "in.jsonl"))), want) <= 1e-6
        )


def test_pipeline_on_the_merged_run_gives_pelts_labels(root: Path, minilm: Path) -> None:
    import transformers

    from pelt_cli.predict import load_predictor, predict_rows

    merged = fp.merged_lora(root, minilm)
    texts = [r["text"] for r in fp.sentences(30, 7)]
    pipe = transformers.pipeline("text-classification", model=str(merged), device="cpu")
    theirs = pipe(texts)
    r = pelt_main("predict", str(merged), "--data", "-", stdin="\n".join(texts))
    ours = lines(r)
    assert [o["label"] for o in ours] == [t["label"] for t in theirs]
    assert max(abs(o["score"] - t["score"]) for o, t in zip(ours, theirs, strict=True)) <= 1e-5
    run = list(predict_rows(load_predictor(fp.method_run(root, minilm, "lora")), [{"text": t} for t in texts]))
    assert max_diff(run, ours) <= 1e-5 and {o["label"] for o in ours} == {"neg", "pos"}


def test_a_trained_run_its_merge_and_the_pipeline_agree(
    root: Path, tiny_bert: Path, sentiment: tuple[Path, Path]
) -> None:
    import transformers

    run, merged = fp.trained_lora(root, tiny_bert, sentiment)
    texts = "\n".join(r["text"] for r in fp.sentences(20, 9))
    by_run, by_merged = (lines(pelt_main("predict", str(d), "--data", "-", stdin=texts)) for d in (run, merged))
    theirs = transformers.pipeline("text-classification", model=str(merged), device="cpu")(texts.splitlines())
    assert list(by_run[0]["scores"]) == ["negative", "positive"]
    assert max_diff(by_run, by_merged) <= 1e-5
    assert [o["label"] for o in by_merged] == [t["label"] for t in theirs]
    assert max(abs(o["score"] - t["score"]) for o, t in zip(by_merged, theirs, strict=True)) <= 1e-5


# ------------------------------------------------------------------------------------------------ bad inputs


def _bundle_without_base(root: Path, minilm: Path, tmp: Path) -> Path:
    from pelt_cli.bundle import export_bundle

    export_bundle(fp.method_run(root, minilm, "lora"), tmp / "b")
    manifest = json.loads((tmp / "b" / "manifest.json").read_text())
    manifest["base"]["path_hint"] = str(tmp / "gone")
    (tmp / "b" / "manifest.json").write_text(json.dumps(manifest))
    return tmp / "b"


def _untrained_run(tiny_bert: Path, tmp: Path) -> Path:
    from pelt_cli import recipe
    from pelt_cli.apply import apply

    return apply(recipe.load("lora"), tiny_bert, tmp / "bare-run")


@pytest.mark.parametrize(
    "case, expect",
    [
        ("untrained", "this run was never trained"),
        ("no-base", "gone does not exist"),
        ("neither", "not a model, run or bundle"),
        ("missing", "no such file or directory"),
        ("bare-model", "BertModel has no task head"),
        ("no-text", "expected text"),
        ("temperature", "--temperature applies to --sample"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    case: str, expect: str, root: Path, minilm: Path, tiny_bert: Path, tmp_path: Path
) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"sentence": "good"} if case == "no-text" else {"text": "good"}) + "\n")
    target = {
        "untrained": lambda: _untrained_run(tiny_bert, tmp_path),
        "no-base": lambda: _bundle_without_base(root, minilm, tmp_path),
        "neither": lambda: tmp_path,
        "missing": lambda: tmp_path / "nope",
        "bare-model": lambda: tiny_bert,
    }.get(case, lambda: fp.method_run(root, minilm, "lora"))()
    extra = ["--temperature", "0.5"] if case == "temperature" else []
    r = pelt_main("predict", str(target), "--data", str(data), *extra)
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.splitlines()
    assert err[0].startswith("error: ") and expect in err[0] and len(err) <= 2, r.stderr


def test_no_tokenizer_is_one_line(root: Path, minilm: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(fp.merged_lora(root, minilm), d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    r = pelt_main("predict", str(d), "--data", "-", stdin="good\n")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {d}: no tokenizer found"), r.stderr
