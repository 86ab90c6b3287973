"""``speech-to-text``: the domain adapter's objective, the LM loss of a transcription given its audio through the
whole tiny Qwen2-Audio (tower → adapter → projector → language model), on synthetic speech (chirps and tones)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures_audio import SPEECH_WORDS, speech_model, speech_tokenizer, synth_speech

from pelt_cli import audio_lm
from pelt_cli import data as D
from pelt_cli import recipe as rc
from pelt_cli.apply import apply
from pelt_cli.errors import DataError, UsageError
from pelt_cli.evaluate import data_inputs
from pelt_cli.run import ADAPTER_FILE, load_run
from pelt_cli.train import TrainConfig, train_run


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen2-Audio that listens to its audio, saved with a word-level stand-in for its tokenizer, and
    train/eval speech manifests."""
    root = tmp_path_factory.mktemp("speech")
    return {
        "base": speech_model(root / "qwen2_audio"),
        "train": synth_speech(root / "train", 8, seed=0),
        "eval": synth_speech(root / "eval", 4, seed=1),
    }


def test_audio_text_columns_pick_speech_to_text() -> None:
    assert D.infer_task({"audio", "text"}) == "speech-to-text"
    assert D.infer_task({"audio", "text", "speaker"}) == "speech-to-text"
    # the tasks that were there keep their columns
    assert D.infer_task({"audio", "text", "label"}) == "audio-classification"
    assert D.infer_task({"audio", "label"}) == "audio-classification"
    assert D.infer_task({"text", "label"}) == "text-classification"
    assert D.infer_task({"text"}) == "causal-lm"
    assert D.infer_task({"source", "reference", "text"}) == "domain-matching"


def test_labels_count_only_the_transcription(speech: dict[str, Path]) -> None:
    td = D.load_data(speech["train"])
    assert td.task == "speech-to-text" and len(td.rows) == 8 and td.labels is None
    assert all(Path(r["audio"]).is_absolute() and Path(r["audio"]).is_file() for r in td.rows)  # resolved
    tok, proc = data_inputs(speech["base"], td.task)
    batch = D.Batcher(td, tokenizer=tok, feature_extractor=proc).collate(td.rows)
    n, width = batch["input_ids"].shape
    assert n == 8 and batch["labels"].shape == (8, width) and batch["input_features"].shape == (8, 16, 200)
    frames = audio_lm.audio_frames(batch["feature_attention_mask"], 50).sum(1)
    for i, row in enumerate(td.rows):
        words = row["text"].split()
        want = tok(" " + row["text"], add_special_tokens=False)["input_ids"]
        assert want == [tok.convert_tokens_to_ids(w) for w in words]  # one id per word
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        kept = labels != -100
        assert int(kept.sum()) == len(words) + 1  # the transcription's tokens and eos, nothing else
        assert labels[kept].tolist() == [*want, tok.eos_token_id] == ids[kept].tolist()
        end = int(mask.sum())
        assert kept[:end].tolist() == [False] * (end - len(words) - 1) + [True] * (len(words) + 1)  # the tail
        audio = int((ids[:end] == 99).sum())
        assert audio == int(frames[i]) == 10 * len(words) + 2  # (0.4 s a word + 0.1 s) at 25 tokens a second
        assert ids[0] == tok.convert_tokens_to_ids("<|audio_bos|>") and ids[audio + 1] == 3  # <|audio_eos|>


def _base(speech: dict[str, Path]) -> torch.nn.Module:
    import transformers

    return transformers.Qwen2AudioForConditionalGeneration.from_pretrained(speech["base"]).eval()


def _loss(model: torch.nn.Module, speech: dict[str, Path]) -> float:
    """The mean loss per transcription token on the training rows."""
    td = D.load_data(speech["train"])
    tok, proc = data_inputs(speech["base"], td.task)
    with torch.no_grad():
        nll, count = audio_lm.target_nll(model, D.Batcher(td, tokenizer=tok, feature_extractor=proc).collate(td.rows))
    return float(nll / count)


