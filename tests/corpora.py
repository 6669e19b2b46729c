"""Tiny corpora that tests write themselves, in the Flickr8k layout (REFERENCE.md §5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def speechlike(rng: np.random.Generator, seconds: float, sr: int = 16000) -> np.ndarray:
    """Voiced-speech-like audio: harmonics of a moving f0 under a syllable envelope, with silence around."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 110 + 40 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t) + rng.uniform(0, 60)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(2, 5) * t), 0, None) ** 0.5
    pad = np.zeros(int(0.15 * sr))
    x = np.concatenate([pad, 0.2 * voiced * envelope + 0.002 * rng.standard_normal(n), pad])
    return x.astype(np.float32)


def write_tiny_flickr(root: Path, images: int = 12, seed: int = 0, splits=(0.5, 0.25, 0.25)) -> Path:
    """`images` coloured-square JPEGs x 5 spoken captions; split lists cut in the given proportions."""
    rng = np.random.default_rng(seed)
    text, audio, jpegs = root / "Flickr8k_text", root / "flickr_audio", root / "Flicker8k_Dataset"
    for d in (text, audio / "wavs", jpegs):
        d.mkdir(parents=True, exist_ok=True)
    ids = [f"{1000 + i}_{i:04x}" for i in range(images)]
    n_train = max(1, int(images * splits[0]))
    n_dev = max(1, int(images * splits[1]))
    parts = {"train": ids[:n_train], "dev": ids[n_train:n_train + n_dev], "test": ids[n_train + n_dev:]}
    for split, name in (("train", "trainImages"), ("dev", "devImages"), ("test", "testImages")):
        (text / f"Flickr_8k.{name}.txt").write_text("".join(f"{i}.jpg\n" for i in parts[split]))
    tokens, capt, spk = [], [], []
    names = list(COLOURS)
    for k, image in enumerate(ids):
        colour = names[k % len(names)]
        pixels = np.full((64, 64, 3), COLOURS[colour], np.uint8)
        pixels[16:48, 16:48] = 255 - pixels[16:48, 16:48]
        Image.fromarray(pixels).save(jpegs / f"{image}.jpg", quality=90)
        for n in range(5):
            wav = f"{image}_{n}.wav"
            tokens.append(f"{image}.jpg#{n}\tA {colour} square number {n} on a white field .")
            capt.append(f"{wav} {image}.jpg #{n}")
            spk.append(f"{wav} {n % 3}")
            sf.write(audio / "wavs" / wav, speechlike(rng, rng.uniform(0.4, 1.2)), 16000, subtype="PCM_16")
    (text / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (audio / "wav2capt.txt").write_text("\n".join(capt) + "\n")
    (audio / "wav2spk.txt").write_text("\n".join(spk) + "\n")
    (root / "keywords.txt").write_text("\n".join(names) + "\nsquare\nfield\n")
    return root
