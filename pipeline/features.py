"""Feature recipes (mfcc-seed, mfcc-kaldi, fbank): a pure function each (its config in pipeline/recipes.py),
wave [S] -> features [T, dims]; `compute_batch` runs the same maths on a padded batch (e.g. on a GPU)."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torchaudio.compliance import kaldi

from pipeline.audio import AudioError
from pipeline.recipes import FbankConfig, MfccKaldiConfig, MfccSeedConfig, Recipe

NORM_EPS = 1e-5  # per-utterance normalisation: (x - mean) / (std + NORM_EPS), std with ddof=0 (numpy's)
SEED_AMIN = 1e-10  # librosa.power_to_db floor on mel power
SEED_MEL_TOP_DB = 80.0  # librosa.power_to_db: each utterance's log-mel is clipped 80 dB below its maximum
KALDI_EPS = torch.finfo(torch.float32).eps  # Kaldi's floor on mel energies before the log


# ---- shared batched building blocks: x [B, T, D] with valid frame counts n_frames [B] ----

Batch = tuple[torch.Tensor, torch.Tensor]  # features [B, T, D] (frames past n_frames are junk), n_frames [B]


def _frame_mask(n_frames: torch.Tensor, t_max: int) -> torch.Tensor:
    """[B, T] bool, True on each utterance's own frames."""
    return torch.arange(t_max, device=n_frames.device)[None, :] < n_frames[:, None]


def _mvn(x: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    """Per-utterance, per-dim (x - mean) / (std + NORM_EPS) over valid frames; padded frames are garbage."""
    mask = _frame_mask(n_frames, x.shape[1])[..., None].to(x.dtype)
    n = n_frames.to(x.dtype)[:, None, None]
    mean = (x * mask).sum(1, keepdim=True) / n
    std = ((((x - mean) * mask) ** 2).sum(1, keepdim=True) / n).sqrt()
    return (x - mean) / (std + NORM_EPS)


def _smooth(x: torch.Tensor, n_frames: torch.Tensor, taps: list[torch.Tensor], hold_edges: bool
            ) -> list[torch.Tensor]:
    """For each filter in `taps` (all of one odd length K): sum_k taps[k] * x[t + k - h], frame indices
    clamped into each utterance (edge replication). One gather of the K shifted copies [B, T, K, D] serves
    every filter (mfcc-seed's deltas and delta-deltas share it).

    hold_edges: when an utterance has >= K frames, its first/last h frames copy the value at
    frame h / T-1-h (savgol mode='interp' for polyorder == deriv). Shorter ones keep edge replication.
    """
    width = len(taps[0])
    h = (width - 1) // 2
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    last = (n_frames - 1)[:, None]
    centre = t.expand(len(n_frames), -1)
    if hold_edges:
        long_enough = (n_frames >= width)[:, None]
        centre = torch.where(long_enough, torch.minimum(centre.clamp(min=h), last - h), centre)
    offsets = torch.arange(-h, h + 1, device=x.device)
    idx = torch.minimum((centre[..., None] + offsets).clamp(min=0), last[..., None])   # [B, T, K]
    shifted = torch.gather(x, 1, idx.flatten(1)[..., None].expand(-1, -1, x.shape[2]))  # [B, T*K, D]
    shifted = shifted.view(x.shape[0], x.shape[1], width, x.shape[2])
    return [torch.einsum("btkd,k->btd", shifted, k) for k in taps]


def _stft_power(waves: torch.Tensor, win: int, hop: int) -> torch.Tensor:
    """[B, S] -> |STFT|^2 [B, T, win//2+1]; periodic hann, FFT size = win, centred with zero padding."""
    window = torch.hann_window(win, periodic=True, device=waves.device, dtype=waves.dtype)
    spec = torch.stft(waves, n_fft=win, hop_length=hop, window=window, center=True, pad_mode="constant",
                      return_complex=True)
    return (spec.real ** 2 + spec.imag ** 2).transpose(1, 2)


@functools.lru_cache(maxsize=32)
def _mel_filters(sample_rate: int, n_fft: int, n_mels: int, slaney: bool) -> torch.Tensor:
    """[n_fft//2+1, n_mels]: slaney scale and norm (librosa.filters.mel's defaults) or HTK scale, no norm."""
    kind = dict(norm="slaney", mel_scale="slaney") if slaney else dict(norm=None, mel_scale="htk")
    return AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, **kind)


