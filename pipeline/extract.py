"""The extract-audio stage: corpus audio -> features in CACHE/audio, in parallel, resumable and shardable.

Utterances are cut, in corpus order, into parts of `part_size`; each part is computed and written by one
process under a temporary name and renamed when complete, so a rerun after a crash skips finished parts
and produces the same bytes as an uninterrupted run. `shard=(i, n)` takes the parts k with k % n == i.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.manifest import (atomic_write_json, claim_section, read_records, record_stage_failures,
                            write_records)
from cache.store import FORMATS, PartWriter, build_index, completed_parts, part_path
from pipeline.corpus import Corpus, read_corpus
from pipeline.features import get_recipe
from pipeline.versions import versions

AUDIO_STORE = "audio"
DEFAULT_PART_SIZE = 500
PROGRESS_EVERY = 16      # utterances between progress messages from a worker
FAILURES_DIR = "failures"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class ExtractConfig:
    data: Path
    cache: Path
    recipe: str = "mfcc-seed"
    recipe_options: tuple = ()               # (name, value) pairs passed to the recipe's config
    fmt: str = "hdf5"
    workers: int = field(default_factory=default_workers)
    shard: tuple[int, int] = (0, 1)
    part_size: int = DEFAULT_PART_SIZE
    max_failures: int = 100
    batch_device: str | None = None          # e.g. "cuda": workers decode, features computed there in batches
    batch_size: int = 64                     # utterances per batched feature computation
    index_only: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"--format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard {i}/{n}: expected I/N with 0 <= I < N, e.g. 0/4")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: need at least 1")
        if self.part_size < 1:
            raise ValueError(f"--part-size {self.part_size}: need at least 1")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures {self.max_failures}: must be 0 or more")


@dataclass
class ExtractSummary:
    utterances: int = 0          # in the corpus
    parts: int = 0               # in the whole plan
    parts_done: int = 0          # written by this run
    parts_skipped: int = 0       # found complete
    written: int = 0             # utterances written by this run
    failed: int = 0              # failures in this run
    failures_total: int = 0      # failures recorded for the whole cache (when indexed)
    audio_seconds: float = 0.0
    seconds: float = 0.0
    indexed: bool = False
    missing_parts: list = field(default_factory=list)

    def lines(self) -> list[str]:
        rate = self.written / self.seconds if self.seconds else 0.0
        rt = self.audio_seconds / self.seconds if self.seconds else 0.0
        out = [f"parts: {self.parts_done} written, {self.parts_skipped} already complete, {self.parts} in the plan",
               f"utterances: {self.written} written, {self.failed} failed in this run "
               f"({rate:.0f} utt/s, {rt:.0f}x real time, {self.seconds:.1f} s)"]
        if self.indexed:
            out.append(f"index: built over all {self.parts} parts; {self.failures_total} failures recorded")
        elif self.missing_parts:
            out.append(f"index: not built yet, {len(self.missing_parts)} parts missing (other shards?); "
                       "the last shard to finish builds it, or run again with --index-only")
        return out


class TooManyFailures(RuntimeError):
    """More utterances failed than --max-failures allows; the cache holds the rest."""


# ----------------------------------------------------------------------------------------------------
# Planning


def plan_parts(n_utterances: int, part_size: int) -> list[range]:
    return [range(s, min(s + part_size, n_utterances)) for s in range(0, n_utterances, part_size)]


def _ids_digest(corpus: Corpus) -> str:
    h = hashlib.sha1()
    for u in corpus.utterances:
        h.update(u.utt_id.encode("utf-8") + b"\n")
    return h.hexdigest()


def _claim_cache(cfg: ExtractConfig, corpus: Corpus, recipe) -> None:
    """Records corpus, splits, records and the feature settings; refuses a cache made otherwise."""
    cfg.cache.mkdir(parents=True, exist_ok=True)
    claim_section(cfg.cache, "corpus", {"kind": corpus.kind, "root": corpus.root,
                                        "utterances": len(corpus.utterances), "splits": corpus.split_counts(),
                                        "ids_sha1": _ids_digest(corpus)},
                  fix="use another --cache directory for another corpus")
    claim_section(cfg.cache, "audio", {"format": cfg.fmt, "features": recipe.to_dict(), "part_size": cfg.part_size},
                  fix=f"use another --cache directory, or delete {cfg.cache / AUDIO_STORE} and the 'audio' "
                      f"section of {cfg.cache / 'cache.json'} to recompute")
    try:
        read_records(cfg.cache)
    except FileNotFoundError:
        write_records(cfg.cache, [u.to_dict() for u in corpus.utterances])


# ----------------------------------------------------------------------------------------------------
# Workers

_worker: dict = {}


def _init_worker(recipe_name: str, recipe_options: dict, progress_queue) -> None:
    import torch
    torch.set_num_threads(1)   # one process per core; more threads only contend
    _worker["recipe"] = get_recipe(recipe_name, **recipe_options)
    _worker["queue"] = progress_queue


def _tick(n: int, audio_seconds: float) -> None:
    q = _worker.get("queue")
    if q is not None:
        q.put((n, audio_seconds))


def _load(u: dict, recipe):
    """Decodes one utterance: (waveform, None) or (None, failure record)."""
    from pipeline.audio import AudioError, load_audio
    try:
        wave = load_audio(u["audio_path"])
        if wave.numel() < recipe.min_samples:
            raise AudioError(f"too short for one frame: {wave.numel()} samples")
        return wave, None
    except AudioError as e:
        return None, _failure(u, getattr(e, "reason", str(e)))
    except Exception as e:  # a decoder error we did not foresee must not stop the other 599,999
        return None, _failure(u, f"{type(e).__name__}: {e}")


def _failure(u: dict, reason: str) -> dict:
    return {"stage": "audio", "id": u["utt_id"], "path": u["audio_path"], "reason": reason}


def _meta(u: dict) -> dict:
    return {k: u[k] for k in ("image_id", "caption_id", "caption", "speaker", "split")}


def _write_part(store: Path, part: int, fmt: str, recipe, items, failures: list[dict]) -> dict:
    """Writes one part from (utterance, features) items; its failures are saved beside it before the rename."""
    attrs = {"stage": "extract-audio", "features": recipe.to_dict(), "versions": versions()}
    written = 0
    with PartWriter(store, part, fmt, dims=recipe.dims, dtype="float16", attrs=attrs) as writer:
        for u, feats in items:
            if not np.isfinite(feats).all():
                failures.append(_failure(u, "features contain NaN or Inf (corrupt samples?)"))
                continue
            writer.add(u["utt_id"], feats, meta=_meta(u))
            written += 1
        atomic_write_json(_failures_path(store, part), failures)
    return {"part": part, "written": written, "failed": len(failures)}


def _extract_part(task) -> dict:
    """Worker: decode + features + write, for one part."""
    from pipeline.features import compute
    part, utts, store, fmt = task
    recipe = _worker["recipe"]
    items, failures, seconds, pending = [], [], 0.0, 0
    for u in utts:
        wave, failure = _load(u, recipe)
        if failure is None:
            try:
                items.append((u, compute(recipe, wave).numpy()))
                seconds += wave.numel() / 16000
            except Exception as e:
                failure = _failure(u, getattr(e, "reason", f"{type(e).__name__}: {e}"))
        if failure is not None:
            failures.append(failure)
        pending += 1
        if pending == PROGRESS_EVERY:
            _tick(pending, seconds)
            pending, seconds = 0, 0.0
    _tick(pending, seconds)
    return _write_part(store, part, fmt, recipe, items, failures)


def _decode_part(task):
    """Worker of the batched path: decoding and the per-utterance steps (trimming...); the frame-level
    features are computed in the main process on the batch device."""
    from pipeline.features import prepare
    part, utts, _, _ = task
    recipe = _worker["recipe"]
    decoded, failures, seconds = [], [], 0.0
    for u in utts:
        wave, failure = _load(u, recipe)
        if failure is None:
            try:
                decoded.append((u, prepare(recipe, wave)))
                seconds += wave.numel() / 16000
            except Exception as e:
                failure = _failure(u, getattr(e, "reason", f"{type(e).__name__}: {e}"))
        if failure is not None:
            failures.append(failure)
    _tick(len(utts), seconds)
    return part, decoded, failures


def _failures_path(store: Path, part: int) -> Path:
    return store / FAILURES_DIR / f"part-{part:05d}.json"


# ----------------------------------------------------------------------------------------------------
# The stage


def extract_audio(cfg: ExtractConfig) -> ExtractSummary:
    """Runs the stage; raises TooManyFailures (after finishing the work) if failures exceed the limit."""
    started = time.perf_counter()
    recipe = get_recipe(cfg.recipe, **dict(cfg.recipe_options))   # a bad recipe fails before any work
    corpus = read_corpus(cfg.data)
    _claim_cache(cfg, corpus, recipe)
    store = cfg.cache / AUDIO_STORE
    (store / FAILURES_DIR).mkdir(parents=True, exist_ok=True)

    utts = [u.to_dict() for u in corpus.utterances]
    parts = plan_parts(len(utts), cfg.part_size)
    done = completed_parts(store)
    summary = ExtractSummary(utterances=len(utts), parts=len(parts))
    i, n = cfg.shard
    mine = [k for k in range(len(parts)) if k % n == i]
    todo = [k for k in mine if k not in done]
    summary.parts_skipped = len(mine) - len(todo)
    for k in todo:   # leftovers of a killed run of this shard
        for tmp in store.glob(part_path(store, k, cfg.fmt).name + ".tmp*"):
            tmp.unlink()

    if todo and not cfg.index_only:
        tasks = [(k, [utts[j] for j in parts[k]], store, cfg.fmt) for k in todo]
        total = sum(len(t[1]) for t in tasks)
        _run_parts(cfg, recipe, tasks, total, summary)

    done = completed_parts(store)
    summary.missing_parts = [k for k in range(len(parts)) if k not in done]
    if not summary.missing_parts:
        build_index(store)
        failures = []
        for k in range(len(parts)):
            path = _failures_path(store, k)
            if path.is_file():
                failures.extend(json.loads(path.read_text()))
        record_stage_failures(cfg.cache, "audio", failures)
        summary.indexed, summary.failures_total = True, len(failures)
    summary.seconds = time.perf_counter() - started
    if summary.failed > cfg.max_failures or summary.failures_total > cfg.max_failures:
        raise TooManyFailures("\n".join(
            [f"{max(summary.failed, summary.failures_total)} utterances failed, more than --max-failures "
             f"{cfg.max_failures}; see {cfg.cache / 'failures.jsonl'}"] + summary.lines()))
    return summary


def _run_parts(cfg: ExtractConfig, recipe, tasks: list, total: int, summary: ExtractSummary) -> None:
    from tqdm import tqdm
    ctx = mp.get_context("spawn")     # never fork a process that holds torch threads or HDF5 handles
    progress_queue = ctx.Queue()
    bar = tqdm(total=total, unit="utt", desc="extract-audio", disable=not cfg.progress, smoothing=0.1)
    audio_seconds = 0.0
    batched = cfg.batch_device is not None
    worker_fn = _decode_part if batched else _extract_part
    # a bounded number of parts in flight keeps memory flat, whatever the corpus size
    in_flight_max = 2 * cfg.workers
    with ctx.Pool(cfg.workers, initializer=_init_worker,
                  initargs=(cfg.recipe, dict(cfg.recipe_options), progress_queue)) as pool:
        pending = list(tasks)
        running: list = []
        while pending or running:
            while pending and len(running) < in_flight_max:
                running.append(pool.apply_async(worker_fn, (pending.pop(0),)))
            try:
                n, secs = progress_queue.get(timeout=0.1)
                audio_seconds += secs
                bar.update(n)
                hours_per_s = audio_seconds / 3600 / max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{hours_per_s:.3g} audio h/s")
            except queue.Empty:
                pass
            for res in [r for r in running if r.ready()]:
                running.remove(res)
                out = res.get()        # re-raises a worker's unexpected error here
                if batched:
                    out = _features_on_device(cfg, recipe, *out)
                summary.parts_done += 1
                summary.written += out["written"]
                summary.failed += out["failed"]
        while True:   # drain the last ticks
            try:
                n, secs = progress_queue.get_nowait()
            except queue.Empty:
                break
            audio_seconds += secs
            bar.update(n)
    bar.close()
    summary.audio_seconds = audio_seconds


def _features_on_device(cfg: ExtractConfig, recipe, part: int, decoded: list, failures: list) -> dict:
    """Batched path: the decoded waves of one part through compute_batch on cfg.batch_device, then written."""
    from pipeline.features import compute_batch
    items = []
    for s in range(0, len(decoded), cfg.batch_size):
        chunk = decoded[s:s + cfg.batch_size]
        feats = compute_batch(recipe, [w for _, w in chunk], cfg.batch_device, prepared=True)
        items.extend((u, f.float().cpu().numpy()) for (u, _), f in zip(chunk, feats))
    return _write_part(cfg.cache / AUDIO_STORE, part, cfg.fmt, recipe, items, failures)
