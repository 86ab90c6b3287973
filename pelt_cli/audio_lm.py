"""``speech-to-text``: the language-model loss of a transcription given its audio, through the whole Qwen2-Audio.

This is the domain adapter's training objective (audio → ``audio_tower`` → adapter → ``multi_modal_projector`` →
language model), and it trains any other module a recipe puts into Qwen2-Audio the same way. Each row is an
``audio`` file and its ``text``. The model reads, as Qwen2-Audio's own processor writes it::

    <|audio_bos|><|AUDIO|>×n<|audio_eos|>Detect the language and recognize the speech: TEXT<eos>

``Qwen2AudioProcessor`` (the base's tokenizer + feature extractor) turns the prompt and the waveform into token ids
with ``<|AUDIO|>`` repeated once per audio frame the encoder emits (``n``), log-mel features and their mask. The
target, ``" " + text`` and the tokenizer's eos token, is tokenized alone and appended, so the prompt/target boundary
is exact. Labels are -100 on the prompt and audio positions and on padding: only the target's tokens count. The loss
is their mean negative log-likelihood; the logits are computed at those positions only (Qwen2-Audio's 151k-token
head over ~750 audio positions would otherwise dominate memory).

``pelt predict`` on such a run (or any Qwen2-Audio) transcribes rows of audio paths with the model's own
``generate``, the adapter active (:func:`transcribe_rows`); ``pelt eval`` reports the loss and perplexity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pelt_cli.errors import DataError, UsageError

SPEECH_TO_TEXT = "speech-to-text"
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"
INSTRUCTION = "Detect the language and recognize the speech:"
PROMPT = f"{AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}{INSTRUCTION}"
IGNORE = -100
MODEL_CLASS = "Qwen2AudioForConditionalGeneration"


def require_model(model: Any) -> None:
    """Refuse a base that is not a Qwen2-Audio with its language model (the task's loss needs its LM head).

    Raises:
        UsageError: naming the class found.
    """
    if type(model).__name__ != MODEL_CLASS:
        raise UsageError(
            f"speech-to-text needs a {MODEL_CLASS} base (audio tower, projector and language model); "
            f"this run's base is {type(model).__name__}",
            hint="use audio,label rows (audio-classification) for an audio encoder alone",
        )


class SpeechProcessor:
    """Qwen2-Audio's processor with pelt's prompt, targets and label masking: what ``Batcher`` collates
    ``speech-to-text`` rows with (in its feature extractor's place) and what ``pelt predict`` transcribes with.

    Attributes:
        processor: the ``Qwen2AudioProcessor``.
        tokenizer: its tokenizer.
        sampling_rate: the feature extractor's (16 kHz for Qwen2-Audio).
    """

    def __init__(self, processor: Any) -> None:
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.sampling_rate = int(processor.feature_extractor.sampling_rate)

    def collate(self, waveforms: list[Any], texts: list[str], max_length: int) -> dict[str, Any]:
        """Model inputs and labels for (waveform, transcription) rows (see :func:`collate`)."""
        return collate(self.processor, waveforms, texts, max_length)


def load_processor(base_dir: str | os.PathLike[str] | None, tokenizer: Any, config: Any) -> SpeechProcessor:
    """A ``Qwen2AudioProcessor`` of the base's tokenizer and feature extractor.

    The feature extractor is the base's own (``preprocessor_config.json``) where it has one, else one built from the
    config (:func:`pelt_cli.data.feature_extractor_for`). Both must fit the model: mel bins and window as the audio
    encoder takes them, and the three audio tokens single tokens, ``<|AUDIO|>`` with the config's ``audio_token_id``.

    Raises:
        UsageError: a tokenizer or feature extractor that does not fit the model.
    """
    from transformers import AutoFeatureExtractor, Qwen2AudioProcessor

    from pelt_cli.data import feature_extractor_for

    if getattr(config, "audio_config", None) is None or getattr(config, "audio_token_id", None) is None:
        raise UsageError(
            f"speech-to-text needs a {MODEL_CLASS} base (audio tower, projector and language model); "
            f"this base is a {getattr(config, 'model_type', type(config).__name__)} model",
            hint="use audio,label rows (audio-classification) for an audio encoder alone",
        )
    if base_dir is not None and (Path(base_dir) / "preprocessor_config.json").is_file():
        feature_extractor = AutoFeatureExtractor.from_pretrained(str(base_dir))
    else:
        feature_extractor = feature_extractor_for(config)
    audio = config.audio_config
    want = (int(audio.num_mel_bins), 2 * int(audio.max_source_positions))
    have = (int(feature_extractor.feature_size), int(feature_extractor.nb_max_frames))
    if have != want:
        raise UsageError(
            f"{base_dir}: the feature extractor gives {have[0]} mel bins × {have[1]} frames; the audio encoder "
            f"takes {want[0]} × {want[1]}",
            hint="fix preprocessor_config.json (feature_size, chunk_length) or remove it",
        )
    check_tokens(tokenizer, int(config.audio_token_id))
    return SpeechProcessor(Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer))


def check_tokens(tokenizer: Any, audio_token_id: int) -> None:
    """The tokenizer knows ``<|audio_bos|>``, ``<|AUDIO|>`` and ``<|audio_eos|>`` as single tokens, and
    ``<|AUDIO|>`` is the model's ``audio_token_id``.

    Raises:
        UsageError: naming the token and what was expected.
    """
    for token in (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise UsageError(
                f"the tokenizer splits {token} into {len(ids)} token(s) {ids[:4]}; expected one special token "
                "as Qwen2-Audio's tokenizer has",
                hint="pass --tokenizer DIR with the base model's tokenizer",
            )
    got = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    if got != audio_token_id:
        raise UsageError(
            f"the tokenizer maps {AUDIO_TOKEN} to id {got}; the model's audio_token_id is {audio_token_id}",
            hint="pass --tokenizer DIR with the base model's tokenizer",
        )


def target_ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """The ids the loss counts for one transcription: ``" " + text`` (at most ``max_length`` tokens) then eos.

    Raises:
        DataError: the text holds one of the audio tokens (it would break the audio/feature alignment).
    """
    if any(t in text for t in (AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)):
        raise DataError(f"transcription {text[:60]!r} holds an audio token; expected plain text")
    ids = list(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])[:max_length]
    if tokenizer.eos_token_id is not None and len(ids) < max_length:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def prompt_inputs(processor: Any, waveforms: list[Any]) -> dict[str, Any]:
    """The processor's output for one prompt per waveform: ``input_ids`` and ``attention_mask`` (the prompt with
    ``<|AUDIO|>`` expanded), ``input_features`` [B, mels, frames] and ``feature_attention_mask`` [B, frames]."""
    import torch

    sr = processor.feature_extractor.sampling_rate
    with torch.autocast("cpu", enabled=False):  # the mel features are computed in torch on the CPU: keep them fp32
        return processor(
            text=[PROMPT] * len(waveforms), audio=list(waveforms), sampling_rate=sr, return_tensors="pt", padding=True
        )


def collate(processor: Any, waveforms: list[Any], texts: list[str], max_length: int) -> dict[str, Any]:
    """Model inputs and labels for rows of (16 kHz waveform, transcription), padded on the right.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (-100 but on the target tokens) [B, L];
        ``input_features`` [B, mels, frames]; ``feature_attention_mask`` [B, frames].
    """
    import torch

    enc = prompt_inputs(processor, waveforms)
    tok = processor.tokenizer
    seqs = []
    for i, text in enumerate(texts):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        seqs.append((prompt, target_ids(tok, text, max_length)))
    width = max(len(p) + len(t) for p, t in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (prompt, target) in enumerate(seqs):
        n, m = len(prompt), len(prompt) + len(target)
        ids[i, :m] = torch.tensor(prompt + target)
        mask[i, :m] = 1
        labels[i, n:m] = torch.tensor(target)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "input_features": enc["input_features"],
        "feature_attention_mask": enc["feature_attention_mask"],
    }


def target_nll(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """``(summed negative log-likelihood, count)`` of the labelled tokens, each predicted from the positions before
    it; the LM head runs only where a label follows."""
    import torch

    out = model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        input_features=batch["input_features"],
        feature_attention_mask=batch["feature_attention_mask"],
    )
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    hidden = out.last_hidden_state[:, :-1][keep]
    logits = model.lm_head(hidden).float()
    nll = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    return nll, keep.sum()


def lm_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, None]:
    """The mean negative log-likelihood per transcription token (see :func:`target_nll`)."""
    nll, count = target_nll(model, batch)
    return nll / count.clamp(min=1), None


def audio_frames(feature_attention_mask: Any, length: int) -> Any:
    """Which of the encoder's ``length`` output positions hold audio rather than padding ([B, length], bool):
    ``n = ((frames − 1) // 2 + 1 − 2) // 2 + 1`` per row, as Qwen2-Audio counts them."""
    import torch

    frames = feature_attention_mask.sum(-1)
    n = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    return torch.arange(length, device=n.device)[None, :] < n[:, None]


def audio_gate(gate: Any, feature_attention_mask: Any) -> Any:
    """A domain adapter's per-timestep gate ([B, T, 1], its ``last_gate``) at the real audio frames only (1-D)."""
    return gate[..., 0][audio_frames(feature_attention_mask.to(gate.device), gate.shape[1])]


# ------------------------------------------------------------------------------------------------ pelt predict


def audio_paths(rows: list[dict], where: str) -> list[str]:
    """Each row's recording: its ``audio`` column (or, for plain lines from stdin or a ``.txt`` file, the line),
    relative paths starting at the data file's directory (the working directory for stdin).

    Raises:
        DataError: a row without a path; every missing file at once.
    """
    lines = where == "<stdin>" or where.lower().endswith(".txt")
    col = "text" if lines and not any("audio" in r for r in rows) else "audio"
    base = Path(where).parent if Path(where).is_file() else Path.cwd()
    out, absent = [], []
    for i, r in enumerate(rows, 1):
        value = r.get(col)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if value is None else repr(value)
            raise DataError(f"{where}: row {i}: column {col!r} is {got}; expected the path of an audio file")
        f = Path(value.strip()).expanduser()
        f = f if f.is_absolute() else base / f
        out.append(str(f))
        if not f.is_file():
            absent.append(f"row {i} {f}")
    if absent:
        raise DataError(f"{where}: {len(absent)} audio file(s) do not exist: {'; '.join(absent[:5])}")
    return out


def generate(model: Any, speech: SpeechProcessor, waveforms: list[Any], opts: Any) -> list[str]:
    """Transcriptions of recordings whose prompts have one length (no padding): ``model.generate`` with the run's
    modules active, greedy or sampled as ``opts`` (:class:`pelt_cli.predict.GenerateOptions`) says; new tokens
    only, special tokens dropped."""
    import copy

    import torch

    enc = prompt_inputs(speech.processor, waveforms)
    tok = speech.tokenizer
    cfg = copy.deepcopy(model.generation_config)
    sampled = {"temperature": opts.temperature, "top_k": 0, "top_p": 1.0}
    cfg.update(
        max_new_tokens=opts.max_new_tokens,
        do_sample=opts.sample,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        **(sampled if opts.sample else {"temperature": None, "top_k": None, "top_p": None}),
    )
    device = next(model.parameters()).device
    keys = ("input_ids", "attention_mask", "input_features", "feature_attention_mask")
    with torch.inference_mode():
        out = model.generate(**{k: enc[k].to(device) for k in keys}, generation_config=cfg)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


def transcribe_rows(
    model: Any, tokenizer: Any, rows: list[dict], where: str, batch_size: int, opts: Any, on_batch: Any = None
) -> Iterator[dict[str, str]]:
    """``pelt predict`` on a speech-to-text run: ``{"generated": transcription}`` per row, in input order.

    Rows are read a window (16 batches) at a time; recordings of one length share a batch (equal prompts, no
    padding), so a row's output does not depend on the rows beside it.

    Raises:
        DataError: rows without readable audio.
        UsageError: a bad batch size or generation option.
    """
    if batch_size < 1 or opts.max_new_tokens < 1 or (opts.sample and not opts.temperature > 0):
        raise UsageError(
            f"--batch-size {batch_size}, --max-new-tokens {opts.max_new_tokens}, --temperature {opts.temperature}: "
            "expected ≥ 1, ≥ 1 and > 0"
        )
    speech = load_processor(None, tokenizer, model.config)
    paths = audio_paths(rows, where)
    return _transcribe(model, speech, paths, batch_size, opts, on_batch)


def _transcribe(
    model: Any, speech: SpeechProcessor, paths: list[str], batch_size: int, opts: Any, on_batch: Any
) -> Iterator[dict[str, str]]:
    import torch

    from pelt_cli.data import load_audio

    limit = int(speech.processor.feature_extractor.n_samples)
    torch.manual_seed(opts.seed)
    window = batch_size * 16
    for start in range(0, len(paths), window):
        waves = [load_audio(p, sr=speech.sampling_rate) for p in paths[start : start + window]]
        groups: dict[int, list[int]] = {}
        for i, y in enumerate(waves):
            groups.setdefault(min(len(y), limit), []).append(i)
        results = [""] * len(waves)
        for idx in groups.values():
            for b in range(0, len(idx), batch_size):
                chunk = idx[b : b + batch_size]
                for i, text in zip(chunk, generate(model, speech, [waves[i] for i in chunk], opts), strict=True):
                    results[i] = text
                if on_batch is not None:
                    on_batch(len(chunk), len(paths))
        yield from ({"generated": t} for t in results)
