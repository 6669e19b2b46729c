"""The training run's configuration: defaults that reproduce the seed note, named presets, TOML files.

Precedence: the dataclass defaults (the seed's set-up) < the preset < the TOML file < command-line options.
The resolved configuration is saved in RUN_DIR/config.json and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from trainer.model import PRESETS as ENCODER_PRESETS
from trainer.model import EncoderConfig

# TrainConfig fields that are EncoderConfig fields (the CLIP dimension and the input dims come from the cache)
ENCODER_FIELDS = ("layers", "heads", "width", "ff_dim", "dropout", "pos_emb", "pooling", "padding_mask",
                  "max_frames")
_SEED = EncoderConfig


@dataclass(frozen=True)
class TrainConfig:
    cache: str = ""
    out: str = ""
    preset: str = "seed"
    # model: the seed's encoder (trainer.model.EncoderConfig defaults)
    layers: int = _SEED.layers
    heads: int = _SEED.heads
    width: int = _SEED.width
    ff_dim: int = _SEED.ff_dim
    dropout: float = _SEED.dropout
    pos_emb: str = _SEED.pos_emb      # none | sinusoidal | learned
    pooling: str = _SEED.pooling      # first | mean | attention
    padding_mask: bool = _SEED.padding_mask
    max_frames: int = _SEED.max_frames
    # loss
    symmetric: bool = True
    targets: str = "image"            # image | text | image+text
    one_caption_per_image: bool = True
    # optimisation (REFERENCE.md §1)
    steps: int = 25_000
    batch_size: int = 64
    batch_schedule: str = ""          # e.g. "64:2000,256:4000,1024"; overrides batch_size when set
    lr: float = 4e-4
    weight_decay: float = 0.01
    warmup: int = 1000
    grad_clip: float = 0.0            # max gradient norm; 0 = off (the seed did not clip)
    spec_augment: bool = True
    bucket: bool = True               # length-bucketed batches (less padding, faster steps)
    seed: int = 42
    # run
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    compile: bool = False
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 50
    best_metric: str = "keyword_mAP"  # keyword_mAP | audio_to_image_R@10 | image_to_audio_R@10 | loss
    eval_batch_size: int = 256
    resume: bool = False              # continue RUN_DIR/last.pt (model, optimiser, RNG, sampler position)
    stop_after: int = 0               # stop after this many steps in this invocation (0 = run to `steps`)
    threads: int = 0                  # CPU threads for torch (0 = torch's default)
    progress: bool = True

    def __post_init__(self):
        choices = {"pos_emb": ("none", "sinusoidal", "learned"), "pooling": ("first", "mean", "attention"),
                   "targets": ("image", "text", "image+text"), "preset": tuple(PRESETS),
                   "best_metric": ("keyword_mAP", "audio_to_image_R@10", "image_to_audio_R@10", "loss")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("steps", "batch_size", "layers", "heads", "width", "ff_dim", "max_frames", "eval_every",
                     "save_every", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be at least 1")
        if self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("lr must be positive; warmup, weight_decay and grad_clip 0 or more")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named presets: `seed` is the note's exact set-up (for real corpora); `demo` fits the demo's 2-core budget:
# REFERENCE.md §8 found 4 layers, lr 1e-3, mean pooling over unpadded frames and bucketed batches learn
# in 90 s where the seed settings barely move.
def _encoder(name: str) -> dict:
    return {k: getattr(ENCODER_PRESETS[name], k) for k in ENCODER_FIELDS}


PRESETS: dict[str, dict] = {
    "seed": _encoder("seed"),
    "demo": {**_encoder("demo"), "lr": 1e-3, "warmup": 100, "steps": 1200, "batch_size": 64, "grad_clip": 1.0,
             "eval_every": 200, "save_every": 200, "log_every": 20, "threads": 2},
}

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    return data


def resolve_config(preset: str | None = None, toml: str | Path | None = None, **options) -> TrainConfig:
    """Defaults < preset < TOML < options (options that are None are not set)."""
    file = load_toml(toml) if toml else {}
    name = preset or file.get("preset") or "seed"
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: use one of {', '.join(PRESETS)}")
    merged = {**PRESETS[name], **file, **{k: v for k, v in options.items() if v is not None}, "preset": name}
    unknown = sorted(set(merged) - FIELDS)
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}")
    return TrainConfig(**merged)


def with_overrides(cfg: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)

