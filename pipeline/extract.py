"""The extract-audio stage: corpus audio -> features in CACHE/audio, in worker processes, resumable after a
crash and shardable over array jobs (cache layout: docs/design.md)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cache.index import build_index
from cache.manifest import (AUDIO_STORE, IMAGE_STORE, RECORDS, SPEAKER_CMVN, CacheMismatchError, atomic_write_json,
                            TEXT_STORE, atomic_write_text, claim_section, read_manifest, read_records,
                            record_stage_failures, records_complete, records_text, replace_section, settings_diff,
                            shard_lock, whole_lines)
from cache.reader import StoreReader
from cache.store import (FAILURES_DIR, FORMATS, STORE_JSON, check_shard, completed_parts, part_path,
                         parts_to_write, plan_parts, recorded_failures, shard_parts, store_settings_diff)
from pipeline.audio_part import (STORE_DTYPE, compute_features, decode_part, extract_part, init_worker, store_attrs,
                                 write_part)
from pipeline.corpus import Corpus, read_corpus
from pipeline.features import NORM_EPS
from pipeline.recipes import get_recipe
from pipeline.stopping import raise_if_stopped, stop_requested

DEFAULT_PART_SIZE = 500      # utterances per part: the unit of resume and sharding


def check_device(name: str) -> None:
    """A stage's --device: cpu, cuda or cuda:N, and a GPU where cuda is asked for; ValueError otherwise."""
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: use cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here; use --device cpu")


