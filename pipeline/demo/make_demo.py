"""Writes the synthetic demo corpus in the Flickr8k layout (REFERENCE.md §5): drawn scenes as JPEGs, five true
captions each, espeak-ng speech of every caption, split lists, keywords, and the scenes for the teacher."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

from pipeline.demo.captions import attribute_texts, captions_for, keywords
from pipeline.demo.pool import run_jobs
from pipeline.demo.scenes import Scene, draw_scene, sample_scene
from pipeline.demo.speech import SAMPLE_RATE, SPEAKERS, SpeechJob, engine, synthesize_files

CAPTIONS_PER_IMAGE = 5
JPEG_QUALITY = 90
CONFIG_FILE = "demo_config.json"  # written last: its presence marks a complete corpus
GENERATOR_VERSION = 2  # bump when the same seed would give different files
# Independent random streams, so that e.g. changing the speakers leaves the images unchanged.
_IDS, _SCENES, _CAPTIONS, _IMAGES, _SPEAKERS, _NOISE, _SPLITS = range(7)


@dataclass(frozen=True)
class DemoConfig:
    """Where and how big: `images` drawn scenes (split 2/3, 1/6, 1/6 into train/dev/test, 400/100/100 for
    600), 5 spoken captions each, `workers` processes for drawing and speech, square images of `image_size`
    pixels. The same seed gives byte-identical files whatever `workers` is. `overwrite` replaces an earlier
    demo corpus at `out` (never a folder that make-demo did not write)."""
    out: Path
    images: int = 600
    seed: int = 0
    workers: int = 2
    image_size: int = 224
    overwrite: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if self.images < 12:
            raise ValueError(f"images must be >= 12 (each split needs images, the dev and test splits a "
                             f"sixth each), got {self.images}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be 32..1024 pixels, got {self.image_size}")


def split_sizes(n: int) -> dict[str, int]:
    """Images per split for n images: dev and test a sixth each (at least 1), train the rest."""
    held_out = max(1, round(n / 6))
    return {"train": n - 2 * held_out, "dev": held_out, "test": held_out}


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _prepare_out(cfg: DemoConfig) -> Path:
    """Check that cfg.out may be written; returns the empty build folder `<out>.partial` next to it."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(f"{out}: folder exists and is not empty; pass --overwrite "
                                  "to replace a demo corpus there, or choose another --out")
        if not (out / CONFIG_FILE).is_file():
            raise FileExistsError(f"{out}: not a complete demo corpus (no {CONFIG_FILE}), so overwrite will "
                                  "not delete it; remove it yourself or choose another --out")
    partial = out.parent / (out.name + ".partial")
    if partial.exists():  # left by an interrupted run
        shutil.rmtree(partial)
    for sub in ("flickr_audio/wavs", "Flickr8k_text", "Flicker8k_Dataset"):
        (partial / sub).mkdir(parents=True)
    return partial


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def _draw_one(job: tuple[str, dict, int, int, int]) -> None:
    path, scene, seed, index, size = job
    image = draw_scene(Scene.from_dict(scene), size, _rng(seed, _IMAGES, index))
    image.save(path, format="JPEG", quality=JPEG_QUALITY)


def _draw_images(jobs: list[tuple[str, dict, int, int, int]], workers: int) -> None:
    for _ in run_jobs(_draw_one, jobs, workers, "images", "img", chunksize=16):
        pass


