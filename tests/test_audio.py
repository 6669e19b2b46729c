"""load_audio on files written here: sample formats, channel mixing, resampling, and every failure reason."""
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.audio import SAMPLE_RATE, AudioError, load_audio
from pipeline.features import compute
from pipeline.recipes import get_recipe


def tone(seconds: float, sr: int, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def peak_hz(wave: torch.Tensor, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * sr / len(wave))


FORMATS = [("PCM_16", 2.0 ** -15), ("FLOAT", 0.0), ("PCM_24", 2.0 ** -23)]  # subtype, quantisation step


@pytest.mark.parametrize("subtype, resolution", FORMATS)
def test_sample_formats_read_to_float_in_unit_range(tmp_path: Path, subtype: str, resolution: float):
    data = tone(0.5, SAMPLE_RATE)
    path = tmp_path / ("a.flac" if subtype == "PCM_24" else "a.wav")
    sf.write(path, data, SAMPLE_RATE, subtype=subtype)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.shape == (len(data),)
    assert np.abs(wave.numpy() - data).max() <= resolution


def test_stereo_is_mixed_to_the_channel_mean(tmp_path: Path):
    left, right = tone(0.3, SAMPLE_RATE, 300.0), tone(0.3, SAMPLE_RATE, 700.0, amp=0.2)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    wave = load_audio(tmp_path / "s.wav")
    assert wave.shape == (len(left),)
    np.testing.assert_allclose(wave.numpy(), (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("file_rate", [8_000, 44_100])
def test_other_rates_are_resampled_keeping_the_pitch(tmp_path: Path, file_rate: int):
    sf.write(tmp_path / "r.wav", tone(1.0, file_rate), file_rate, subtype="PCM_16")
    wave = load_audio(tmp_path / "r.wav")
    assert len(wave) == SAMPLE_RATE  # 1 s stays 1 s
    assert abs(peak_hz(wave, SAMPLE_RATE) - 440.0) <= 1.0
    # Amplitude survives too (the tone is far below both Nyquist frequencies); edges are filter warm-up.
    assert abs(wave[1000:-1000].abs().max().item() - 0.5) < 0.01


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="missing file") as info:
        load_audio(path)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), SAMPLE_RATE, subtype="PCM_16")
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert info.value.reason == "empty (0 samples)" and str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"RIFF\x00\x00 this is not a wave file" * 10, b"RIFF"])
def test_corrupt_file_is_unreadable_and_named(tmp_path: Path, content: bytes):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert info.value.reason.startswith("unreadable: ") and str(path) in str(info.value)


def test_zero_byte_file_is_called_empty_not_unreadable(tmp_path: Path):
    path = tmp_path / "zero.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert info.value.reason == "empty file (0 bytes)" and str(path) in str(info.value)


def test_nan_samples(tmp_path: Path):
    data = tone(0.2, SAMPLE_RATE)
    data[100] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, data, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert info.value.reason == "contains NaN or Inf samples" and str(path) in str(info.value)


def test_silent_file(tmp_path: Path):
    path = tmp_path / "zeros.wav"
    sf.write(path, np.zeros(8000, dtype=np.float32), SAMPLE_RATE, subtype="PCM_16")
    with pytest.raises(AudioError, match="silent"):
        load_audio(path)


def test_stereo_channels_in_opposite_phase_are_silent_after_mixing(tmp_path: Path):
    """16-bit's -32768 has no +32768: channels that cancel leave a residue of half a step, which peak
    normalisation would turn into features of rounding noise."""
    left = np.clip(np.round(tone(0.5, SAMPLE_RATE) * 70000), -32768, 32767).astype(np.int16)   # clipped
    path = tmp_path / "anti.wav"
    sf.write(path, np.stack([left, (-left.astype(np.int32)).clip(-32768, 32767).astype(np.int16)], 1),
             SAMPLE_RATE, subtype="PCM_16")
    with pytest.raises(AudioError, match="silent \\(no sample reaches one 16-bit step"):
        load_audio(path)
    quiet = tmp_path / "quiet.wav"   # a quiet but real recording is not silent
    sf.write(quiet, (tone(0.5, SAMPLE_RATE) * 0.001).astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
    assert load_audio(quiet).abs().max() > 2.0 ** -15


def test_too_short_for_one_frame_after_loading(tmp_path: Path):
    path = tmp_path / "blip.wav"
    sf.write(path, tone(0.02, SAMPLE_RATE), SAMPLE_RATE, subtype="PCM_16")  # 320 samples < 400
    wave = load_audio(path)
    for name in ("mfcc-seed", "mfcc-kaldi", "fbank"):
        with pytest.raises(AudioError, match="too short for one frame: 320 samples"):
            compute(get_recipe(name), wave)


def test_bad_sample_rate_argument(tmp_path: Path):
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(tmp_path / "x.wav", sample_rate=0)
