"""Checkpoints: one plain dict (model dims, run config, weights, optimiser, RNG and sampler state), written
atomically so a crash mid-write never leaves a truncated last.pt or best.pt."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cache.manifest import atomic_target
from trainer.model import CnnTransformer, EncoderConfig


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_target(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint here (train writes RUN_DIR/last.pt and best.pt)")
    try:
        # our own files, but they hold numpy RNG state and config dicts: weights_only=False is needed
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "model" not in state or "encoder" not in state:
        raise ValueError(f"{path}: not a clipspeech checkpoint (no 'model'/'encoder' entries)")
    return state


def cache_identity(manifest: dict) -> dict:
    """What a checkpoint records of the cache it was trained on: the feature recipe and the CLIP teacher."""
    return {"features": manifest.get("audio", {}).get("features"), "clip": manifest.get("clip")}


# of the 'clip' section, what makes the teacher another one; the rest says how its embeddings were computed or
# stored (--format, --dtype, part size, --gpu-decode, precision, open_clip's version), which leaves them equal
# or within float16 rounding: a run trained on an hdf5 cache may be evaluated on a wds copy of it
TEACHER_KEYS = ("model", "pretrained", "weights_sha256", "random_init_seed", "embed_dim", "preprocess")


def _compared(section: str, settings: dict) -> dict:
    return {k: settings.get(k) for k in TEACHER_KEYS} if section == "clip" else settings


def check_same_cache(manifest: dict, state: dict, checkpoint: Path, cache: Path, fix: str) -> None:
    """A checkpoint is only meaningful against the features and the CLIP teacher it was trained with:
    ValueError naming the differing settings and `fix` otherwise."""
    trained, now = state.get("cache") or {}, cache_identity(manifest)
    for section in ("features", "clip"):
        if trained.get(section) is None or now[section] is None:
            continue
        before, after = _compared(section, trained[section]), _compared(section, now[section])
        if before != after:
            # another recipe or model altogether: its name says it (its other settings differ by the dozen)
            keys = ["name"] if before.get("name") != after.get("name") else \
                sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            diff = ", ".join(f"{k} {_short(before.get(k))} -> {_short(after.get(k))}" for k in keys)
            raise ValueError(f"{checkpoint} was trained on a cache with other {section} settings than {cache} "
                             f"({diff}); {fix}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:12] + "..." + text[-6:]   # e.g. a sha256


def load_encoder(path: str | Path, device="cpu") -> tuple[CnnTransformer, dict]:
    """The trained encoder of a checkpoint, in eval mode, and the whole checkpoint dict."""
    state = load_checkpoint(path)
    model = CnnTransformer(EncoderConfig.from_dict(state["encoder"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """Every random stream a step draws from; of the GPUs, only `device`'s (a checkpoint written where 8
    GPUs were visible must resume where 1 is)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "augment": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Restores what rng_state saved. RNG states must be CPU byte tensors: load the checkpoint with
    map_location="cpu"."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["augment"].cpu())
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):   # checkpoints before 2026-11-25: one state per visible GPU
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)