def write_demo_corpus(cfg: DemoConfig) -> dict:
    """Write the corpus under cfg.out (built in `<out>.partial`, renamed when complete, so an interrupted run
    never leaves a corpus that looks whole). Returns a summary: counts per split, speakers, audio seconds and
    the seconds each phase took."""
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    root = _prepare_out(cfg)
    n, seed = cfg.images, cfg.seed

    # Scenes, captions, speakers and splits: everything random is drawn here, per image from its own streams.
    t = time.perf_counter()
    ids = [f"{i:07d}_{int(_rng(seed, _IDS, i).integers(2 ** 32)):08x}" for i in range(n)]
    scenes = [sample_scene(_rng(seed, _SCENES, i)) for i in range(n)]
    captions = [captions_for(scene, _rng(seed, _CAPTIONS, i), CAPTIONS_PER_IMAGE)
                for i, scene in enumerate(scenes)]
    speakers = [[SPEAKERS[int(_rng(seed, _SPEAKERS, i, k).integers(len(SPEAKERS)))]
                 for k in range(CAPTIONS_PER_IMAGE)] for i in range(n)]
    sizes = split_sizes(n)
    order = _rng(seed, _SPLITS).permutation(n)
    split_of = {}
    for name, start, stop in (("train", 0, sizes["train"]), ("dev", sizes["train"], n - sizes["test"]),
                              ("test", n - sizes["test"], n)):
        split_of.update((int(i), name) for i in order[start:stop])

    # Text files.
    text, audio = root / "Flickr8k_text", root / "flickr_audio"
    wav = [[f"{ids[i]}_{k}.wav" for k in range(CAPTIONS_PER_IMAGE)] for i in range(n)]
    _write_lines(text / "Flickr8k.token.txt",
                 [f"{ids[i]}.jpg#{k}\t{c}" for i in range(n) for k, c in enumerate(captions[i])])
    for name, file in (("train", "Flickr_8k.trainImages.txt"), ("dev", "Flickr_8k.devImages.txt"),
                       ("test", "Flickr_8k.testImages.txt")):
        _write_lines(text / file, [f"{ids[i]}.jpg" for i in range(n) if split_of[i] == name])
    _write_lines(audio / "wav2capt.txt",
                 [f"{wav[i][k]} {ids[i]}.jpg #{k}" for i in range(n) for k in range(CAPTIONS_PER_IMAGE)])
    _write_lines(audio / "wav2spk.txt",
                 [f"{wav[i][k]} {speakers[i][k].id}" for i in range(n) for k in range(CAPTIONS_PER_IMAGE)])
    _write_lines(root / "keywords.txt", keywords())
    _write_lines(root / "scenes.jsonl", [json.dumps({"image_id": ids[i], "split": split_of[i],
                                                     **scenes[i].to_dict()}) for i in range(n)])
    used = sorted({s.id: s for row in speakers for s in row}.values(), key=lambda s: s.id)
    (root / "speakers.json").write_text(json.dumps(
        {str(s.id): {"name": s.name, "voice": s.voice, "rate": s.rate, "pitch": s.pitch} for s in used},
        indent=2) + "\n", encoding="utf-8")
    seconds["scenes_and_text"] = time.perf_counter() - t

    # Images, then speech: both in `workers` processes, each item from its own seed.
    t = time.perf_counter()
    _draw_images([(str(root / "Flicker8k_Dataset" / f"{ids[i]}.jpg"), scenes[i].to_dict(), seed, i,
                   cfg.image_size) for i in range(n)], cfg.workers)
    seconds["images"] = time.perf_counter() - t
    t = time.perf_counter()
    jobs = [SpeechJob(str(audio / "wavs" / wav[i][k]), captions[i][k], speakers[i][k], (seed, _NOISE, i, k))
            for i in range(n) for k in range(CAPTIONS_PER_IMAGE)]
    samples = synthesize_files(jobs, cfg.workers)
    seconds["speech"] = time.perf_counter() - t

    # The config goes last, then the folder takes its final name.
    config = {"generator": "clipspeech-demo", "version": GENERATOR_VERSION, "images": n, "seed": seed,
              "image_size": cfg.image_size, "captions_per_image": CAPTIONS_PER_IMAGE, "splits": sizes,
              "jpeg_quality": JPEG_QUALITY, "sample_rate": SAMPLE_RATE, "keywords": len(keywords()),
              "speakers": len(used), "espeak_ng": engine().version, "numpy": np.__version__,
              "pillow": PIL.__version__}
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if cfg.out.exists():
        shutil.rmtree(cfg.out)  # empty, or a complete demo corpus that overwrite=True replaces (_prepare_out)
    os.replace(root, cfg.out)
    seconds["total"] = time.perf_counter() - t_start
    return {"out": str(cfg.out), "images": n, "splits": sizes, "utterances": len(jobs), "speakers": len(used),
            "audio_seconds": round(sum(samples) / SAMPLE_RATE, 1),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}


def read_scenes(out_dir: str | os.PathLike, split: str | None = None) -> dict[str, Scene]:
    """Image id -> Scene, from a demo corpus's scenes.jsonl; only the images of `split` unless None."""
    if split not in (None, "train", "dev", "test"):
        raise ValueError(f"unknown split {split!r}; use train, dev, test or None (all)")
    path = Path(out_dir) / "scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {out_dir} is not a demo corpus (write one with make-demo)")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["image_id"]: Scene.from_dict(r) for r in records if split is None or r["split"] == split}


def teacher_training_texts(out_dir: str | os.PathLike, template: str = "this is a photo of a {}",
                           split: str | None = None) -> dict[str, list[str]]:
    """Image id -> its captions (caption number order) followed by its attribute_texts, for fitting the
    teacher from a written demo corpus; only the images of `split` (e.g. "train") unless None."""
    token_file = Path(out_dir) / "Flickr8k_text" / "Flickr8k.token.txt"
    if not token_file.is_file():
        raise FileNotFoundError(f"{token_file}: missing; {out_dir} is not a demo corpus "
                                "(write one with make-demo)")
    everything = read_scenes(out_dir)
    scenes = everything if split is None else read_scenes(out_dir, split)
    captions: dict[str, list[tuple[int, str]]] = {image_id: [] for image_id in scenes}
    with open(token_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                key, caption = line.rstrip("\n").split("\t", 1)
                image, n = key.split("#")
                image_id = image.removesuffix(".jpg")
                if image_id not in everything:
                    raise ValueError(f"{token_file}: caption of {image}, which scenes.jsonl lacks; the "
                                     "corpus is incomplete: write it again with make-demo --overwrite")
                if image_id in captions:
                    captions[image_id].append((int(n), caption))
    return {image_id: [c for _, c in sorted(captions[image_id])] + attribute_texts(scene, template)
            for image_id, scene in scenes.items()}
