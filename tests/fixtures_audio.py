"""Synthetic audio for tests and benches: laser/microphone WAV pairs and low/high tone classes, seeded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _envelope(rng: Any, n: int, sr: int, short: bool) -> Any:
    """A smooth random on/off envelope with slow amplitude wobble."""
    import numpy as np

    env = np.zeros(n)
    length = int(n * rng.uniform(0.1, 0.35) if short else n * rng.uniform(0.4, 0.9))
    start = int(rng.integers(0, n - length + 1))
    env[start : start + length] = np.sin(np.linspace(0, np.pi, length)) ** rng.uniform(0.3, 1.5)
    t = np.arange(n) / sr
    return env * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t + rng.uniform(0, 2 * np.pi)))


def _reference(rng: Any, n: int, sr: int) -> Any:
    """A "microphone" signal: 1–3 tones (150–3000 Hz) under an envelope (70%), else 1–3 noise bursts."""
    import numpy as np

    t = np.arange(n) / sr
    if rng.random() < 0.7:
        y = sum(
            rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * rng.uniform(150, 3000) * t + rng.uniform(0, 6.3))
            for _ in range(int(rng.integers(1, 4)))
        )
        y = y * _envelope(rng, n, sr, short=False)
    else:
        y = sum(rng.standard_normal(n) * _envelope(rng, n, sr, short=True) for _ in range(int(rng.integers(1, 4))))
    return 0.5 * y / max(float(np.abs(y).max()), 1e-9)


def synth_audio_pairs(out_dir: str | Path, n: int, seed: int = 0, seconds: float = 2.0, sr: int = 16000) -> Path:
    """Write ``n`` (source, reference) WAV pairs of the same content and a ``manifest.jsonl`` of relative paths.

    The reference ("microphone") is tones or noise bursts; the source ("laser vibrometer") is the same signal
    through a 300–1500 Hz band-pass (4th-order Butterworth, zero-phase) with a gain of 0.3–0.7 and broadband noise
    (σ 0.01–0.03). Pair ``i`` depends only on (seed, i). 16-bit PCM. Returns the manifest path.
    """
    import numpy as np
    import soundfile as sf
    from scipy.signal import butter, sosfiltfilt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sos = butter(4, [300, 1500], btype="bandpass", fs=sr, output="sos")
    samples = int(round(seconds * sr))
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        ref = _reference(rng, samples, sr)
        band = sosfiltfilt(sos, ref)
        src = rng.uniform(0.3, 0.7) * 0.5 * band / max(float(np.abs(band).max()), 1e-9)
        src = np.clip(src + rng.uniform(0.01, 0.03) * rng.standard_normal(samples), -1, 1)
        names = (f"src_{i:04d}.wav", f"ref_{i:04d}.wav")
        for name, y in zip(names, (src, ref), strict=True):
            sf.write(out / name, y.astype(np.float32), sr, subtype="PCM_16")
        lines.append(json.dumps({"source": names[0], "reference": names[1]}) + "\n")
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(lines))
    return manifest


def synth_audio_classes(
    out_dir: str | Path, n_per_class: int, seed: int = 0, seconds: float = 1.0, sr: int = 16000
) -> Path:
    """Write low (150–400 Hz) and high (2000–4000 Hz) tone WAVs and a ``manifest.jsonl`` of ``{audio, label}``."""
    import numpy as np
    import soundfile as sf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = int(round(seconds * sr))
    t = np.arange(samples) / sr
    lines = []
    for c, (label, lo, hi) in enumerate((("low", 150, 400), ("high", 2000, 4000))):
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, c, i])
            y = np.sin(2 * np.pi * rng.uniform(lo, hi) * t) * _envelope(rng, samples, sr, short=False)
            y = 0.5 * y / max(float(np.abs(y).max()), 1e-9) + 0.01 * rng.standard_normal(samples)
            name = f"{label}_{i:04d}.wav"
            sf.write(out / name, np.clip(y, -1, 1).astype(np.float32), sr, subtype="PCM_16")
            lines.append(json.dumps({"audio": name, "label": label}) + "\n")
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(lines))
    return manifest


SPEECH_WORDS = ("up", "down", "low", "high")  # the lexicon of synth_speech: one sound per word
PROMPT_WORDS = ("Detect", "the", "language", "and", "recognize", "speech:")


def _word_sound(word: str, n: int, sr: int, rng: Any) -> Any:
    """One "spoken" word: a rising or falling chirp, or a low or high tone, under a smooth envelope."""
    import numpy as np

    t = np.arange(n) / sr
    if word in ("up", "down"):
        f0, f1 = (300.0, 1500.0) if word == "up" else (1500.0, 300.0)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * t[-1]))  # linear chirp f0 → f1
    else:
        phase = 2 * np.pi * rng.uniform(*((200, 300) if word == "low" else (2500, 3500))) * t
    return np.sin(phase) * np.sin(np.linspace(0, np.pi, n)) ** 0.5


def synth_speech(out_dir: str | Path, n: int, seed: int = 0, word_seconds: float = 0.3, sr: int = 16000) -> Path:
    """Write ``n`` WAVs of 1–3 "words" (see :data:`SPEECH_WORDS`, 0.1 s of near-silence between them) and a
    ``manifest.jsonl`` of ``{"audio": relative path, "text": the words}``. Row ``i`` depends only on (seed, i)."""
    import numpy as np
    import soundfile as sf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gap, length = np.zeros(int(0.1 * sr)), int(word_seconds * sr)
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        words = [SPEECH_WORDS[int(k)] for k in rng.integers(0, len(SPEECH_WORDS), int(rng.integers(1, 4)))]
        y = np.concatenate([gap] + [np.concatenate([_word_sound(w, length, sr, rng), gap]) for w in words])
        y = 0.5 * y + 0.005 * rng.standard_normal(y.size)
        name = f"utt_{i:04d}.wav"
        sf.write(out / name, np.clip(y, -1, 1).astype(np.float32), sr, subtype="PCM_16")
        lines.append(json.dumps({"audio": name, "text": " ".join(words)}) + "\n")
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(lines))
    return manifest


def speech_tokenizer(out: str | Path, audio_token_id: int = 99) -> Path:
    """A word-level stand-in for Qwen2-Audio's tokenizer, saved with ``save_pretrained`` into ``out``: 100 tokens,
    ``<|endoftext|>`` (eos and pad), ``<|audio_bos|>``, ``<|audio_eos|>`` and ``<|AUDIO|>`` (id ``audio_token_id``,
    the tiny model's) as special tokens, the prompt's words, :data:`SPEECH_WORDS` and fillers."""
    import tokenizers
    import transformers

    head = ["<|endoftext|>", "<unk>", "<|audio_bos|>", "<|audio_eos|>", *PROMPT_WORDS, *SPEECH_WORDS]
    vocab = {w: i for i, w in enumerate(head + [f"w{i}" for i in range(audio_token_id - len(head))])}
    vocab["<|AUDIO|>"] = audio_token_id
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"]})
    fast.save_pretrained(out)
    return Path(out)


def speech_model(out: str | Path, lm_std: float = 0.3, head_std: float = 0.2, seed: int = 1) -> Path:
    """The tiny Qwen2-Audio of tiny_models with its language model's linear layers redrawn from N(0, lm_std²) and
    its LM head from N(0, head_std²) (seeded), and :func:`speech_tokenizer`; saved into ``out``.

    At transformers' init (std 0.02) the tiny language model hardly reads its audio positions: unit noise added to
    the projector's input moves the transcription loss of 8 synth_speech rows by ≤ 0.004 nats (5 draws), so no
    adapter upstream could lower it. With these weights the same noise moves it by 0.02–0.76 nats."""
    import tiny_models
    import torch

    model = tiny_models.build("qwen2_audio")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.model.language_model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * lm_std)
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * head_std)
    model.save_pretrained(out)
    return speech_tokenizer(out, audio_token_id=model.config.audio_token_id)
