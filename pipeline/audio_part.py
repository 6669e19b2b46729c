"""One part of CACHE/audio, the unit of extract-audio's work: decode each utterance, compute its features
(length-sorted batches), write the part with its failures. Runs in the stage's worker processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cache.manifest import atomic_write_json
from cache.store import PartWriter, failures_path
from pipeline.audio import AudioError, load_audio
from pipeline.features import compute_batch, prepare
from pipeline.recipes import get_recipe
from pipeline.stopping import die_with_parent, ignore_stop_signals
from pipeline.versions import versions

STORE_DTYPE = "float16"
CPU_BATCH = 8                # utterances per feature call in a worker: amortises torch's per-op overhead
WINDOW = 64                  # utterances a worker decodes, then computes in length-sorted batches
META_KEYS = ("image_id", "caption_id", "caption", "speaker", "split")  # stored with each utterance


def store_attrs(recipe) -> dict:
    """What every part of the audio store records of how it was made (the stage refuses to mix)."""
    return {"stage": "extract-audio", "features": recipe.to_dict(), "versions": versions()}


def _failure(u: dict, reason: str) -> dict:
    return {"stage": "audio", "id": u["utt_id"], "path": u["audio_path"], "reason": reason}


def decode_all(utts: list[dict], recipe, failures: list[dict], resampled: dict[int, int]) -> tuple[list, float]:
    """Decodes and prepares (trim...) each utterance: [(utterance, wave [S'] float32)] and the seconds of
    audio decoded; the ones that fail are appended to `failures` instead; `resampled` counts the files at
    each other rate."""
    decoded, seconds = [], 0.0
    for u in utts:
        path = u["audio_path"]
        try:
            wave = load_audio(path, recipe.sample_rate, resampled)   # at the rate the recipe's frames assume
            decoded.append((u, prepare(recipe, wave, known_finite=True).numpy()))
            seconds += len(wave) / recipe.sample_rate
        except AudioError as err:
            failures.append(_failure(u, err.reason))
        except Exception as err:  # a decoder error nobody foresaw must not stop the other 599,999 utterances
            failures.append(_failure(u, f"{type(err).__name__}: {err}"))
    return decoded, seconds


def compute_features(recipe, waves: list[np.ndarray], device: str = "cpu", batch_size: int = CPU_BATCH
                     ) -> list[np.ndarray]:
    """Features [T_i, dims] float32 of prepared waves [S_i], in length-sorted padded batches on `device`.

    Sorting keeps the padding small. The batches depend only on the waves, so the same part gives the
    same bytes whenever it is computed (a resumed or sharded run equals an uninterrupted one).
    """
    order = sorted(range(len(waves)), key=lambda i: (len(waves[i]), i))
    out: list[np.ndarray] = [np.empty(0)] * len(waves)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        feats = compute_batch(recipe, [torch.from_numpy(waves[i]) for i in chunk], device, prepared=True)
        for i, f in zip(chunk, feats):
            out[i] = f.float().cpu().numpy()
    return out


def _add_all(writer: PartWriter, items, failures: list[dict]) -> int:
    """Adds (utterance, features) items; non-finite ones become failures. Returns how many were added."""
    added = 0
    for u, feats in items:
        with np.errstate(over="ignore"):
            stored = feats.astype(STORE_DTYPE)
        if not np.isfinite(feats).all():
            failures.append(_failure(u, "features contain NaN or Inf (corrupt samples?)"))
        elif not np.isfinite(stored).all():  # the store would refuse the whole part
            failures.append(_failure(u, f"features beyond the range of {STORE_DTYPE} (max 65504)"))
        else:
            writer.add(u["utt_id"], stored, meta={k: u[k] for k in META_KEYS})
            added += 1
    return added


def write_part(store: Path, part: int, fmt: str, recipe, utts: list[dict], batches, failures: list[dict]) -> dict:
    """Writes one part from an iterable of lists of (utterance, features). The part's failures file is
    written before the part's rename, so a complete part always has its failures on disk."""
    written = 0
    attrs = store_attrs(recipe)
    with PartWriter(store, part, fmt, dims=recipe.dims, dtype=STORE_DTYPE, attrs=attrs) as writer:
        for batch in batches:
            written += _add_all(writer, batch, failures)
        position = {u["utt_id"]: i for i, u in enumerate(utts)}
        failures.sort(key=lambda f: position[f["id"]])
        atomic_write_json(failures_path(store, part), failures)
    return {"part": part, "written": written, "failed": len(failures)}


_worker: dict = {}  # each worker process's recipe, store, format and progress queue


def init_worker(recipe_name: str, recipe_options: dict, store: Path, fmt: str, ticks) -> None:
    ignore_stop_signals()          # the stage's main process stops the pool (pipeline/stopping.py)
    die_with_parent()              # and when it is killed, the pool dies with it
    torch.set_num_threads(1)  # one process per core; more threads per process only contend
    _worker.update(recipe=get_recipe(recipe_name, **recipe_options), store=store, fmt=fmt, ticks=ticks)


def extract_part(task: tuple[int, list[dict]]) -> dict:
    """Worker of the CPU path: decode, compute and write one part, a window at a time (bounded memory)."""
    part, utts = task
    recipe, failures, audio_seconds, resampled = _worker["recipe"], [], [0.0], {}

    def windows():
        for s in range(0, len(utts), WINDOW):
            decoded, seconds = decode_all(utts[s:s + WINDOW], recipe, failures, resampled)
            feats = compute_features(recipe, [w for _, w in decoded])
            audio_seconds[0] += seconds
            _worker["ticks"].put((len(utts[s:s + WINDOW]), seconds))
            yield [(u, f) for (u, _), f in zip(decoded, feats)]

    out = write_part(_worker["store"], part, _worker["fmt"], recipe, utts, windows(), failures)
    return {**out, "audio_seconds": audio_seconds[0], "resampled": resampled}


def decode_part(task: tuple[int, list[dict]]):
    """Worker of the batched path: decoding and the per-utterance steps only; the main process computes
    the features on the batch device."""
    part, utts = task
    failures: list[dict] = []
    resampled: dict[int, int] = {}
    decoded, seconds = decode_all(utts, _worker["recipe"], failures, resampled)
    return part, utts, decoded, failures, seconds, resampled
