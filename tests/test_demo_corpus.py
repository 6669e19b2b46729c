"""The synthetic demo corpus: Flickr8k layout, audio, captions true of their pictures, reproducibility."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from PIL import Image

from pipeline.corpus import read_corpus
from pipeline.demo.captions import attribute_texts, captions_for, keywords
from pipeline.demo.make_demo import DemoConfig, split_sizes, teacher_training_texts, write_demo_corpus
from pipeline.demo.scenes import COLOURS, POSITION_XY, SIZE_RADIUS, Scene, draw_scene, sample_scene
from pipeline.demo.speech import SAMPLE_RATE, SPEAKERS, Speaker, resample, synthesize

N_IMAGES = 12
SEED = 3

# What makes each keyword true, written out here independently of captions.scene_keywords: a caption that
# says the word must show it.
TRUTH = {
    **{c: (lambda s, c=c: any(o["colour"] == c for o in s["objects"])) for c in COLOURS},
    **{sh: (lambda s, sh=sh: any(o["shape"] == sh for o in s["objects"]))
       for sh in ("ball", "square", "triangle", "star", "ring", "cross", "tree")},
    "small": lambda s: any(o["size"] == "small" for o in s["objects"]),
    "little": lambda s: any(o["size"] == "small" for o in s["objects"]),
    "large": lambda s: any(o["size"] == "large" for o in s["objects"]),
    "big": lambda s: any(o["size"] == "large" for o in s["objects"]),
    **{w: (lambda s, b=b: s["background"] == b) for w, b in (
        ("grass", "grass"), ("field", "grass"), ("sand", "sand"), ("beach", "sand"), ("water", "water"),
        ("snow", "snow"), ("snowy", "snow"), ("road", "road"), ("street", "road"), ("dirt", "dirt"))},
    **{p: (lambda s, p=p: any(o["position"] == p for o in s["objects"]))
       for p in ("left", "right", "top", "bottom")},
    "middle": lambda s: any(o["position"] == "centre" for o in s["objects"]),
    "two": lambda s: len(s["objects"]) == 2,
    "three": lambda s: len(s["objects"]) == 3,
}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    return out, write_demo_corpus(DemoConfig(out, images=N_IMAGES, seed=SEED, workers=2))


@pytest.fixture(scope="module")
def scenes(corpus) -> dict[str, dict]:
    return {r["image_id"]: r for r in map(json.loads, _lines(corpus[0] / "scenes.jsonl"))}


@pytest.fixture(scope="module")
def captions(corpus) -> dict[str, list[str]]:
    by_image: dict[str, list[str]] = {}
    for line in _lines(corpus[0] / "Flickr8k_text" / "Flickr8k.token.txt"):
        key, caption = line.split("\t")
        by_image.setdefault(key.split(".jpg#")[0], []).append(caption)
    return by_image


# ----------------------------------------------------------------------------------------------------
# Layout


def test_layout_is_flickr8k_and_complete(corpus, scenes):
    root, summary = corpus
    ids = sorted(scenes)
    assert len(ids) == N_IMAGES and summary["utterances"] == 5 * N_IMAGES
    assert not (root.parent / "corpus.partial").exists()
    splits = {name: _lines(root / "Flickr8k_text" / f"Flickr_8k.{name}Images.txt")
              for name in ("train", "dev", "test")}
    assert {k: len(v) for k, v in splits.items()} == summary["splits"] == {"train": 8, "dev": 2, "test": 2}
    listed = [image for names in splits.values() for image in names]
    assert sorted(listed) == [f"{i}.jpg" for i in ids]  # a partition: each image in exactly one list
    assert all(re.fullmatch(r"\d{7}_[0-9a-f]{8}", i) for i in ids)

    wavs = [f"{i}_{n}.wav" for i in ids for n in range(5)]
    assert sorted(p.name for p in (root / "flickr_audio" / "wavs").iterdir()) == wavs
    assert sorted(p.name for p in (root / "Flicker8k_Dataset").iterdir()) == [f"{i}.jpg" for i in ids]
    assert sorted(_lines(root / "flickr_audio" / "wav2capt.txt")) == sorted(
        f"{i}_{n}.wav {i}.jpg #{n}" for i in ids for n in range(5))
    spk = dict(line.split(" ") for line in _lines(root / "flickr_audio" / "wav2spk.txt"))
    speakers = json.loads((root / "speakers.json").read_text())
    assert sorted(spk) == wavs and set(spk.values()) <= set(speakers)
    assert all(set(v) == {"name", "voice", "rate", "pitch"} for v in speakers.values())
    tokens = [line.split("\t")[0] for line in _lines(root / "Flickr8k_text" / "Flickr8k.token.txt")]
    assert sorted(tokens) == sorted(f"{i}.jpg#{n}" for i in ids for n in range(5))
    assert _lines(root / "keywords.txt") == keywords() and 20 <= len(keywords()) <= 40
    assert all(scenes[i]["split"] in ("train", "dev", "test") and f"{i}.jpg" in splits[scenes[i]["split"]]
               for i in ids)
    assert json.loads((root / "demo_config.json").read_text())["seed"] == SEED


def test_project_reader_reads_it_without_complaint(corpus, captions):
    read = read_corpus(corpus[0])
    assert read.kind == "flickr8k" and dict(read.report.problems) == {}
    assert read.split_counts() == {"train": 40, "dev": 10, "test": 10}
    for u in read.utterances:
        assert Path(u.audio_path).is_file() and Path(u.image_path).is_file()
        assert u.caption == captions[u.image_id][int(u.caption_id.split("#")[1])]


def test_split_sizes_for_the_default_corpus():
    assert split_sizes(600) == {"train": 400, "dev": 100, "test": 100}
    assert split_sizes(13) == {"train": 9, "dev": 2, "test": 2}


# ----------------------------------------------------------------------------------------------------
# Audio


def test_wavs_are_16k_mono_pcm16_speech_of_plausible_length(corpus, captions):
    root = corpus[0]
    words, seconds = [], []
    for image_id, caps in captions.items():
        for n, caption in enumerate(caps):
            path = root / "flickr_audio" / "wavs" / f"{image_id}_{n}.wav"
            info = sf.info(str(path))
            assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
            x, _ = sf.read(str(path), dtype="float32")
            assert np.abs(x).max() > 0.3, f"{path} is nearly silent"
            # The first 80 ms are noise only (lead-in >= 100 ms): present, and 25-35 dB under the speech
            # (measured over the whole file, pauses included, so a little lower).
            noise = np.mean(x[:1280] ** 2)
            assert noise > 0
            snr = 10 * np.log10(np.mean(x ** 2) / noise)
            assert 18 < snr < 38, f"{path}: speech-to-noise {snr:.1f} dB"
            words.append(len(caption.split()))
            seconds.append(info.duration)
            # 150-195 words per minute plus 0.2-0.7 s of padding, with generous margins.
            assert 0.15 * words[-1] + 0.2 < seconds[-1] < 0.8 * words[-1] + 1.2, (caption, seconds[-1])
    assert np.corrcoef(words, seconds)[0, 1] > 0.7  # longer captions take longer to say


def test_speakers_sound_different():
    text = "a big red ball next to a small blue star on the grass"
    waves = {s.name: synthesize(text, s, seed=0) for s in SPEAKERS}
    names = list(waves)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not (len(waves[a]) == len(waves[b]) and np.array_equal(waves[a], waves[b])), (a, b)

    def median_f0(x: np.ndarray) -> float:
        y = x.astype(np.float32) / 32768
        f0 = librosa.yin(y, fmin=60, fmax=400, sr=SAMPLE_RATE, frame_length=1024, hop_length=256)
        rms = librosa.feature.rms(y=y, frame_length=1024, hop_length=256)[0][: len(f0)]
        return float(np.median(f0[rms > 0.3 * rms.max()]))  # loud frames: vowels
    # A low male voice against a high female one: pitch must separate them.
    assert median_f0(waves["us-female"]) > 1.3 * median_f0(waves["nyc-male-low"])
    rates = {s.name: len(waves[s.name]) for s in SPEAKERS}
    assert rates["gb-male-slow"] > rates["us-female-fast"]  # 150 against 195 words per minute


def test_synthesis_is_a_function_of_text_speaker_and_seed():
    text, speaker = "a little pink ring at the top", SPEAKERS[1]
    first = synthesize(text, speaker, seed=5)
    synthesize("three shapes on the snow", SPEAKERS[8], seed=1)  # other work in between changes nothing
    assert np.array_equal(first, synthesize(text, speaker, seed=5))
    assert not np.array_equal(first, synthesize(text, speaker, seed=6))


@pytest.mark.parametrize("voice", ["en-us+nosuchvariant", "xx-nosuchlanguage"])
def test_unknown_voice_is_an_error_naming_it(voice):
    reference = synthesize("a red ball", SPEAKERS[0], seed=1)
    with pytest.raises(ValueError, match=re.escape(voice)):
        synthesize("a red ball", Speaker(99, "nobody", voice), seed=1)
    # espeak-ng keeps the previous voice after a refusal; the next utterance must not be affected.
    assert np.array_equal(reference, synthesize("a red ball", SPEAKERS[0], seed=1))


def test_speaker_settings_are_checked():
    with pytest.raises(ValueError, match="rate"):
        Speaker(0, "fast", "en-us", rate=600)
    with pytest.raises(ValueError, match="pitch"):
        Speaker(0, "high", "en-us", pitch=120)


@pytest.mark.parametrize("length", [1, 440, 441, 10_000, 60_001])
def test_resample_matches_torchaudio(length):
    x = np.random.default_rng(length).standard_normal(length)
    expected = AF.resample(torch.from_numpy(x), 22050, 16000).numpy()  # float64 in, float64 kernels
    got = resample(x)
    assert got.shape == expected.shape == (-(-length * 320 // 441),)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# Captions and keywords


def test_captions_are_five_different_speakable_sentences(captions):
    assert len(captions) == N_IMAGES
    for caps in captions.values():
        assert len(caps) == 5 and len(set(caps)) == 5
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)+", c) for c in caps), caps


def _check_keywords_true(caption: str, scene: dict) -> None:
    for word in set(caption.split()) & set(TRUTH):
        assert TRUTH[word](scene), f"{caption!r} says {word!r} but the scene is {scene}"


def test_caption_keywords_are_true_of_the_picture(captions, scenes):
    assert set(TRUTH) == set(keywords())
    for image_id, caps in captions.items():
        for caption in caps:
            _check_keywords_true(caption, scenes[image_id])


def test_grammar_over_many_scenes_uses_every_keyword_and_only_truly():
    rng = np.random.default_rng(0)
    used: set[str] = set()
    for _ in range(300):
        scene = sample_scene(rng)
        caps = captions_for(scene, rng)
        assert len(set(caps)) == 5
        for caption in caps:
            _check_keywords_true(caption, scene.to_dict())
            used.update(caption.split())
    assert set(keywords()) <= used


def test_attribute_texts_name_exactly_the_true_keywords(scenes):
    for record in scenes.values():
        scene = Scene.from_dict(record)
        texts = attribute_texts(scene, template="a photo of a {}")
        prompted = {t.removeprefix("a photo of a ") for t in texts if t.startswith("a photo of a ")}
        assert prompted == {w for w in keywords() if TRUTH[w](record)}
        phrases = [t for t in texts if not t.startswith("a photo of a ")]
        assert len(phrases) >= len(record["objects"])
        for phrase in phrases:
            _check_keywords_true(phrase, record)


def test_teacher_training_texts_from_a_written_corpus(corpus, captions, scenes):
    texts = teacher_training_texts(corpus[0])
    assert sorted(texts) == sorted(scenes)
    for image_id, t in texts.items():
        assert t[:5] == captions[image_id]
        assert t[5:] == attribute_texts(Scene.from_dict(scenes[image_id]))
    train = teacher_training_texts(corpus[0], split="train")
    assert sorted(train) == sorted(i for i, r in scenes.items() if r["split"] == "train")
    assert all(train[i] == texts[i] for i in train)


# ----------------------------------------------------------------------------------------------------
# Images


def test_images_are_textured_jpegs_showing_the_objects_colours(corpus, scenes):
    for image_id, record in scenes.items():
        path = corpus[0] / "Flicker8k_Dataset" / f"{image_id}.jpg"
        with Image.open(path) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (224, 224))
            pixels = np.asarray(im, dtype=np.float32)
            small = np.asarray(im.resize((64, 64), Image.BICUBIC), dtype=np.float32)
        assert pixels.std() > 10
        # The top-left corner never holds an object: a textured background, not a flat colour.
        assert pixels[:40, :40].std(axis=(0, 1)).max() > 2.5, f"{path}: flat background"
        for o in record["objects"]:
            if o["colour"] is None:
                continue
            for img, side in ((pixels, 224), (small, 64)):  # the teacher sees 64 px
                fx, fy = POSITION_XY[o["position"]]
                r = SIZE_RADIUS[o["size"]] * side
                x0, x1 = int((fx - 0.05) * side - r), int((fx + 0.05) * side + r)
                y0, y1 = int((fy - 0.05) * side - r), int((fy + 0.05) * side + r)
                region = img[max(y0, 0):y1, max(x0, 0):x1]
                close = np.linalg.norm(region - np.array(COLOURS[o["colour"]]), axis=-1) < 60
                # At least a quarter of a small disc's area shows the colour, where the object is.
                assert close.sum() > 0.25 * np.pi * (SIZE_RADIUS["small"] * side) ** 2, (path, o)


def test_drawing_is_reproducible_and_scenes_round_trip():
    scene = sample_scene(np.random.default_rng(7))
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    a = draw_scene(scene, 96, np.random.default_rng(1))
    b = draw_scene(scene, 96, np.random.default_rng(1))
    c = draw_scene(scene, 96, np.random.default_rng(2))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="position"):
        Scene.from_dict({"background": "grass", "objects": [
            {"shape": "ball", "colour": "red", "size": "small", "position": "left"},
            {"shape": "star", "colour": "blue", "size": "small", "position": "left"}]})


# ----------------------------------------------------------------------------------------------------
# Reproducibility and the output folder


def test_same_seed_gives_identical_files_whatever_the_workers(corpus, tmp_path):
    again = tmp_path / "again"
    write_demo_corpus(DemoConfig(again, images=N_IMAGES, seed=SEED, workers=1))
    first, second = _hashes(corpus[0]), _hashes(again)
    assert len(first) == 10 + 6 * N_IMAGES and first == second


def test_other_seed_replaces_a_corpus_with_different_files(corpus, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(corpus[0], out)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_demo_corpus(DemoConfig(out, images=N_IMAGES, seed=SEED + 1))
    write_demo_corpus(DemoConfig(out, images=N_IMAGES, seed=SEED + 1, overwrite=True))
    old, new = _hashes(corpus[0]), _hashes(out)
    assert not (set(old.values()) & {h for k, h in new.items() if k.endswith((".wav", ".jpg"))})
    assert old["Flickr8k_text/Flickr8k.token.txt"] != new["Flickr8k_text/Flickr8k.token.txt"]
    assert not (tmp_path / "other.partial").exists()


def test_refuses_folders_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis|not a complete demo corpus"):
        write_demo_corpus(DemoConfig(tmp_path / "mine", images=N_IMAGES, overwrite=True))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("bad", [dict(images=11), dict(workers=0), dict(seed=-1), dict(image_size=8)])
def test_config_is_validated(bad, tmp_path):
    with pytest.raises(ValueError):
        DemoConfig(tmp_path / "x", **bad)
