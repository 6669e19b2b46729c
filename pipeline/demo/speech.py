"""Speech for the demo corpus: espeak-ng (the espeakng-loader wheel's library, called through ctypes),
resampled to 16 kHz with light seeded background noise; a process pool writes the WAV files."""
from __future__ import annotations

import _ctypes
import ctypes
import functools
import math
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.demo.pool import run_jobs

ESPEAK_SAMPLE_RATE = 22_050  # Hz: what espeak-ng synthesises
SAMPLE_RATE = 16_000  # Hz: what the corpus stores, like the Flickr 8k Audio Caption Corpus
SNR_DB = (25.0, 35.0)  # range of the background noise's signal-to-noise ratio, dB
PAD_S = (0.1, 0.35)  # range of the noise-only lead-in and tail, seconds
PEAK = (0.35, 0.8)  # range of the speech's peak amplitude (full scale 1): speakers are not equally loud
NOISE_CORNER_HZ = 100.0  # the noise is pink (power ~ 1/f) above this frequency, flat below
NOISE_BANK_S = 30.0  # seconds of pink noise that utterances take their background noise from
NOISE_BANK_SEED = 2021

# espeak-ng's C API (speak_lib.h): enum values used below.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_RATE, _PITCH = 1, 3
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events)
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: espeak-ng voice ("en-us", or with a variant from espeak-ng-data/voices/!v such
    as "en-us+f2"), speaking rate in words per minute (80..450) and base pitch (0..99, espeak-ng's
    default 50)."""
    id: int
    name: str
    voice: str
    rate: int = 175
    pitch: int = 50

    def __post_init__(self):
        if self.id < 0:
            raise ValueError(f"speaker id must be >= 0, got {self.id}")
        if not self.voice or any(c.isspace() for c in self.voice):
            raise ValueError(f"speaker {self.name!r}: voice must be an espeak-ng voice name, "
                             f"got {self.voice!r}")
        if not 80 <= self.rate <= 450:
            raise ValueError(f"speaker {self.name!r}: rate must be 80..450 words per minute, got {self.rate}")
        if not 0 <= self.pitch <= 99:
            raise ValueError(f"speaker {self.name!r}: pitch must be 0..99, got {self.pitch}")


# Ten speakers: American, British, Scottish, New York and Caribbean English; male and female variants; the
# Klatt formant synthesiser; rates from 150 to 195 wpm and pitches from 35 to 70.
SPEAKERS: tuple[Speaker, ...] = (
    Speaker(0, "us-male", "en-us", 165, 45),
    Speaker(1, "us-female", "en-us+f2", 175, 60),
    Speaker(2, "gb-male-slow", "en+m3", 150, 40),
    Speaker(3, "gb-rp-female-fast", "en-gb-x-rp+f4", 185, 65),
    Speaker(4, "us-male-fast", "en-us+m1", 190, 50),
    Speaker(5, "scottish-female", "en-gb-scotland+f3", 160, 55),
    Speaker(6, "nyc-male-low", "en-us-nyc+m7", 170, 35),
    Speaker(7, "caribbean-female-slow", "en-029+f1", 155, 70),
    Speaker(8, "us-klatt", "en-us+klatt2", 175, 50),
    Speaker(9, "us-female-fast", "en-us+f5", 195, 60),
)


class Espeak:
    """espeak-ng in this process, synchronous, returning int16 samples at 22,050 Hz. One per process (the
    library keeps global state); use `engine()`."""

    def __init__(self):
        import espeakng_loader  # only the speaking processes need it

        self.library_path = espeakng_loader.get_library_path()
        self.data_path = espeakng_loader.get_data_path()
        self._variants = set(os.listdir(Path(self.data_path) / "voices" / "!v"))
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept referenced: C holds a pointer to it
        self._lib = None
        self._used = False
        self._load()
        self._lib.espeak_Info.restype = ctypes.c_char_p
        self.version = self._lib.espeak_Info(None).decode()
        self._check_fresh_state()

    def _collect(self, wav, n: int, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = go on synthesising

    def _load(self) -> None:
        # espeak-ng keeps state between utterances that espeak_Terminate does not reset (pitch flutter phase,
        # gain control, ...): the same text then sounds slightly different depending on what this process
        # said before. Unloading and reloading the library (~0.5 ms) restores its initial state, so that an
        # utterance depends only on its text, speaker and seed, not on which worker spoke it after what.
        self.close()
        lib = ctypes.CDLL(self.library_path)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(),
                                     _INITIALIZE_DONT_EXIT)
        if rate != ESPEAK_SAMPLE_RATE:
            _ctypes.dlclose(lib._handle)
            raise RuntimeError(f"espeak-ng at {self.library_path} (data {self.data_path}) failed to start or "
                               f"synthesises at {rate} Hz instead of {ESPEAK_SAMPLE_RATE}; "
                               "reinstall espeakng-loader")
        lib.espeak_SetSynthCallback(self._callback)
        self._lib, self._used = lib, False

    def close(self) -> None:
        """Terminate espeak-ng and unload the library (a later speak() reloads it)."""
        if self._lib is not None:
            self._lib.espeak_Terminate()
            _ctypes.dlclose(self._lib._handle)
            self._lib = None

    def _check_fresh_state(self) -> None:
        # If something else in this process holds the library too, dlclose does not unload it and the
        # reload above silently stops resetting it: find out now rather than ship history-dependent audio.
        probe = Speaker(0, "probe", "en-us+f2")
        first, second = self.speak("one two", probe), self.speak("one two", probe)
        if not np.array_equal(first, second):
            raise RuntimeError(f"espeak-ng at {self.library_path} is loaded elsewhere in this process, so "
                               "its state cannot be reset between utterances; speak from a process that "
                               "loads it only through pipeline.demo.speech")

    def check_voice(self, voice: str) -> None:
        """Raise ValueError naming `voice` unless espeak-ng knows it (language and variant)."""
        # espeak_SetVoiceByName rejects an unknown language but accepts an unknown "+variant" and then speaks
        # the plain voice, so variants are checked against the data folder.
        variant = voice.partition("+")[2]
        if variant and variant not in self._variants:
            raise ValueError(f"unknown espeak-ng voice {voice!r}: no variant {variant!r} in "
                             f"{Path(self.data_path) / 'voices' / '!v'}; pick one of the files there "
                             "(e.g. f2, m3)")
        if self._lib is None:
            self._load()
        self._used = True  # any call may change the library's state: speak() reloads first
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"unknown espeak-ng voice {voice!r}: espeak_SetVoiceByName refused it (an "
                             "unknown voice keeps the previous one); use a language such as en-us, en, "
                             "en-gb-x-rp")

    def speak(self, text: str, speaker: Speaker, seed: int = 0) -> np.ndarray:
        """Synthesise `text`: int16 samples (S,) at ESPEAK_SAMPLE_RATE Hz. `seed` (0 <= seed < 2**31) drives
        espeak-ng's own noise (breathy voices such as +f2): same arguments, same samples."""
        if not text.strip():
            raise ValueError("cannot synthesise an empty text")
        if self._used or self._lib is None:
            self._load()
        self.check_voice(speaker.voice)
        lib = self._lib
        # espeak_Initialize seeds this generator from the clock; breathy variants would differ run to run.
        lib.espeak_ng_SetRandSeed(seed)
        for name, param, value in (("rate", _RATE, speaker.rate), ("pitch", _PITCH, speaker.pitch)):
            if lib.espeak_SetParameter(param, value, 0) != 0:
                raise ValueError(f"espeak-ng refused {name}={value} for voice {speaker.voice!r}")
        self._chunks.clear()
        data = text.encode("utf-8")
        status = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != 0 or lib.espeak_Synchronize() != 0:
            raise RuntimeError(f"espeak-ng failed (status {status}) on {text!r} with voice {speaker.voice!r}")
        if not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} with voice {speaker.voice!r}")
        return np.concatenate(self._chunks)


