"""Audio loading: any WAV/FLAC file -> one 16 kHz mono float32 waveform, or an AudioError naming the file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000  # Hz: every feature recipe expects this rate


class AudioError(Exception):
    """An utterance that cannot become features; `.reason` is short enough for failures.jsonl.

    `path` is optional because the feature functions see only the waveform; the message always names the
    path when one is known (soundfile's own messages may not: REFERENCE.md §7).
    """

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(reason if self.path is None else f"{self.path}: {reason}")


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE,
               resampled: dict[int, int] | None = None) -> torch.Tensor:
    """Read an audio file as mono float32 [S] in [-1, 1] at `sample_rate` Hz.

    Integer PCM (16/24/32-bit) and float WAV/FLAC are read through soundfile; channels are averaged; a
    file at another rate is resampled with torchaudio's band-limited sinc resampler.
    Raises AudioError (message and `.path` name the file) for a missing, unreadable, empty, non-finite
    or all-zero file. `resampled`, where given, counts the files at each other rate.
    """
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int in Hz, got {sample_rate!r}")
    path = Path(path)
    if not path.is_file():
        raise AudioError("a folder, not a file" if path.is_dir() else "missing file", path)
    if path.stat().st_size == 0:   # soundfile would call it "unreadable: format not recognised"
        raise AudioError("empty file (0 bytes)", path)
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [S, C]
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"unreadable: {err}", path) from err
    if data.shape[0] == 0:
        raise AudioError("empty (0 samples)", path)
    if not np.isfinite(data).all():
        raise AudioError("contains NaN or Inf samples", path)
    wave = torch.from_numpy(data[:, 0] if data.shape[1] == 1 else data.mean(axis=1))
    if file_rate != sample_rate:
        wave = AF.resample(wave, orig_freq=int(file_rate), new_freq=sample_rate)
        if resampled is not None:
            resampled[int(file_rate)] = resampled.get(int(file_rate), 0) + 1
    if not bool(wave.any()):
        raise AudioError("silent (all samples zero)", path)
    if float(wave.abs().max()) < 2.0 ** -15:
        # checked after mixing: opposite-phase stereo channels cancel to a mono signal of rounding residue
        # (16-bit's -32768 has no +32768), which peak normalisation would blow up into features of noise
        raise AudioError("silent (no sample reaches one 16-bit step, e.g. stereo channels in opposite phase)",
                         path)
    return wave.to(torch.float32).contiguous()