def default_workers() -> int:
    """Cores this process may use (its CPU affinity), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class ExtractConfig:
    data: Path
    cache: Path
    recipe: str = "mfcc-seed"
    recipe_options: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs overriding the recipe's defaults
    fmt: str = "hdf5"
    workers: int = field(default_factory=default_workers)
    shard: tuple[int, int] = (0, 1)
    part_size: int = DEFAULT_PART_SIZE
    max_failures: int = 100
    batch_device: str | None = None   # e.g. "cuda": workers only decode, features computed there in batches
    batch_size: int = 64              # utterances per batched feature computation on batch_device
    index_only: bool = False
    retry_failed: bool = False        # compute the complete parts that recorded failures again
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "data", Path(self.data).expanduser())
        object.__setattr__(self, "cache", Path(self.cache).expanduser())
        if self.fmt not in FORMATS:
            raise ValueError(f"--format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        check_shard(self.shard)
        for name in ("workers", "part_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: need at least 1")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures {self.max_failures}: must be 0 or more")
        if self.index_only and self.retry_failed:
            raise ValueError("--retry-failed computes parts again and --index-only computes none: run the one, "
                             "then the other")
        if self.cache.exists() and not self.cache.is_dir():
            raise ValueError(f"--cache {self.cache} is a file; give a folder (created if missing)")
        if self.batch_device is not None:
            check_device(self.batch_device)


@dataclass
class ExtractSummary:
    """What one run did; `lines()` is what the command prints."""
    cache: Path
    utterances: int = 0          # in the corpus
    parts: int = 0               # in the whole plan (all shards)
    shard: tuple[int, int] = (0, 1)
    workers: int = 1
    parts_done: int = 0          # written by this run
    parts_skipped: int = 0       # of this shard, found complete
    parts_retried: int = 0       # complete ones with failures, computed again (--retry-failed)
    written: int = 0             # utterances written by this run
    failed: int = 0              # utterances that failed in this run
    failures: dict[str, int] = field(default_factory=dict)  # kind -> count, over all complete parts
    audio_seconds: float = 0.0   # decoded by this run
    resampled: dict[int, int] = field(default_factory=dict)   # files at another rate than the recipe's, by rate
    sample_rate: int = 16000     # the recipe's
    work_seconds: float = 0.0    # from starting the workers to the last part written
    seconds: float = 0.0         # the whole run
    indexed: int | None = None   # utterances in the index, when this run built it
    missing_parts: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # e.g. the corpus moved

    @property
    def failures_total(self) -> int:
        return sum(self.failures.values())

    def lines(self) -> list[str]:
        i, n = self.shard
        out = [f"extract-audio: {self.utterances} utterances in {self.parts} parts"
               f"{f', shard {i}/{n}' if n > 1 else ''}; this run wrote {self.parts_done} parts, "
               f"{self.parts_skipped} were already complete"
               f"{f' ({self.parts_retried} computed again for their failures)' if self.parts_retried else ''}",
               *self.notes]
        if self.parts_done:
            per_s = 1 / self.work_seconds if self.work_seconds else 0.0
            out.append(f"utterances: {self.written} written, {self.failed} failed; "
                       f"{self.audio_seconds / 3600:.2f} h of audio in {self.work_seconds:.1f} s with "
                       f"{self.workers} workers ({(self.written + self.failed) * per_s:.0f} utt/s, "
                       f"{self.audio_seconds * per_s:.0f}x real time; {self.seconds:.1f} s in all)")
        if self.resampled:   # telephone speech at 8 kHz has nothing above 4 kHz: worth knowing before training
            rates = ", ".join(f"{n} at {rate} Hz" for rate, n in sorted(self.resampled.items()))
            low = min(self.resampled)
            band = (f"; below {self.sample_rate} Hz the band above {low // 2} Hz is empty"
                    if low < self.sample_rate else "")
            out.append(f"resampled to {self.sample_rate} Hz: {rates}{band}")
        where = "failures.jsonl" if self.indexed is not None else f"{AUDIO_STORE}/{FAILURES_DIR}"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items(), key=lambda kv: -kv[1]))
        failed = (f"{self.failures_total} failed ({kinds}; listed in {self.cache / where})" if self.failures
                  else "none failed")
        if self.indexed is not None:
            out.append(f"index: {self.indexed} utterances in {self.parts} parts; {failed}")
        else:
            names = _first([f"{k:05d}" for k in self.missing_parts])
            out.append(f"index: not built yet, {len(self.missing_parts)} of {self.parts} parts missing "
                       f"(parts {names}: other --shard jobs?); the last job to finish builds it, or run "
                       f"--index-only once all have; so far {failed}")
        return out


class WorkerDied(RuntimeError):
    """A worker process was killed; completed parts are kept and a rerun resumes."""


class TooManyFailures(RuntimeError):
    """More utterances failed than --max-failures allows; the cache holds the rest (`.summary`)."""

    def __init__(self, summary: ExtractSummary, max_failures: int):
        self.summary = summary
        if summary.failures_total > max_failures:
            why = (f"error: {summary.failures_total} utterances failed, more than --max-failures {max_failures}: "
                   "fix those files (reasons listed above) and run again with --retry-failed, or raise "
                   "--max-failures")
        else:   # under the limit, but nothing is left to train on: a wrong setting, not a few bad files
            why = (f"error: all {summary.failures_total} utterances failed (reasons listed above): check the "
                   "feature options (--option) and the corpus' audio")
        super().__init__("\n".join(summary.lines() + [why]))


def _first(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


# ---- planning and the cache's self-description ----

def corpus_digest(corpus: Corpus) -> str:
    """sha1 of the utterance ids in corpus order: the plan of parts depends on exactly that order."""
    return hashlib.sha1("".join(u.utt_id + "\n" for u in corpus.utterances).encode("utf-8")).hexdigest()


def corpus_section(corpus: Corpus) -> dict:
    """cache.json's 'corpus' section: which corpus the cache's audio and embeddings are of. Claimed by
    whichever stage runs first, so that the other refuses another corpus."""
    return {"kind": corpus.kind, "root": corpus.root, "utterances": len(corpus.utterances),
            "splits": corpus.split_counts(), "ids_sha1": corpus_digest(corpus),
            "records_sha1": _records_digest(corpus)}


def _records_digest(corpus: Corpus) -> str:
    """sha1 of everything records.jsonl says of the utterances: a cheap test of whether records.jsonl still
    says what the corpus says (with the ids' digest 0.56 s at SpokenCOCO sizes, where writing the JSON to
    compare takes 2.72 s: benchmarks/corpus_read.py, docs/benchmarks.md)."""
    rows = "".join(f"{u.utt_id}\t{u.audio_path}\t{u.image_id}\t{u.image_path}\t{u.caption}\t{u.caption_id}\t"
                   f"{u.speaker}\t{u.split}\n" for u in corpus.utterances)
    return hashlib.sha1(rows.encode("utf-8")).hexdigest()


def _check_cache(cfg: ExtractConfig, corpus: Corpus, recipe) -> list[str]:
    """Records corpus, splits, records.jsonl and the feature settings in the cache, or refuses (before any
    work) a cache made with other settings, naming every setting that differs. The same utterances in the
    same order are the same corpus wherever it lies and however it is split: records.jsonl follows it (new
    paths, splits, speakers, captions). Returns notes for the summary."""
    sections = {"corpus": corpus_section(corpus),
                "audio": {"format": cfg.fmt, "features": recipe.to_dict(), "part_size": cfg.part_size}}
    manifest = read_manifest(cfg.cache)
    was = manifest.get("corpus")
    recorded = dict(manifest)
    if was is not None:   # where it lies, how it is split and captioned are not what it is: compare the rest
        follows = ("root", "splits", "records_sha1")
        recorded["corpus"] = {**was, **{k: sections["corpus"][k] for k in follows}}
    diffs = [line for name, settings in sections.items() if name in recorded
             for line in settings_diff(recorded[name], settings, name)]
    store = cfg.cache / AUDIO_STORE
    if not diffs:  # e.g. other versions, which PartWriter would refuse
        diffs = store_settings_diff(store, cfg.fmt, recipe.dims, STORE_DTYPE, store_attrs(recipe),
                                    f"{AUDIO_STORE}/{STORE_JSON}")
    if diffs:
        other_corpus = any(line.startswith("corpus.") for line in diffs)
        if other_corpus and was.get("root") != corpus.root:   # another corpus, not only another place
            diffs = settings_diff({"root": was.get("root")}, {"root": corpus.root}, "corpus") + diffs
        lines = "\n  ".join(diffs)
        if other_corpus:
            fix = (f"pass the corpus this cache is of as --data ({was.get('root')}), or use another --cache "
                   "folder for this one")
        else:
            fix = (f"pass the settings it was made with (see {cfg.cache / 'cache.json'}), use another --cache "
                   f"folder, or delete {store} and the 'audio' section of cache.json to compute the features again")
        raise CacheMismatchError(
            f"cache {cfg.cache} was made with other settings than requested:\n  {lines}\nFix: {fix}")
    if cfg.index_only and "audio" not in manifest:
        raise FileNotFoundError(f"{cfg.cache}: no audio features to index; --index-only follows "
                                "`extract-audio --shard I/N` jobs on this cache: run those first")
    notes = _follow_corpus(cfg.cache, corpus, was, sections["corpus"])
    if not cfg.index_only:
        for name, settings in sections.items():
            claim_section(cfg.cache, name, settings)
    return notes


# what records.jsonl says of an utterance that the features do not depend on
_PATH_FIELDS = ("audio_path", "image_path")


def _follow_corpus(cache: Path, corpus: Corpus, was: dict | None, section: dict) -> list[str]:
    """records.jsonl and the 'corpus' section follow the corpus (the same utterances, checked before): written
    where missing or cut short, rewritten where the corpus moved or its splits, speakers, captions or ids
    changed (the trainer and evaluate read them from there). Records first: a run killed in between does it
    again. Returns notes."""
    path = cache / RECORDS
    if was is not None and was.get("records_sha1") == section["records_sha1"] \
            and records_complete(cache, len(corpus.utterances)):
        return []
    records = [u.to_dict() for u in corpus.utterances]
    text = records_text(records)
    new, old = text.encode("utf-8"), path.read_bytes() if path.is_file() else None
    notes = []
    if old is None:
        if was is not None and was.get("records_sha1") not in (None, section["records_sha1"]) \
                and was.get("root") == corpus.root and any((cache / s).is_dir() for s in (TEXT_STORE, IMAGE_STORE)):
            notes.append(f"the corpus changed since embed-images ran on it (its splits, speakers, captions or "
                         f"files): if captions or images changed, delete {cache / TEXT_STORE} or "
                         f"{cache / IMAGE_STORE} and run embed-images again")
    elif old != new:
        moved = was is not None and was.get("root") != corpus.root
        if moved:
            notes.append(f"corpus moved from {was.get('root')} to {corpus.root} (the same {len(records)} "
                         f"utterances): {RECORDS} now names the files there")
        try:
            rows = [json.loads(line) for line in old.decode("utf-8").splitlines()] \
                if whole_lines(old, len(records)) else None
        except ValueError:   # edited by hand, or bytes lost mid-file
            rows = None
        if rows is None or not all(isinstance(row, dict) for row in rows):
            notes.append(f"{path} was cut short or cannot be read: written anew")
        else:
            notes += _changed_records(cache, rows, records, skip=_PATH_FIELDS if moved else ())
    if old != new:
        atomic_write_text(path, text)
    if was is not None and was != section:
        replace_section(cache, "corpus", section)
    return notes


def _changed_records(cache: Path, old: list[dict], new: list[dict], skip: tuple) -> list[str]:
    """Notes on what changed in records.jsonl, field by field, with an example."""
    counts: dict[str, int] = {}
    example = None
    for before, after in zip(old, new):
        for field_name, value in after.items():
            if field_name not in skip and before.get(field_name) != value:
                counts[field_name] = counts.get(field_name, 0) + 1
                example = example or f"{after['utt_id']}: {field_name} {before.get(field_name)!r} -> {value!r}"
    if not counts:
        return []
    fields = ", ".join(f"{name} ({n})" for name, n in counts.items())
    notes = [f"{RECORDS} follows the corpus, whose utterances changed: {fields}; e.g. {example}"]
    for field_name, store, what, old_ones in (("caption", TEXT_STORE, "caption embeddings", "texts"),
                                              ("image_path", IMAGE_STORE, "image embeddings", "image files")):
        if field_name in counts and (cache / store).is_dir():
            notes.append(f"the {what} in {cache / store} are of the old {old_ones}: delete that folder and run "
                         "embed-images again")
    return notes


# ---- the stage ----

def extract_audio(cfg: ExtractConfig) -> ExtractSummary:
    """Runs the stage; raises TooManyFailures (after finishing the work) when failures exceed the limit,
    ValueError/FileNotFoundError (before any work) for bad options, corpus or cache, StageBusyError when
    another process runs the same shard of this cache."""
    with contextlib.ExitStack() as held:
        return _extract_audio(cfg, held)


def _extract_audio(cfg: ExtractConfig, held: contextlib.ExitStack) -> ExtractSummary:
    started = time.perf_counter()
    recipe = get_recipe(cfg.recipe, **dict(cfg.recipe_options))
    corpus = read_corpus(cfg.data)
    notes = _check_cache(cfg, corpus, recipe)
    store = cfg.cache / AUDIO_STORE
    plan = plan_parts(len(corpus.utterances), cfg.part_size)
    summary = ExtractSummary(cache=cfg.cache, utterances=len(corpus.utterances), parts=len(plan),
                             shard=cfg.shard, workers=cfg.workers, notes=notes, sample_rate=recipe.sample_rate)
    done = completed_parts(store)
    if cfg.index_only:
        missing = [part_path(store, k, cfg.fmt).name for k in range(len(plan)) if k not in done]
        if missing:
            raise ValueError(f"--index-only: {len(missing)} of {len(plan)} parts are missing in {store} "
                             f"({_first(missing)}); run the --shard I/N jobs that write them (part k belongs "
                             "to job k % N), then --index-only again")
    else:
        mine = shard_parts(len(plan), cfg.shard)
        held.enter_context(shard_lock(cfg.cache, "extract-audio", cfg.shard))   # until the stage returns
        todo, summary.parts_retried = parts_to_write(store, mine, cfg.fmt, cfg.retry_failed)   # under the lock
        summary.parts_skipped = len(mine) - len(todo)
        (store / FAILURES_DIR).mkdir(parents=True, exist_ok=True)
        if todo:
            utts = [u.to_dict() for u in corpus.utterances]
            _run_parts(cfg, recipe, [(k, [utts[j] for j in plan[k]]) for k in todo], summary)

    done = completed_parts(store)
    summary.missing_parts = [k for k in range(len(plan)) if k not in done]
    failures = recorded_failures(store, done)
    for f in failures:  # counted by kind: "unreadable: Error opening..." -> "unreadable"
        kind = f["reason"].split(":")[0].split(" (")[0]
        summary.failures[kind] = summary.failures.get(kind, 0) + 1
    if not summary.missing_parts:
        summary.indexed = build_index(store)
        # at the corpus's present paths: a part written before the corpus moved recorded the old ones
        audio_of = {u.utt_id: u.audio_path for u in corpus.utterances}
        record_stage_failures(cfg.cache, "audio", [{**f, "path": audio_of.get(f["id"], f.get("path"))}
                                                   for f in failures])
        if getattr(recipe, "normalisation", None) == "speaker":
            write_speaker_cmvn(cfg.cache)   # where the index holds other utterances than it was computed over
    summary.seconds = time.perf_counter() - started
    if summary.failures_total > cfg.max_failures or (summary.indexed == 0 and summary.failures_total):
        raise TooManyFailures(summary, cfg.max_failures)
    return summary


def _mp_context():
    # fork starts a worker in milliseconds where spawn re-imports torch (~2 s of CPU each). Safe here: the
    # pool starts before this process opens any HDF5 file, workers never touch CUDA, and each runs torch
    # single-threaded (as DataLoader's forked workers do). Elsewhere (macOS, Windows): spawn.
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


class _Progress:
    """A tqdm bar over utterances that also shows hours of audio per second."""

    def __init__(self, total: int, enabled: bool):
        # in a log file (array jobs), a line every 30 s rather than a redraw every 0.5 s
        self.bar = tqdm(total=total, unit="utt", desc="extract-audio", smoothing=0.1, disable=not enabled,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.audio_seconds = 0.0

    def update(self, n: int, audio_seconds: float) -> None:
        self.audio_seconds += audio_seconds
        rate = self.audio_seconds / 3600 / max(self.bar.format_dict["elapsed"], 1e-9)
        self.bar.set_postfix_str(f"{rate:.3g} audio h/s", refresh=False)
        self.bar.update(n)

    def drain(self, ticks) -> None:
        """Applies the (utterances, seconds) ticks that the workers have sent so far."""
        while not ticks.empty():
            self.update(*ticks.get())


def _run_parts(cfg: ExtractConfig, recipe, tasks: list[tuple[int, list]], summary: ExtractSummary) -> None:
    """The parts in `tasks` through a pool of cfg.workers processes, a bounded number in flight."""
    started, threads = time.perf_counter(), torch.get_num_threads()
    batched = cfg.batch_device is not None
    ctx = _mp_context()
    ticks = ctx.Queue()  # (utterances, seconds) from the workers, for the progress bar
    # Parts in flight bound the memory: a worker returns a small dict on the CPU path, but a whole part of
    # decoded audio on the batched path, where the main process computes the features.
    limit = cfg.workers + 1 if batched else 2 * cfg.workers
    initargs = (cfg.recipe, dict(cfg.recipe_options), cfg.cache / AUDIO_STORE, cfg.fmt, ticks)
    # An executor rather than multiprocessing.Pool: a worker that dies (the OOM killer...) fails the run
    # with BrokenProcessPool, where Pool would wait forever for its part.
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=init_worker,
                             initargs=initargs) as pool:
        pool.submit(os.getpid).result()  # fork the workers now, before tqdm starts its monitor thread
        if batched and torch.device(cfg.batch_device).type == "cpu":
            torch.set_num_threads(1)  # the workers hold the cores: more threads here made it 4x slower
        progress = _Progress(sum(len(utts) for _, utts in tasks), cfg.progress)
        try:
            pending, running = list(reversed(tasks)), set()
            while pending or running:
                if stop_requested():   # SIGTERM or Ctrl-C: the parts in hand finish, no others start
                    pending.clear()
                while pending and len(running) < limit:
                    running.add(pool.submit(decode_part if batched else extract_part, pending.pop()))
                progress.drain(ticks)
                finished, running = wait(running, timeout=0.1, return_when=FIRST_COMPLETED)
                for future in finished:
                    out = future.result()  # re-raises a worker's unexpected error here
                    if batched:
                        out = _write_decoded(cfg, recipe, *out)
                        progress.update(out["utterances"], out["audio_seconds"])
                    summary.parts_done += 1
                    summary.written += out["written"]
                    summary.failed += out["failed"]
                    summary.audio_seconds += out["audio_seconds"]
                    for rate, n in out["resampled"].items():
                        summary.resampled[rate] = summary.resampled.get(rate, 0) + n
            pool.shutdown()  # the workers flush their last ticks as they exit
            progress.drain(ticks)
        except BrokenProcessPool as err:
            raise WorkerDied("a worker process died (out of memory? killed?); the parts it finished are "
                             "kept: run the same command again to resume") from err
        except BaseException:   # a second stop signal, an error of ours: the parts in hand finish, no others
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            torch.set_num_threads(threads)
            progress.bar.close()
    summary.work_seconds = time.perf_counter() - started
    raise_if_stopped()


def _write_decoded(cfg: ExtractConfig, recipe, part: int, utts: list[dict], decoded: list,
                   failures: list[dict], seconds: float, resampled: dict[int, int]) -> dict:
    """Batched path, in the main process: a decoded part's features on cfg.batch_device, then the part."""
    feats = compute_features(recipe, [w for _, w in decoded], cfg.batch_device, cfg.batch_size)
    batches = [[(u, f) for (u, _), f in zip(decoded, feats)]]
    out = write_part(cfg.cache / AUDIO_STORE, part, cfg.fmt, recipe, utts, batches, failures)
    return {**out, "audio_seconds": seconds, "utterances": len(utts), "resampled": resampled}