@functools.lru_cache(maxsize=32)
def _savgol_taps(width: int, deriv: int) -> torch.Tensor:
    """[width] float32: derivative `deriv` at the centre of a least-squares polynomial of that order."""
    n = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    vander = n[:, None] ** torch.arange(deriv + 1, dtype=torch.float64)[None, :]
    return (math.factorial(deriv) * torch.linalg.pinv(vander)[deriv]).to(torch.float32)


# ---- mfcc-seed ----

def _seed_prepare(wave: torch.Tensor, cfg: MfccSeedConfig) -> torch.Tensor:
    """Trim (librosa.effects.trim), peak-normalise, pre-emphasise one wave [S] -> [S'] (S' <= S)."""
    # Trim: frame k (centred, zero padded) is speech when its mean power is within top_db of the loudest
    # frame's (both floored at 1e-10 like librosa). The loudest frame always qualifies, so nothing is
    # ever trimmed to zero length; an all-quiet wave (RMS < 1e-5 everywhere) is kept whole.
    # Frame sums come from a running sum of the squared samples (float64: exact enough at any length),
    # one pass over the wave instead of trim_frame / trim_hop = 4 with a pooling window.
    half = cfg.trim_frame // 2
    energy = F.pad(torch.cumsum(wave.double() ** 2, 0), (half + 1, 0))  # [i]: sum of x^2 before i - half
    n_trim = 1 + len(wave) // cfg.trim_hop
    starts = torch.arange(n_trim, device=wave.device) * cfg.trim_hop
    stops = (starts + cfg.trim_frame).clamp(max=len(energy) - 1)            # past the end: zero padding
    power = ((energy[stops] - energy[starts]) / cfg.trim_frame).clamp(min=SEED_AMIN)
    speech = torch.nonzero(power > power.max() * 10.0 ** (-cfg.top_db / 10.0))[:, 0]
    start, end = int(speech[0]) * cfg.trim_hop, min(len(wave), (int(speech[-1]) + 1) * cfg.trim_hop)
    y = wave[start:end]
    if len(y) < cfg.min_samples:
        raise AudioError(f"too short for one frame: {len(y)} samples after trimming silence "
                         f"(need {cfg.min_samples})")
    peak = y.abs().max()
    if peak == 0:
        raise AudioError("silent (all samples zero)")
    y = cfg.peak * y / peak
    if cfg.preemph == 0:
        return y
    # librosa.effects.preemphasis seeds lfilter's state with zi = 2*y[0] - y[1] (not -coef times the
    # extrapolated sample), so its first output is 3*y[0] - y[1]: reproduced as is.
    first = (3 * y[0] - y[1])[None]
    return torch.cat([first, y[1:] - cfg.preemph * y[:-1]])


def _seed_batch(waves: torch.Tensor, n_samples: torch.Tensor, cfg: MfccSeedConfig) -> Batch:
    """Prepared, zero-padded waves [B, S] -> features [B, T, 3*n_mfcc] and frame counts [B] (rest is junk)."""
    n_frames = 1 + n_samples // cfg.hop
    mel_fb = _mel_filters(cfg.sample_rate, cfg.win, cfg.n_mels, slaney=True).to(waves.device)
    mel = _stft_power(waves, cfg.win, cfg.hop) @ mel_fb  # [B, T, n_mels]
    db = 10.0 * torch.log10(mel.clamp(min=SEED_AMIN))
    valid = _frame_mask(n_frames, db.shape[1])[..., None]
    db_max = db.masked_fill(~valid, -torch.inf).amax(dim=(1, 2), keepdim=True)
    db = torch.maximum(db, db_max - SEED_MEL_TOP_DB)
    dct = AF.create_dct(cfg.n_mfcc, cfg.n_mels, norm="ortho").to(waves.device)
    ceps = db @ dct  # [B, T, n_mfcc]
    half = cfg.win // 2
    rms = F.avg_pool1d(F.pad(waves ** 2, (half, half))[:, None], cfg.win, cfg.hop)[:, 0].sqrt()
    ceps = torch.cat([rms[..., None], ceps[..., 1:]], dim=2)  # the frame's RMS replaces c0
    taps = [_savgol_taps(cfg.delta_width, deriv).to(waves.device) for deriv in (1, 2)]
    d1, d2 = _smooth(ceps, n_frames, taps, hold_edges=True)
    feats = torch.cat([ceps, d1, d2], dim=2)
    return (_mvn(feats, n_frames) if cfg.normalise else feats), n_frames


