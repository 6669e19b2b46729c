"""The training run's configuration: defaults that reproduce the seed note, named presets, TOML files.

Precedence: the dataclass defaults (the seed's set-up) < the preset < the TOML file < command-line options.
With --resume of a run that has a last.pt, the run's own RUN_DIR/config.json comes between the preset and the
TOML file, so `train --cache C --out RUN --resume` continues a run with the settings it was started with.
The resolved configuration is saved in RUN_DIR/config.json and in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cache.manifest import read_utf8

from trainer.loss import TARGETS
from trainer.model import CONV_INITS, POOLINGS, POS_EMBS
from trainer.model import PRESETS as ENCODER_PRESETS
from trainer.model import EncoderConfig
from trainer.schedule import parse_batch_schedule

# TrainConfig fields that are EncoderConfig fields (the CLIP dimension and the input dims come from the cache)
ENCODER_FIELDS = ("layers", "heads", "width", "ff_dim", "dropout", "pos_emb", "pooling", "padding_mask",
                  "max_frames", "conv_init")
BEST_METRICS = ("keyword_mAP", "audio_to_image_R@10", "image_to_audio_R@10", "loss")
DATA_MODES = ("memory", "stream")
# torch.compile modes; reduce-overhead replays CUDA graphs (fewer kernel launches: the small-batch remedy)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
_SEED = EncoderConfig


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of `clipspeech train`; the defaults are the seed note's set-up (REFERENCE.md §1),
    except that batches are length-bucketed and hold one caption per image (the issue asks for both)."""
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
    conv_channels: int = _SEED.conv[0][0]   # hidden conv layers' channels (the last has `width`)
    conv_init: str = _SEED.conv_init  # pytorch (the seed) | kaiming
    # loss
    symmetric: bool = True
    targets: str = "image"            # image | text | image+text
    one_caption_per_image: bool = True
    # optimisation (REFERENCE.md §1)
    steps: int = 25_000
    batch_size: int = 64              # global batch (all processes together)
    batch_schedule: str = ""          # e.g. "64:2000,256:4000,1024"; overrides batch_size when set
    lr: float = 4e-4
    weight_decay: float = 0.01
    warmup: int = 1000
    grad_clip: float = 0.0            # max gradient norm; 0 = off (the seed did not clip)
    spec_augment: bool = True
    bucket: bool = True               # length-bucketed batches (less padding, faster steps)
    seed: int = 42
    # data path
    data_mode: str = "memory"         # memory: the split in one tensor | stream: wds shards, reader processes
    workers: int = 2                  # stream: reader processes per training process (0 = in this process)
    stream_buffer: int = 4096         # stream: utterances length-bucketed together (raised to 4 batches)
    # run
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    compile: bool = False             # torch.compile, one graph per 128-frame length bucket
    compile_mode: str = "default"     # with compile: default | reduce-overhead (CUDA graphs) | max-autotune ...
    eval_every: int = 1000
    save_every: int = 1000
    log_every: int = 50
    best_metric: str = "keyword_mAP"  # keyword_mAP | audio_to_image_R@10 | image_to_audio_R@10 | loss
    eval_batch_size: int = 256
    resume: bool = False              # continue RUN_DIR/last.pt (model, optimiser, RNG, sampler position)
    stop_after: int = 0               # stop after this many steps in this invocation (0 = run to `steps`)
    threads: int = 0                  # CPU threads for torch (0 = torch's default)
    cpu_bf16: bool = False            # bf16 autocast on a CPU with native bf16 (AVX512-BF16/AMX); else fp32
    progress: bool = True

    def __post_init__(self):
        _check_types(self)
        choices = {"pos_emb": POS_EMBS, "pooling": POOLINGS, "conv_init": CONV_INITS, "targets": TARGETS,
                   "preset": tuple(PRESETS),
                   "best_metric": BEST_METRICS, "data_mode": DATA_MODES, "compile_mode": COMPILE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} = {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("steps", "layers", "heads", "width", "ff_dim", "max_frames", "conv_channels", "eval_every",
                     "save_every", "log_every", "eval_batch_size", "stream_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be at least 1")
        if self.batch_size < 2:
            raise ValueError(f"batch_size = {self.batch_size}: must be at least 2 (a batch of one has no "
                             "negatives)")
        for name in ("warmup", "stop_after", "threads", "workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be 0 or more")
        for name, least in (("lr", "above 0"), ("weight_decay", "0 or more"), ("grad_clip", "0 or more")):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name == "lr"):
                raise ValueError(f"{name} = {value}: must be a finite number, {least}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout = {self.dropout}: must be in [0, 1)")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode = {self.compile_mode!r} needs compile = true (--compile)")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.batch_schedule:
            if any(size < 2 for _, size in parse_batch_schedule(self.batch_schedule)):
                raise ValueError(f"batch_schedule {self.batch_schedule!r}: every batch size must be at "
                                 "least 2")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def batch_sizes(self) -> list[tuple[int, int]]:
        """(first step, global batch size) pairs: the schedule, or the constant batch_size."""
        return parse_batch_schedule(self.batch_schedule or str(self.batch_size))