_ENGINE: Espeak | None = None


def engine() -> Espeak:
    """This process's espeak-ng (started on first use)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Espeak()
    return _ENGINE


@functools.lru_cache(maxsize=4)
def _sinc_taps(orig: int, new: int, lowpass_filter_width: int, rolloff: float
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """torchaudio's Hann-windowed sinc kernels for gcd-reduced rates, kept to their support: taps (new, L),
    first input offset of each output phase (new,), and the padding width. Outside the support the window
    is cos(pi/2)^2 ~ 1e-33, so dropping it changes nothing measurable and saves ~25x the work."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    t = np.arange(0, -new, -1)[:, None] / new + np.arange(-width, width + orig)[None, :] / orig
    t = t * base
    support = np.abs(t) < lowpass_filter_width
    t = np.clip(t, -lowpass_filter_width, lowpass_filter_width)
    window = np.cos(t * np.pi / lowpass_filter_width / 2) ** 2
    t *= np.pi
    kernel = np.where(t == 0, 1.0, np.sin(t) / np.where(t == 0, 1.0, t)) * window * (base / orig)
    first = support.argmax(axis=1)
    n_taps = int((support.shape[1] - support[:, ::-1].argmax(axis=1) - first).max())
    idx = np.minimum(first[:, None] + np.arange(n_taps)[None, :], kernel.shape[1] - 1)
    inside = idx < first[:, None] + support.sum(axis=1)[:, None]
    taps = np.where(inside, np.take_along_axis(kernel, idx, 1), 0.0)
    return taps, first, width


