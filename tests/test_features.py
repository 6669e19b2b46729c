"""Feature recipes on speech-like audio made here, against librosa and torchaudio references."""
import json

import librosa
import numpy as np
import pytest
import torch
import torchaudio

from pipeline.audio import SAMPLE_RATE, AudioError
from pipeline.features import compute, compute_batch, fbank, mfcc_kaldi, mfcc_seed, prepare
from pipeline.recipes import RECIPES, FbankConfig, MfccKaldiConfig, MfccSeedConfig, get_recipe, recipe_from_dict


def speech_like(seconds: float, seed: int, lead: float = 0.4, tail: float = 0.3) -> torch.Tensor:
    """Voiced harmonics with a moving f0 and a syllable-rate envelope, framed by near-silence, light noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 110 + 40 * np.sin(2 * np.pi * rng.uniform(0.4, 1.0) * t) + 15 * t
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    envelope = np.sin(np.pi * t / seconds) ** 0.5 * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    voiced = envelope * sum(0.8 ** k * np.sin(k * phase + rng.uniform(0, 6)) for k in range(1, 25))
    y = np.concatenate([np.zeros(int(lead * SAMPLE_RATE)), voiced, np.zeros(int(tail * SAMPLE_RATE))])
    y = 0.3 * y / np.abs(y).max() + 1e-3 * rng.standard_normal(len(y))
    return torch.from_numpy(y.astype(np.float32))


def librosa_seed(y: np.ndarray, delta_mode: str = "interp") -> tuple[np.ndarray, np.ndarray]:
    """The seed recipe written with librosa 0.11 calls: (un-normalised [T, 39], normalised [T, 39])."""
    y, _ = librosa.effects.trim(y, top_db=20)
    y = 0.5 * y / np.max(np.abs(y))
    y = librosa.effects.preemphasis(y, coef=0.97)
    m = librosa.feature.mfcc(y=y, sr=16000, n_mfcc=13, n_mels=80, n_fft=400, hop_length=160)
    m[0] = librosa.feature.rms(y=y, frame_length=400, hop_length=160)[0]
    d1 = librosa.feature.delta(m, mode=delta_mode)
    d2 = librosa.feature.delta(m, order=2, mode=delta_mode)
    x = np.concatenate([m, d1, d2]).T
    return x, (x - x.mean(0)) / (x.std(0) + 1e-5)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


SEED_CASES = {
    "speech 2.5 s": speech_like(2.5, seed=0),
    "speech 4 s": speech_like(4.0, seed=1),
    # RMS < 1e-5 everywhere: librosa's power floor makes every frame 0 dB, so nothing is trimmed.
    "very quiet noise": torch.from_numpy(np.random.default_rng(2).normal(0, 4e-6, 16000).astype(np.float32)),
}


@pytest.mark.parametrize("case", SEED_CASES)
def test_mfcc_seed_matches_librosa(case: str):
    wave = SEED_CASES[case]
    raw_ref, norm_ref = librosa_seed(wave.numpy())
    raw = compute(MfccSeedConfig(normalise=False), wave).numpy()
    norm = mfcc_seed(wave).numpy()
    assert norm.shape == norm_ref.shape and norm.dtype == np.float32
    # Measured max |diff|: 2.8e-5, 3.4e-5, 1.5e-5 (float32 FFT and sums); features are ~unit scale.
    assert np.abs(norm - norm_ref).max() < 1e-4
    assert rel_err(raw[:, :13], raw_ref[:, :13]) < 1e-5  # measured ~1e-6
    assert rel_err(raw[:, 13:], raw_ref[:, 13:]) < 1e-4  # deltas: librosa's savgol_filter, mode 'interp'


def test_mfcc_seed_trims_silence_before_framing():
    wave = SEED_CASES["speech 2.5 s"]
    # Trimming works in 512-sample steps: silence of whole steps in front changes nothing at all.
    padded = torch.cat([torch.zeros(32 * 512), wave, torch.zeros(8000)])
    torch.testing.assert_close(mfcc_seed(padded), mfcc_seed(wave), rtol=0, atol=1e-5)
    assert len(mfcc_seed(wave)) < 1 + len(wave) // 160  # the 0.4 s lead and 0.3 s tail went


def test_mfcc_seed_under_nine_frames_uses_edge_replication():
    # librosa raises for < 9 frames in mode 'interp'; the recipe replicates edge frames there
    # (savgol mode 'nearest'), which the reference reproduces.
    wave = speech_like(0.2, seed=3, lead=0, tail=0)[1000:2100]
    raw_ref, norm_ref = librosa_seed(wave.numpy(), delta_mode="nearest")
    raw = compute(MfccSeedConfig(normalise=False), wave).numpy()
    assert raw.shape == (1 + 1100 // 160, 39) == raw_ref.shape
    assert rel_err(raw, raw_ref) < 1e-4
    assert np.abs(mfcc_seed(wave).numpy() - norm_ref).max() < 1e-4  # measured 4.8e-5


def test_mfcc_seed_rejects_silence():
    with pytest.raises(AudioError, match="silent"):
        mfcc_seed(torch.zeros(8000))


def test_mfcc_kaldi_static_part_is_torchaudio_kaldi_and_deltas_are_compute_deltas_twice():
    wave = SEED_CASES["speech 4 s"]
    feats = compute(MfccKaldiConfig(normalisation="none"), wave)
    static = torchaudio.compliance.kaldi.mfcc(wave[None] * 32768, dither=0.0)  # Kaldi sees int16 values
    d1 = torchaudio.functional.compute_deltas(static.T, win_length=5)
    d2 = torchaudio.functional.compute_deltas(d1, win_length=5)
    assert feats.shape == (1 + (len(wave) - 400) // 160, 39)
    torch.testing.assert_close(feats, torch.cat([static, d1.T, d2.T], dim=1), rtol=1e-5, atol=1e-4)


def test_mfcc_kaldi_normalisation_modes():
    wave = speech_like(1.5, seed=4)
    raw = compute(MfccKaldiConfig(normalisation="none"), wave)
    assert torch.equal(compute(MfccKaldiConfig(normalisation="speaker"), wave), raw)  # stats come later
    utt = mfcc_kaldi(wave)
    assert utt.shape == raw.shape and MfccKaldiConfig().dims == 39
    torch.testing.assert_close(utt, (raw - raw.mean(0)) / (raw.std(0, correction=0) + 1e-5),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_mels", [40, 80])
def test_fbank_is_log_mel_of_torchaudio_melspectrogram(n_mels: int):
    wave = SEED_CASES["speech 2.5 s"]
    feats = compute(FbankConfig(n_mels=n_mels, normalise=False), wave)
    mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=n_mels,
                                               pad_mode="constant")(wave)
    assert feats.shape == (1 + len(wave) // 160, n_mels) == (mel.shape[1], n_mels)
    torch.testing.assert_close(feats, torch.log(mel.T + 1e-6), rtol=1e-5, atol=1e-4)
    normed = fbank(wave, FbankConfig(n_mels=n_mels))
    torch.testing.assert_close(normed.mean(0), torch.zeros(n_mels), atol=1e-4, rtol=0)
    torch.testing.assert_close(normed.std(0, correction=0), torch.ones(n_mels), atol=1e-3, rtol=0)


@pytest.mark.parametrize("cfg", [MfccSeedConfig(), MfccSeedConfig(normalise=False), MfccKaldiConfig(),
                                 MfccKaldiConfig(normalisation="none"), FbankConfig(n_mels=40)],
                         ids=lambda c: f"{c.name}-{'norm' if getattr(c, 'normalise', True) else 'raw'}")
def test_compute_batch_equals_compute(cfg):
    # Lengths: long, short of 9 frames, not a multiple of the hop, exactly one window; the last wave
    # ends in a burst that is louder in the batch's first frame past its end than in any of its own
    # frames (a per-utterance maximum taken over padding would show).
    t = torch.arange(1759) / SAMPLE_RATE
    burst = 0.3 * torch.sin(2 * torch.pi * 1000 * t) * torch.where(t > 1699 / SAMPLE_RATE, 7.0, 1.0)
    waves = [SEED_CASES["speech 4 s"], speech_like(0.9, seed=5), speech_like(0.3, seed=6, lead=0, tail=0),
             SEED_CASES["speech 2.5 s"][7000:7000 + 1013], SEED_CASES["speech 2.5 s"][9000:9400], burst]
    batched = compute_batch(cfg, waves, "cpu")
    for wave, got in zip(waves, batched):
        want = compute(cfg, wave)
        assert got.shape == want.shape and got.shape[1] == cfg.dims
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    ready = [prepare(cfg, w) for w in waves]  # the two-step route that lets a stage skip bad waves
    for got, want in zip(compute_batch(cfg, ready, "cpu", prepared=True), batched):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if isinstance(cfg, MfccSeedConfig):   # its preparation (trim, peak scaling) must not run twice
        again = compute_batch(cfg, ready, "cpu")
        assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(again, batched))
    with pytest.raises(AudioError, match=r"too short for one frame: 3 samples .*\(wave 1 of the batch\)"):
        compute_batch(cfg, [ready[0], ready[0][:3]], "cpu", prepared=True)


@pytest.mark.parametrize("name", list(RECIPES))
def test_too_short_input(name: str):
    cfg = get_recipe(name)
    assert cfg.min_samples == 400
    assert len(compute(cfg, speech_like(0.1, seed=7, lead=0, tail=0)[:400])) >= 1
    with pytest.raises(AudioError, match="too short for one frame: 399 samples"):
        compute(cfg, speech_like(0.1, seed=7, lead=0, tail=0)[:399])
    with pytest.raises(AudioError, match=r"wave 1 of the batch"):
        compute_batch(cfg, [speech_like(0.5, seed=8), torch.full((120,), 0.1)], "cpu")


def test_seed_too_short_after_trimming():
    # With the default 512-sample trim hop a trimmed wave keeps >= min(S, 512) samples; a finer trim
    # hop can cut below one 400-sample window: 100 loud samples keep only frames 62-64 (384 samples).
    wave = torch.zeros(16000)
    wave[8000:8100] = 0.5
    with pytest.raises(AudioError, match="too short for one frame: 384 samples after trimming"):
        compute(MfccSeedConfig(trim_frame=256, trim_hop=128), wave)
    assert len(mfcc_seed(wave)) == 1 + 2048 // 160 == len(librosa_seed(wave.numpy())[0])  # frames 14-17 kept


def test_get_recipe_errors():
    with pytest.raises(ValueError, match="mfcc-seed, mfcc-kaldi, fbank"):
        get_recipe("mfcc-seeds")
    with pytest.raises(ValueError, match="n_mel\\b.*its options are"):
        get_recipe("fbank", n_mel=40)
    with pytest.raises(ValueError, match="n_mels=64"):
        get_recipe("fbank", n_mels=64)
    with pytest.raises(ValueError, match="delta_width"):
        get_recipe("mfcc-seed", delta_width=4)
    with pytest.raises(ValueError, match="normalisation"):
        get_recipe("mfcc-kaldi", normalisation="global")
    with pytest.raises(ValueError, match="normalise"):
        get_recipe("mfcc-seed", normalise="yes")
    with pytest.raises(ValueError, match="expected a 1-D float tensor"):
        compute(MfccSeedConfig(), torch.zeros(2, 16000))


ROUND_TRIP = [MfccSeedConfig(top_db=30.0, n_mfcc=20), MfccKaldiConfig(normalisation="speaker"),
              FbankConfig(n_mels=40, normalise=False)]


@pytest.mark.parametrize("cfg", ROUND_TRIP, ids=lambda c: c.name)
def test_to_dict_round_trip(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))  # what the cache manifest stores
    assert recipe_from_dict(d) == cfg
    with pytest.raises(ValueError, match="re-run the extract-audio stage"):
        recipe_from_dict({**d, "version": cfg.version + 1})
    with pytest.raises(ValueError, match="re-run the extract-audio stage"):   # a manifest without a version
        recipe_from_dict({k: v for k, v in d.items() if k != "version"})