# ---- mfcc-kaldi ----

def _kaldi_batch(waves: torch.Tensor, n_samples: torch.Tensor, cfg: MfccKaldiConfig) -> Batch:
    """Zero-padded waves [B, S] -> [B, T, 3*num_ceps] and frame counts [B]; statics: torchaudio Kaldi MFCC."""
    n_frames = 1 + (n_samples - cfg.win) // cfg.hop
    frames = waves.unfold(1, cfg.win, cfg.hop) * cfg.wave_scale  # [B, T, win]: whole frames only
    frames = frames - frames.mean(dim=2, keepdim=True)  # DC offset per frame
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=2)
    frames = frames - cfg.preemph * previous
    frames = frames * torch.hann_window(cfg.win, periodic=False, device=waves.device).pow(0.85)  # povey
    n_fft = 1 << (cfg.win - 1).bit_length()
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2.0)  # [B, T, n_fft//2+1]
    banks, _ = kaldi.get_mel_banks(cfg.num_mel_bins, n_fft, float(cfg.sample_rate), cfg.low_freq,
                                   cfg.high_freq, 100.0, -500.0, 1.0)
    banks = F.pad(banks, (0, 1)).to(waves.device)  # Kaldi ignores the Nyquist bin
    log_mel = (power @ banks.T).clamp(min=KALDI_EPS).log()
    dct = AF.create_dct(cfg.num_mel_bins, cfg.num_mel_bins, norm="ortho")
    dct[:, 0] = math.sqrt(1.0 / cfg.num_mel_bins)
    ceps = log_mel @ dct[:, :cfg.num_ceps].to(waves.device)
    if cfg.cepstral_lifter:
        i = torch.arange(cfg.num_ceps, device=waves.device)
        ceps = ceps * (1.0 + 0.5 * cfg.cepstral_lifter * torch.sin(math.pi * i / cfg.cepstral_lifter))
    # torchaudio.functional.compute_deltas(win_length=2*N+1) twice: regression with replicated edges
    n = cfg.delta_window
    taps = (torch.arange(-n, n + 1, dtype=torch.float32) / (n * (n + 1) * (2 * n + 1) / 3)).to(waves.device)
    d1, = _smooth(ceps, n_frames, [taps], hold_edges=False)
    d2, = _smooth(d1, n_frames, [taps], hold_edges=False)
    feats = torch.cat([ceps, d1, d2], dim=2)
    return (_mvn(feats, n_frames) if cfg.normalisation == "utterance" else feats), n_frames


# ---- fbank ----

def _fbank_batch(waves: torch.Tensor, n_samples: torch.Tensor, cfg: FbankConfig) -> Batch:
    """Zero-padded waves [B, S] -> log-mel [B, T, n_mels] and frame counts [B] (the rest is junk)."""
    n_frames = 1 + n_samples // cfg.hop
    mel_fb = _mel_filters(cfg.sample_rate, cfg.win, cfg.n_mels, slaney=False).to(waves.device)
    feats = torch.log(_stft_power(waves, cfg.win, cfg.hop) @ mel_fb + cfg.log_offset)
    return (_mvn(feats, n_frames) if cfg.normalise else feats), n_frames


# ---- public entry points ----

_BATCH = {MfccSeedConfig: _seed_batch, MfccKaldiConfig: _kaldi_batch, FbankConfig: _fbank_batch}