def resample(x: np.ndarray, orig_sr: int = ESPEAK_SAMPLE_RATE, new_sr: int = SAMPLE_RATE,
             lowpass_filter_width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Band-limited resampling of x (S,) from orig_sr to new_sr Hz -> float64 (ceil(S * new_sr / orig_sr),).
    The windowed-sinc (Hann) filter of torchaudio.functional.resample with its defaults, in numpy float64:
    the same input gives the same output whatever the thread count, so the int16 files are reproducible."""
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g  # 441 -> 320 for 22,050 -> 16,000 Hz
    taps, first, width = _sinc_taps(orig, new, lowpass_filter_width, rolloff)
    n_out = math.ceil(new * len(x) / orig)
    n_frames = -(-n_out // new)  # each frame of `orig` inputs gives `new` outputs
    padded = np.pad(np.asarray(x, dtype=np.float64), (width, width + orig + taps.shape[1]))
    # Output f * new + j reads inputs f * orig + first[j] + k, k < n_taps, through taps[j, k].
    starts = np.arange(n_frames)[:, None] * orig + first[None, :]  # (frames, new)
    out = np.zeros(starts.shape)
    for k in range(taps.shape[1]):
        out += padded[starts + k] * taps[:, k]
    return out.reshape(-1)[:n_out]


def _smooth_length(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n."""
    best, p5 = 1 << max(n - 1, 0).bit_length(), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35 << max(0, (-(-n // p35) - 1).bit_length())  # times the smallest power of two reaching n
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


@functools.lru_cache(maxsize=1)
def _pink_bank() -> np.ndarray:
    """Unit-RMS pink noise (NOISE_BANK_S * SAMPLE_RATE,) float64, power ~ 1/f above NOISE_CORNER_HZ and flat
    below; the same in every process (fixed seed)."""
    n = _smooth_length(int(NOISE_BANK_S * SAMPLE_RATE))  # numpy's FFT is slow for large prime factors
    spectrum = np.fft.rfft(np.random.default_rng(NOISE_BANK_SEED).standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum /= np.sqrt(np.maximum(freqs, NOISE_CORNER_HZ) / NOISE_CORNER_HZ)
    spectrum[0] = 0
    pink = np.fft.irfft(spectrum, n)
    pink /= np.sqrt(np.mean(pink ** 2))
    pink.setflags(write=False)
    return pink


def background_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise (n,) float64: pink noise plus a little white hiss, like a room and a cheap microphone.
    The pink part is a stretch of a shared bank at a random offset (an FFT per utterance would cost more
    than the speech synthesis); the hiss is drawn fresh."""
    bank = _pink_bank()
    if n > len(bank):
        bank = np.resize(bank, n)
    start = int(rng.integers(len(bank) - n + 1))
    noise = bank[start:start + n] + 0.3 * rng.standard_normal(n)
    return noise / np.sqrt(np.mean(noise ** 2))


def synthesize(text: str, speaker: Speaker, seed: int | Sequence[int] = 0) -> np.ndarray:
    """Speak `text` -> int16 (S,) at SAMPLE_RATE Hz: espeak-ng, resampled, scaled to a random peak level,
    padded with a short noise-only lead-in and tail, with background noise at a random SNR in SNR_DB.
    `seed` drives the level, pads and noise: the same (text, speaker, seed) gives the same samples."""
    rng = np.random.default_rng(seed)
    raw = engine().speak(text, speaker, seed=int(rng.integers(2 ** 31)))
    speech = resample(raw / 32768.0)
    peak = np.abs(speech).max()
    if peak == 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r} with voice {speaker.voice!r}")
    speech *= rng.uniform(*PEAK) / peak
    power = np.mean(speech ** 2)
    lead, tail = (rng.uniform(*PAD_S, size=2) * SAMPLE_RATE).astype(int)
    speech = np.pad(speech, (lead, tail))
    snr_db = rng.uniform(*SNR_DB)
    noisy = speech + background_noise(len(speech), rng) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(np.rint(noisy * 32767), -32768, 32767).astype(np.int16)


@dataclass(frozen=True)
class SpeechJob:
    """One utterance to write: WAV path, text, speaker and noise seed."""
    path: str
    text: str
    speaker: Speaker
    seed: tuple[int, ...]


def _init_worker() -> None:
    global _ENGINE
    # A forked worker inherits the parent's engine, library mapping included: unload it, so that the
    # worker's own engine is the only holder of the library and its reloads reset it.
    if _ENGINE is not None:
        _ENGINE.close()
        _ENGINE = None
    engine()


def write_wav(path: str | os.PathLike, samples: np.ndarray) -> None:
    """Write int16 samples (S,) as a 16 kHz mono 16-bit PCM WAV file."""
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise ValueError(f"{path}: expected int16 samples (S,), got {samples.dtype} {samples.shape}")
    # The wave module rather than soundfile: soundfile fsyncs every file on close (~4 ms each).
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def _write_job(job: SpeechJob) -> int:
    try:
        samples = synthesize(job.text, job.speaker, job.seed)
        write_wav(job.path, samples)
    except Exception as e:  # the pool's traceback would not say which file
        raise RuntimeError(f"{job.path}: could not synthesise {job.text!r} with voice {job.speaker.voice!r}: "
                           f"{e}") from e
    return len(samples)


def synthesize_files(jobs: Sequence[SpeechJob], workers: int = 2, progress: bool = True) -> list[int]:
    """Write every job's WAV (16 kHz mono PCM_16) with `workers` processes (1: in this process); returns the
    sample counts in job order. Each worker starts espeak-ng once."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for voice in sorted({job.speaker.voice for job in jobs}):
        engine().check_voice(voice)  # fail before starting a pool, with the voice's name
    return list(run_jobs(_write_job, jobs, workers, "speech", "utt", chunksize=8, initializer=_init_worker,
                         progress=progress))
