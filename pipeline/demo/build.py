"""make-demo: the synthetic corpus and its CLIP teacher in one folder; a rerun reuses what is complete."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cache.manifest import settings_diff
from pipeline.corpus import read_flickr8k
from pipeline.demo.make_demo import CONFIG_FILE, DemoConfig, teacher_training_texts, write_demo_corpus
from pipeline.demo.teacher import METRICS_FILE, TeacherConfig, fit_teacher

TEACHER_DIR = "teacher"


@dataclass(frozen=True)
class MakeDemoConfig:
    corpus: DemoConfig
    teacher: TeacherConfig = TeacherConfig()


def _existing_corpus(cfg: DemoConfig) -> dict | None:
    """The settings of a complete demo corpus at cfg.out, if there is one with the same seed and size."""
    marker = cfg.out / CONFIG_FILE
    if not marker.is_file():
        return None
    made = json.loads(marker.read_text())
    if (made.get("images"), made.get("seed"), made.get("image_size")) != (cfg.images, cfg.seed, cfg.image_size):
        if not cfg.overwrite:
            raise ValueError(f"{cfg.out} holds a demo corpus of {made.get('images')} images with seed "
                             f"{made.get('seed')}; pass --overwrite to replace it, or another --out")
        return None
    return made


def teacher_pairs(corpus_dir: Path) -> tuple[list, list]:
    """(train, test) for fit_teacher: train images with captions + attribute texts; test images with captions."""
    corpus = read_flickr8k(corpus_dir)
    path_of = {u.image_id: u.image_path for u in corpus.utterances}
    texts = teacher_training_texts(corpus_dir, split="train")
    train = [(path_of[i], t) for i, t in texts.items()]
    test: dict[str, list[str]] = {}
    for u in corpus.utterances:
        if u.split == "test":
            test.setdefault(u.image_id, []).append(u.caption)
    return train, [(path_of[i], caps) for i, caps in test.items()]


def make_demo(cfg: MakeDemoConfig) -> dict:
    """Writes (or reuses) the corpus at cfg.corpus.out and the teacher in its teacher/ folder."""
    out = cfg.corpus.out
    made = _existing_corpus(cfg.corpus)
    summary: dict = {"corpus": str(out), "teacher": str(out / TEACHER_DIR)}
    if made is None:
        summary["written"] = write_demo_corpus(cfg.corpus)
    else:
        summary["reused"] = made
    metrics_path = out / TEACHER_DIR / METRICS_FILE
    if metrics_path.is_file() and made is not None:
        metrics = json.loads(metrics_path.read_text())
        diffs = settings_diff(metrics.get("config", {}), asdict(cfg.teacher), holder="it")
        if diffs:   # refitting would silently change every embedding a cache made from this teacher holds
            raise ValueError(f"{out / TEACHER_DIR} was fitted with other settings:\n  " + "\n  ".join(
                diffs) + f"\nFix: ask for the same settings (e.g. --teacher-steps "
                f"{metrics.get('config', {}).get('steps')}), or delete {out / TEACHER_DIR} (and the caches "
                "made with it) to fit it again")
        summary["teacher_metrics"] = metrics
    else:
        train, test = teacher_pairs(out)
        summary["teacher_metrics"] = fit_teacher(train, test, out / TEACHER_DIR, cfg.teacher)
    return summary
