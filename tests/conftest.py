"""Shared fixtures: ONE small feature cache per format, built once per test session by the real stages
(extract-audio, then embed-images with a tiny random open_clip teacher). Treat them as read-only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from corpora import speechlike, write_tiny_flickr

TINY_IMAGES = 24        # 12 train, 6 dev, 6 test images; 5 spoken captions each
# A tiny open_clip CLIP with random weights: its embeddings carry no meaning, but every image and caption
# gets its own fixed vector, which is all the trainer's tests need. Built in well under a second. Average
# pooling: a random ViT's class token gives nearly the same vector for every image (cosines > 0.9), the mean
# of its patch tokens spreads them out (mean cosine about 0.1), so the student has something to tell apart.
TINY_TEACHER = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 1,
                       "pool_type": "avg"},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}},
    "preprocess_cfg": {"size": 32, "resize_mode": "squash", "interpolation": "bicubic",
                       "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711]},
}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """write_tiny_flickr with 24 images, made learnable: each JPEG gets its own random stripes, so no two
    images are identical (the plain corpus repeats four colours), and the 5 spoken captions of an image
    share one voice and melody (speechlike() drawn from the image's own seed) with their own noise and
    length, where the plain corpus gives every utterance unrelated audio."""
    root = write_tiny_flickr(tmp_path_factory.mktemp("tiny_corpus"), images=TINY_IMAGES)
    rng = np.random.default_rng(1)
    for path in sorted((root / "Flicker8k_Dataset").glob("*.jpg")):
        pixels = np.asarray(Image.open(path).convert("RGB")).copy()
        pixels[::8] = rng.integers(0, 256, size=(len(pixels[::8]), 1, 3))
        Image.fromarray(pixels).save(path, quality=95)
    images = sorted(p.stem for p in (root / "Flicker8k_Dataset").glob("*.jpg"))
    for k, image in enumerate(images):
        for n in range(5):
            voice = speechlike(np.random.default_rng(100 + k), 0.5 + 0.05 * k + 0.04 * n)
            noise = 0.01 * rng.standard_normal(len(voice)).astype(np.float32)
            wav = root / "flickr_audio" / "wavs" / f"{image}_{n}.wav"
            sf.write(wav, voice + noise, 16000, subtype="PCM_16")
    return root


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A "local-dir:" open_clip model folder (config + random safetensors weights, seeded)."""
    import open_clip
    import torch
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("tiny_teacher")
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_TEACHER["model_cfg"])
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_TEACHER))
    return f"local-dir:{folder}"


def _build_cache(corpus: Path, teacher: str, cache: Path, fmt: str) -> Path:
    from pipeline.embed import EmbedConfig, embed_images
    from pipeline.extract import ExtractConfig, extract_audio
    # several small parts, so the wds cache has shards enough for 2 stream workers
    extract_audio(ExtractConfig(data=corpus, cache=cache, fmt=fmt, workers=1, part_size=16, progress=False))
    embed_images(EmbedConfig(data=corpus, cache=cache, model=teacher, workers=0, batch_size=64,
                             progress=False))
    return cache


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_corpus, tiny_teacher) -> Path:
    """An hdf5 cache of tiny_corpus: mfcc-seed features (39 dims), 512-dim CLIP embeddings of images,
    captions and the corpus' keywords. 60 train, 30 dev, 30 test utterances in parts of 16."""
    return _build_cache(tiny_corpus, tiny_teacher, tmp_path_factory.mktemp("tiny_cache_hdf5"), "hdf5")


@pytest.fixture(scope="session")
def tiny_wds_cache(tmp_path_factory, tiny_corpus, tiny_teacher) -> Path:
    """The same cache in WebDataset format (tar shards of 16 utterances), for --data-mode stream."""
    return _build_cache(tiny_corpus, tiny_teacher, tmp_path_factory.mktemp("tiny_cache_wds"), "wds")