def prepare(cfg: Recipe, wave: torch.Tensor, known_finite: bool = False) -> torch.Tensor:
    """The per-utterance part of a recipe, wave [S] -> [S'] (mfcc-seed: trim, peak, pre-emphasis).

    Raises AudioError for a wave with too few samples for one frame (after trimming) or non-finite
    samples, and ValueError for something that is not a 1-D float tensor. known_finite=True skips the
    scan for NaN/Inf, for waves that `load_audio` returned (it refuses those).
    """
    if not isinstance(wave, torch.Tensor) or wave.ndim != 1 or not wave.is_floating_point():
        shape = tuple(wave.shape) if hasattr(wave, "shape") else type(wave).__name__
        raise ValueError(f"expected a 1-D float tensor [samples], got {shape}: load it with load_audio()")
    wave = wave.to(torch.float32)
    if not known_finite and not bool(torch.isfinite(wave).all()):
        raise AudioError("contains NaN or Inf samples")
    if isinstance(cfg, MfccSeedConfig):
        return _seed_prepare(wave, cfg)
    if len(wave) < cfg.min_samples:
        raise AudioError(f"too short for one frame: {len(wave)} samples (need {cfg.min_samples})")
    return wave


def compute_batch(cfg: Recipe, waves: list[torch.Tensor], device: str | torch.device = "cpu",
                  prepared: bool = False) -> list[torch.Tensor]:
    """Features of several waves in one padded batch on `device`: a list of [T_i, dims] float32 there.

    Equal to `compute` one at a time: centred frames past a wave's end only see zeros either way, and
    per-utterance statistics (dB ceiling, normalisation, delta edges) use each wave's own frames.
    prepared=True: the waves already went through `prepare` (e.g. to record AudioErrors one by one).
    Raises AudioError (naming the index in the batch) like `prepare`.
    """
    if type(cfg) not in _BATCH:
        raise ValueError(f"not a feature recipe config: {cfg!r}; build one with get_recipe()")
    if not waves:
        return []
    ready = []
    for i, wave in enumerate(waves):
        try:
            ready.append(wave.to(device, torch.float32) if prepared else prepare(cfg, wave.to(device)))
            if len(ready[-1]) < cfg.min_samples:  # only a prepared wave can get here
                raise AudioError(f"too short for one frame: {len(wave)} samples (need {cfg.min_samples})")
        except AudioError as err:
            raise AudioError(f"{err.reason} (wave {i} of the batch)") from err
    n_samples = torch.tensor([len(w) for w in ready], device=device)
    padded = torch.nn.utils.rnn.pad_sequence(ready, batch_first=True)  # zero padding
    feats, n_frames = _BATCH[type(cfg)](padded, n_samples, cfg)
    return [f[:n] for f, n in zip(feats, n_frames.tolist())]


def compute(cfg: Recipe, wave: torch.Tensor) -> torch.Tensor:
    """Features of one wave [S] (float32, cfg.sample_rate Hz) -> [T, cfg.dims] float32, on wave's device."""
    ready = prepare(cfg, wave)
    return compute_batch(cfg, [ready], ready.device, prepared=True)[0]


def mfcc_seed(wave: torch.Tensor, cfg: MfccSeedConfig = MfccSeedConfig()) -> torch.Tensor:
    """[S] -> [1 + S_trimmed // hop, 39]: [RMS + c1..c12, deltas, delta-deltas], normalised per utterance."""
    return compute(cfg, wave)


def mfcc_kaldi(wave: torch.Tensor, cfg: MfccKaldiConfig = MfccKaldiConfig()) -> torch.Tensor:
    """[S] -> [1 + (S - win) // hop, 39]: Kaldi MFCCs, deltas, delta-deltas; normalised per cfg."""
    return compute(cfg, wave)


def fbank(wave: torch.Tensor, cfg: FbankConfig = FbankConfig()) -> torch.Tensor:
    """[S] -> [1 + S // hop, n_mels]: log-mel filterbank energies, normalised per utterance by default."""
    return compute(cfg, wave)