@pytest.fixture(scope="module")
def trained(speech: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The recipe's domain adapter trained on the speech rows (6 steps), with what it was before."""
    from safetensors.torch import load_file

    base = _base(speech)
    run = apply(
        rc.load("qwen2-audio-domain-adapter", ["inserts.0.params.dropout=0.0"]),
        speech["base"],
        tmp_path_factory.mktemp("trained") / "run",
    )
    before = load_file(run / ADAPTER_FILE)
    events: list[dict] = []
    cfg = TrainConfig(epochs=3, batch_size=4, grad_accum=1, lr=3e-2, scale_lr=3e-1, warmup=0.0, patience=0)
    res = train_run(run, str(speech["train"]), str(speech["train"]), cfg, on_event=events.append)
    # the adapter starts as the identity: the base's own loss is the loss before training
    return {"run": run, "base": base, "before": before, "res": res, "events": events, "start": _loss(base, speech)}


def test_the_adapter_learns_the_transcription_loss(speech: dict[str, Path], trained: dict) -> None:
    from safetensors.torch import load_file

    run, res = trained["run"], trained["res"]
    assert res.task == "speech-to-text" and res.steps == 6 and res.metric_name == "perplexity"
    assert len([e for e in trained["events"] if e["kind"] == "step"]) == 6
    losses = [trained["start"]] + [h["eval_loss"] for h in res.history]  # training rows, before and after epochs
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # falls every epoch
    assert losses[-1] < losses[0] - 0.2, losses
    assert res.history[-1]["perplexity"] == pytest.approx(math.exp(losses[-1]), rel=1e-9)
    before, after = trained["before"], load_file(run / ADAPTER_FILE)
    names = [n for n in before if "pelt_domain" in n]
    assert len(names) == len(before) >= 10  # only the adapter is saved (no head)
    moved = [n for n in names if not torch.equal(before[n], after[n])]
    assert len(moved) == len(names), sorted(set(names) - set(moved))  # gradient reached every adapter tensor
    assert float(after["model.multi_modal_projector.pelt_domain.scale"]) != 0.1
    model, meta = load_run(run)
    want = trained["base"].state_dict()
    state = {k: v for k, v in model.state_dict().items() if "pelt_domain" not in k}
    assert set(state) == set(want)
    assert max((state[k].float() - want[k].float()).abs().max().item() for k in want) == 0.0  # frozen base
    assert abs(_loss(model.eval(), speech) - losses[-1]) < 1e-5  # the saved run is the trained one
    gates = json.loads((run / "gates.json").read_text())["domain"]
    total_frames = sum(10 * len(json.loads(ln)["text"].split()) + 2 for ln in _lines(speech))
    assert gates["gate"]["count"] == total_frames and 0 < gates["gate"]["mean"] < 1  # real audio frames only
    assert meta["training"]["task"] == "speech-to-text"


def test_eval_and_predict_a_trained_run(speech: dict[str, Path], trained: dict) -> None:
    from conftest import pelt_main

    run = trained["run"]
    r = pelt_main("eval", str(run), "--data", str(speech["train"]), "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["task"] == "speech-to-text" and doc["rows"] == 8
    assert doc["tokens"] == sum(len(json.loads(ln)["text"].split()) + 1 for ln in _lines(speech))
    assert abs(doc["loss"] - trained["res"].history[-1]["eval_loss"]) < 1e-5  # pelt train's eval, per token
    # pelt predict on the run (adapter active) and on the bare checkpoint: transformers' own processor + generate
    for target, model in ((run, load_run(run)[0]), (speech["base"], trained["base"])):
        r = pelt_main("-q", "predict", str(target), "--data", str(speech["eval"]), "--max-new-tokens", "3")
        assert r.returncode == 0, r.stderr
        got = [json.loads(ln)["generated"] for ln in r.stdout.splitlines()]
        assert got == _transcribe(model.eval(), speech, 3) and len(got) == 4 and all(got)


def _transcribe(model: torch.nn.Module, speech: dict[str, Path], new_tokens: int) -> list[str]:
    """Greedy transcriptions of the eval rows, one recording at a time, with transformers' processor and generate."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(speech["base"])
    proc = transformers.Qwen2AudioProcessor(D.feature_extractor_for(model.config), tok)
    out = []
    for row in D.load_data(speech["eval"]).rows:
        enc = proc(text=audio_lm.PROMPT, audio=D.load_audio(row["audio"]), sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=0)
        out.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def _lines(speech: dict[str, Path]) -> list[str]:
    return speech["train"].read_text().splitlines()


def test_eval_loss_is_a_mean_per_transcription_token(speech: dict[str, Path]) -> None:
    model = _base(speech)
    td = D.load_data(speech["eval"])
    tok, proc = data_inputs(speech["base"], td.task)
    b = D.Batcher(td, tokenizer=tok, feature_extractor=proc)
    with torch.no_grad():
        whole = audio_lm.target_nll(model, b.collate(td.rows))
        parts = [audio_lm.target_nll(model, b.collate([r])) for r in td.rows]
        ref = model(**b.collate(td.rows)).loss  # transformers' own shifted, masked cross-entropy
    assert int(whole[1]) == sum(len(r["text"].split()) + 1 for r in td.rows)
    assert abs(float(whole[0]) - sum(float(p[0]) for p in parts)) < 1e-4  # padding changes nothing
    assert abs(float(whole[0] / whole[1]) - float(ref)) < 1e-6


def test_refusals(speech: dict[str, Path], tmp_path: Path) -> None:
    import tiny_models
    import transformers

    with pytest.raises(UsageError, match=r"needs a Qwen2AudioForConditionalGeneration base .* WhisperForCond"):
        audio_lm.require_model(tiny_models.build("whisper"))
    with pytest.raises(UsageError, match=r"needs a Qwen2AudioForConditionalGeneration base .* a whisper model"):
        audio_lm.load_processor(None, None, tiny_models.build("whisper").config)
    cfg = transformers.AutoConfig.from_pretrained(speech["base"])
    other = speech_tokenizer(tmp_path / "tok", audio_token_id=98)
    tok = transformers.AutoTokenizer.from_pretrained(other)
    with pytest.raises(UsageError, match=r"maps <\|AUDIO\|> to id 98; the model's audio_token_id is 99"):
        audio_lm.load_processor(tmp_path, tok, cfg)
    tok = transformers.AutoTokenizer.from_pretrained(speech["base"])
    # the base's own preprocessor_config.json is used where it has one, and must fit the audio encoder
    D.feature_extractor_for(cfg).save_pretrained(tmp_path / "fits")
    assert audio_lm.load_processor(tmp_path / "fits", tok, cfg).processor.feature_extractor.nb_max_frames == 200
    transformers.WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp_path / "whisper")
    with pytest.raises(UsageError, match=r"gives 80 mel bins × 3000 frames; the audio encoder takes 16 × 200"):
        audio_lm.load_processor(tmp_path / "whisper", tok, cfg)
    with pytest.raises(DataError, match="holds an audio token"):
        audio_lm.target_ids(tok, "up <|AUDIO|> down", 32)
    assert audio_lm.target_ids(tok, "up down", 1) == [tok.convert_tokens_to_ids("up")]  # truncated: no eos
    assert set(SPEECH_WORDS) <= set(tok.get_vocab())