# ---- speaker-level CMVN (mfcc-kaldi with normalisation=speaker) ----

def _cmvn_basis(reader: StoreReader, speaker_of: dict[str, str]) -> str:
    """sha1 of what the speaker statistics are computed over: each indexed utterance's id, frames and speaker.
    A part computed again (--retry-failed) or a speaker changed in the corpus makes the statistics stale."""
    rows = "".join(f"{u}\t{n}\t{speaker_of.get(u)}\n" for u, n in zip(reader.ids, reader.lengths.tolist()))
    return hashlib.sha1(rows.encode("utf-8")).hexdigest()


def write_speaker_cmvn(cache: Path) -> bool:
    """Per-speaker mean and std [dims] (ddof=0) over every frame in CACHE/audio, speakers from records.jsonl,
    written atomically to CACHE/audio/speaker_cmvn.json; the trainer applies (x - mean) / (std + eps).
    One pass in float64, so memory does not grow with the corpus. Nothing is computed where the file there
    was computed over the same utterances, frames and speakers; returns whether it was written."""
    cache = Path(cache)
    path = cache / AUDIO_STORE / SPEAKER_CMVN
    speaker_of = {r["utt_id"]: r["speaker"] for r in read_records(cache)}
    sums: dict[str, list] = {}  # speaker -> [frames, shift [D], sum of x - shift, sum of (x - shift)^2]
    with StoreReader(cache / AUDIO_STORE) as reader:
        basis = _cmvn_basis(reader, speaker_of)
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("basis") == basis:
                return False
        except (FileNotFoundError, ValueError):
            pass
        for utt_id, feats in reader:
            x = feats.astype(np.float64)
            # shifting by the speaker's first utterance mean keeps E[d^2] - E[d]^2 free of cancellation
            acc = sums.setdefault(speaker_of[utt_id], [0, x.mean(axis=0), 0.0, 0.0])
            d = x - acc[1]
            acc[0], acc[2], acc[3] = acc[0] + len(x), acc[2] + d.sum(axis=0), acc[3] + (d * d).sum(axis=0)
        dims = reader.dims
    speakers = {s: {"frames": n, "mean": (shift + s1 / n).tolist(),
                    "std": np.sqrt(np.maximum(s2 / n - (s1 / n) ** 2, 0.0)).tolist()}
                for s, (n, shift, s1, s2) in sorted(sums.items())}
    atomic_write_json(path, {"version": 1, "dims": dims, "eps": NORM_EPS, "speakers": speakers, "basis": basis})
    return True
