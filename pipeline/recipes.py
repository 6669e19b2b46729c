"""The feature recipes' settings: one frozen, validated config dataclass per recipe (mfcc-seed, mfcc-kaldi,
fbank), saved with every cache; the maths that uses them is in pipeline/features.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.audio import SAMPLE_RATE


def _check(ok: bool, field: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"feature option {field}={value!r} is invalid: {rule}")


class _Recipe:
    """What the config dataclasses below share: type checks, min_samples, to_dict."""

    name: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the maths changes, so caches made before are refused
    _positive: ClassVar[tuple[str, ...]] = ()  # fields that must be > 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            ok = {"int": type(v) is int, "float": type(v) in (int, float), "bool": type(v) is bool,
                  "str": type(v) is str}[f.type]
            _check(ok, f.name, v, f"expected {f.type}")
            _check(f.name not in self._positive or v > 0, f.name, v, "must be > 0")
        _check(self.win >= 2, "win", self.win, "the analysis window must be at least 2 samples long")
        self._validate()

    def _validate(self) -> None:
        """Checks specific to one recipe."""

    @property
    def min_samples(self) -> int:
        """One full analysis window: centred framing would make a 'frame' of 1 sample and zero padding."""
        return self.win

    def to_dict(self) -> dict[str, Any]:
        """Name, version and every setting; `recipe_from_dict` inverts it."""
        return {"name": self.name, "version": self.version, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class MfccSeedConfig(_Recipe):
    """The seed author's librosa MFCCs (REFERENCE.md §2); frames are centred (T = 1 + S_trimmed // hop).

    Under delta_width frames, where librosa.feature.delta raises, deltas replicate the edge frames
    (savgol mode 'nearest'); from delta_width frames on they equal librosa's mode 'interp'.
    """

    name: ClassVar[str] = "mfcc-seed"
    _positive = ("sample_rate", "top_db", "trim_frame", "trim_hop", "peak", "n_mfcc", "n_mels", "hop")
    sample_rate: int = SAMPLE_RATE
    top_db: float = 20.0  # trim: frames this far below the loudest frame's power are silence
    trim_frame: int = 2048  # trim analysis frame and hop, in samples (librosa.effects.trim defaults)
    trim_hop: int = 512
    peak: float = 0.5  # peak amplitude after normalisation
    preemph: float = 0.97
    n_mfcc: int = 13
    n_mels: int = 80
    win: int = 400  # samples; also the FFT size and the RMS frame
    hop: int = 160
    delta_width: int = 9  # Savitzky-Golay window in frames (librosa.feature.delta)
    normalise: bool = True

    def _validate(self) -> None:
        _check(self.peak <= 1, "peak", self.peak, "in (0, 1]")
        _check(0 <= self.preemph < 1, "preemph", self.preemph, "in [0, 1)")
        _check(self.n_mfcc <= self.n_mels, "n_mfcc", self.n_mfcc, f"at most n_mels={self.n_mels}")
        _check(self.delta_width >= 3 and self.delta_width % 2 == 1, "delta_width", self.delta_width,
               "an odd int >= 3")

    @property
    def dims(self) -> int:
        return 3 * self.n_mfcc


@dataclass(frozen=True)
class MfccKaldiConfig(_Recipe):
    """Kaldi compute-mfcc-feats defaults (povey window, snip_edges: T = 1 + (S - win) // hop) + deltas."""

    name: ClassVar[str] = "mfcc-kaldi"
    _positive = ("sample_rate", "num_ceps", "frame_length_ms", "frame_shift_ms", "delta_window", "wave_scale")
    sample_rate: int = SAMPLE_RATE
    num_ceps: int = 13
    num_mel_bins: int = 23
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemph: float = 0.97
    cepstral_lifter: float = 22.0
    low_freq: float = 20.0  # Hz
    high_freq: float = 0.0  # Hz; <= 0 is an offset from Nyquist, as in Kaldi
    delta_window: int = 2  # frames each side (Kaldi add-deltas --delta-window)
    wave_scale: float = 32768.0  # Kaldi reads 16-bit PCM as integers: scale [-1, 1] audio to that range
    normalisation: str = "utterance"  # "utterance" | "speaker" (raw; extract writes speaker_cmvn.json) | "none"

    def _validate(self) -> None:
        _check(self.num_mel_bins > 3, "num_mel_bins", self.num_mel_bins, "an int > 3")
        _check(self.num_ceps <= self.num_mel_bins, "num_ceps", self.num_ceps,
               f"at most num_mel_bins={self.num_mel_bins}")
        _check(self.hop >= 1, "frame_shift_ms", self.frame_shift_ms, "at least 1 sample long")
        _check(0 <= self.preemph <= 1, "preemph", self.preemph, "in [0, 1]")
        _check(self.cepstral_lifter >= 0, "cepstral_lifter", self.cepstral_lifter, ">= 0 (0 = off)")
        nyquist = self.sample_rate / 2
        high = self.high_freq if self.high_freq > 0 else nyquist + self.high_freq
        _check(0 <= self.low_freq < high <= nyquist, "low_freq/high_freq", (self.low_freq, self.high_freq),
               f"need 0 <= low < high <= Nyquist ({nyquist} Hz); high <= 0 counts back from Nyquist")
        _check(self.normalisation in ("utterance", "speaker", "none"), "normalisation", self.normalisation,
               "one of 'utterance', 'speaker', 'none'")

    @property
    def win(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)  # truncation, as torchaudio/Kaldi do

    @property
    def hop(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def dims(self) -> int:
        return 3 * self.num_ceps


@dataclass(frozen=True)
class FbankConfig(_Recipe):
    """Log-mel filterbanks: periodic hann, centred frames (T = 1 + S // hop), HTK mel, log(mel + offset)."""

    name: ClassVar[str] = "fbank"
    _positive = ("sample_rate", "hop", "log_offset")
    sample_rate: int = SAMPLE_RATE
    n_mels: int = 80
    win: int = 400  # samples; also the FFT size
    hop: int = 160
    log_offset: float = 1e-6
    normalise: bool = True

    def _validate(self) -> None:
        _check(self.n_mels in (40, 80), "n_mels", self.n_mels, "40 or 80")

    @property
    def dims(self) -> int:
        return self.n_mels


Recipe = MfccSeedConfig | MfccKaldiConfig | FbankConfig
RECIPES: dict[str, type] = {c.name: c for c in (MfccSeedConfig, MfccKaldiConfig, FbankConfig)}


def get_recipe(name: str, **options: Any) -> Recipe:
    """The config of recipe `name` with `options` overriding its defaults."""
    if name not in RECIPES:
        raise ValueError(f"unknown feature recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    cls = RECIPES[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for recipe {name!r}; "
                         f"its options are: {', '.join(known)}")
    return cls(**options)


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Inverse of `cfg.to_dict()`; refuses a dict written by another version of the recipe."""
    d = dict(d)
    name, version = d.pop("name", None), d.pop("version", None)
    if name in RECIPES and version != RECIPES[name].version:
        raise ValueError(f"features were made with {name} version {version}, this code has version "
                         f"{RECIPES[name].version}: re-run the extract-audio stage")
    return get_recipe(name, **d)