def _check_types(cfg: TrainConfig) -> None:
    """A TOML file or a caller can give "100" for 100: say which setting, instead of failing later."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), type(f.default)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))   # lr = 1 in TOML means 1.0
            ok = True
        if not ok:
            raise ValueError(f"{f.name} = {value!r}: expected {kind.__name__}, got {type(value).__name__}")


# Named presets: `seed` is the note's exact set-up (for real corpora); `demo` fits the demo's 2-core budget
# (docs/demo-tuning.md has the measurements): lr 2e-3 (with He init; +5 R@10 over 1e-3 in 6 paired seeds), bucketed
# batches, the caption embedding as a second target (image+text: test R@10 80 against 71), bf16 where the CPU
# has it (a 1.3x faster run, the same recall) and 4 dev evaluations (curves for the report).
def _encoder(name: str) -> dict:
    preset = ENCODER_PRESETS[name]
    return {**{k: getattr(preset, k) for k in ENCODER_FIELDS}, "conv_channels": preset.conv[0][0]}


PRESETS: dict[str, dict] = {
    "seed": _encoder("seed"),
    "demo": {**_encoder("demo"), "lr": 2e-3, "warmup": 150, "steps": 400, "batch_size": 64, "grad_clip": 1.0,
             "targets": "image+text", "cpu_bf16": True, "eval_every": 100, "save_every": 400, "log_every": 20,
             "threads": 2},
}

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_toml(path: str | Path) -> dict:
    """The settings of a flat TOML file (keys are TrainConfig fields; dashes allowed for underscores)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = tomllib.loads(read_utf8(path))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    tables = sorted(k for k, v in data.items() if isinstance(v, dict))
    if tables:
        raise ValueError(f"{path}: sections [{', '.join(tables)}] are not supported; write the settings "
                         "at the top level, e.g. steps = 5000")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    return data


# settings of one invocation, not of the run: --resume does not take them from the run's config.json
INVOCATION_FIELDS = ("cache", "out", "resume", "stop_after", "device", "threads", "progress")


def _run_settings(out: str) -> dict:
    """The settings in OUT/config.json of a run that has a last.pt (the run --resume continues), less the
    invocation's own; {} where there is no such run."""
    out = Path(out)
    path = out / "config.json"
    if not (out / "last.pt").is_file() or not path.is_file():
        return {}
    try:
        saved = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); --resume takes the run's settings from it: give "
                         "them all on the command line after deleting the file") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a run's settings (a JSON object expected)")
    # a field an older clipspeech wrote and this one dropped has no meaning here
    return {k: v for k, v in saved.items() if k in FIELDS and k not in INVOCATION_FIELDS}


def resolve_config(preset: str | None = None, toml: str | Path | None = None, **options) -> TrainConfig:
    """Defaults < preset < (on --resume) the run's config.json < TOML < options (options that are None are
    not set)."""
    file = load_toml(toml) if toml else {}
    given = {**file, **{k: v for k, v in options.items() if v is not None}}
    saved = _run_settings(given["out"]) if given.get("resume") and given.get("out") else {}
    name = preset or file.get("preset") or saved.get("preset") or "seed"
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: use one of {', '.join(PRESETS)}")
    if saved and saved.get("preset", name) != name:
        raise ValueError(f"--preset {name}: {Path(given['out']) / 'last.pt'} was trained with preset "
                         f"{saved['preset']}; --resume takes the run's settings from its config.json: leave out "
                         "--preset, or start a new run (another --out)")
    merged = {**PRESETS[name], **saved, **given, "preset": name}
    unknown = sorted(set(merged) - FIELDS)
    if unknown:
        raise ValueError(f"unknown settings {', '.join(unknown)}")
    for required, what in (("cache", "the cache folder"), ("out", "the run folder")):
        if not merged.get(required):
            raise ValueError(f"--{required} ({what}) is required: give it on the command line or as "
                             f"{required} = \"...\" in the --config file")
        merged[required] = os.path.expanduser(str(merged[required]))   # a TOML file's "~/runs/a" (no shell)
    return TrainConfig(**merged)
