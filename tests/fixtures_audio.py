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
