#!/usr/bin/env python
"""Speed of extract-audio against a naive single-process loop (and Lhotse, when installed) on one corpus.

    python benchmarks/extract_audio.py --utterances 3000 --workers 2 --out /tmp/bench-extract --json fig.json
    python benchmarks/extract_audio.py --utterances 20000 --workers 16 --device cuda --repeats 1 ...   # GPU box

The corpus is the demo's espeak-ng speech (pipeline.demo), made once under --out and reused (the demo's
espeak-ng, from the espeakng-loader wheel, must be installed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402

from pipeline.corpus import read_corpus  # noqa: E402
from pipeline.extract import ExtractConfig, extract_audio  # noqa: E402

SAMPLE_RATE = 16_000


def make_corpus(out: Path, utterances: int, workers: int) -> tuple[Path, str]:
    """A Flickr8k-layout corpus of about `utterances` (5 per image) under `out`, reused when already there."""
    images = max(12, math.ceil(utterances / 5))
    root = out / f"corpus-{images * 5}"
    from pipeline.demo.make_demo import CONFIG_FILE, DemoConfig, write_demo_corpus
    if not (root / CONFIG_FILE).is_file():
        print(f"writing the demo corpus ({images} images x 5 spoken captions) to {root} ...")
        write_demo_corpus(DemoConfig(out=root, images=images, workers=workers, image_size=64, overwrite=True))
    return root, "demo corpus (espeak-ng speech)"


def naive_torchaudio(paths: list[str], ids: list[str], out: Path) -> None:
    """The baseline: soundfile read, torchaudio MFCC + deltas, one h5py dataset per utterance."""
    mfcc = torchaudio.transforms.MFCC(SAMPLE_RATE, n_mfcc=13, melkwargs={"n_fft": 400, "hop_length": 160,
                                                                         "n_mels": 80})
    with h5py.File(out, "w") as f:
        for path, utt_id in zip(paths, ids):
            wave, _ = sf.read(path, dtype="float32")
            ceps = mfcc(torch.from_numpy(wave))  # [13, T]
            d1 = torchaudio.functional.compute_deltas(ceps)
            d2 = torchaudio.functional.compute_deltas(d1)
            f.create_dataset(utt_id, data=torch.cat([ceps, d1, d2]).T.numpy().astype(np.float16))


def naive_same_recipe(paths: list[str], ids: list[str], out: Path, recipe: str) -> None:
    """The same loop computing clipspeech's own recipe: isolates what the stage's machinery adds."""
    from pipeline.audio import load_audio
    from pipeline.features import compute
    from pipeline.recipes import get_recipe
    cfg = get_recipe(recipe)
    with h5py.File(out, "w") as f:
        for path, utt_id in zip(paths, ids):
            f.create_dataset(utt_id, data=compute(cfg, load_audio(path)).numpy().astype(np.float16))


def lhotse_features(paths: list[str], out: Path, workers: int) -> float | None:
    """Seconds for Lhotse's compute_and_store_features (Kaldi-style MFCC), or None when not installed."""
    try:
        from lhotse import CutSet, LilcomChunkyWriter, Mfcc, Recording, RecordingSet
    except ImportError:
        print("lhotse is not installed (pip install -e '.[bench]'): skipped")
        return None
    recordings = RecordingSet.from_recordings(Recording.from_file(p) for p in paths)
    cuts = CutSet.from_manifests(recordings=recordings)
    started = time.perf_counter()
    cuts.compute_and_store_features(extractor=Mfcc(), storage_path=str(out), num_jobs=workers,
                                    storage_type=LilcomChunkyWriter)
    return time.perf_counter() - started


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and the workers it waited for) of fn()."""
    before, started = os.times(), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - started, os.times()
    cpu = sum(getattr(after, k) - getattr(before, k) for k in ("user", "system", "children_user",
                                                               "children_system"))
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=3000, help="corpus size (5 per image) [3000]")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="extract-audio worker counts [2]")
    parser.add_argument("--out", type=Path, default=Path("bench-extract"),
                        help="corpus and outputs [bench-extract]")
    parser.add_argument("--features", default="mfcc-seed", help="clipspeech recipe [mfcc-seed]")
    parser.add_argument("--baseline-threads", type=int, default=1,
                        help="torch threads of the naive loops [1: faster than more for per-utterance ops, "
                             "and what REFERENCE.md measured]; 0 = torch's default")
    parser.add_argument("--device", default="cpu",
                        help="also time extract-audio --device DEVICE (e.g. cuda) with each worker count [cpu: no]")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all methods; each method's fastest round counts [2]")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.utterances < 1 or min(args.workers) < 1 or args.repeats < 1:
        parser.error("--utterances, --workers and --repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    args.out.mkdir(parents=True, exist_ok=True)
    corpus_dir, corpus_kind = make_corpus(args.out, args.utterances, max(args.workers))
    utts = read_corpus(corpus_dir).utterances
    paths, ids = [u.audio_path for u in utts], [u.utt_id for u in utts]
    audio_s = sum(sf.info(p).frames for p in paths) / SAMPLE_RATE
    if args.baseline_threads:
        torch.set_num_threads(args.baseline_threads)
    print(f"corpus: {corpus_kind}, {len(utts)} utterances, {audio_s / 3600:.2f} h "
          f"({audio_s / len(utts):.1f} s each); torch {torch.__version__}; naive loops with "
          f"{torch.get_num_threads()} torch threads")

    for path in paths:  # into the page cache: otherwise whichever method runs first pays the disk reads
        Path(path).read_bytes()

    def extract(workers: int, batch_device: str | None = None) -> None:
        cache = args.out / f"cache-{workers}-{batch_device or 'workers'}"
        shutil.rmtree(cache, ignore_errors=True)
        extract_audio(ExtractConfig(data=corpus_dir, cache=cache, recipe=args.features, workers=workers,
                                    batch_device=batch_device, progress=False))

    methods = [("naive loop: soundfile + torchaudio MFCC + deltas, h5py per utterance", 1,
                lambda: naive_torchaudio(paths, ids, args.out / "naive_torchaudio.h5")),
               (f"naive loop: clipspeech's {args.features} recipe, h5py per utterance", 1,
                lambda: naive_same_recipe(paths, ids, args.out / "naive_recipe.h5", args.features))]
    methods += [(f"clipspeech extract-audio ({args.features})", w, lambda w=w: extract(w)) for w in args.workers]
    if args.device != "cpu":   # workers decode, the features are computed in batches on the device
        methods += [(f"clipspeech extract-audio --device {args.device} ({args.features})", w,
                     lambda w=w: extract(w, args.device)) for w in args.workers]
    load_before = os.getloadavg()[0]
    best: dict[int, tuple[float, float]] = {}
    for _ in range(args.repeats):  # rounds alternate the methods, so slow spells of the machine hit them all
        for i, (_, _, fn) in enumerate(methods):
            wall, cpu = timed(fn)
            best[i] = min(best.get(i, (math.inf, math.inf)), (wall, cpu))
    rows = [(name, workers, *best[i]) for i, (name, workers, _) in enumerate(methods)]
    lhotse_s = lhotse_features(paths, args.out / "lhotse", max(args.workers))
    if lhotse_s is not None:  # its workers are not this process' children: no CPU figure
        rows.append(("lhotse compute_and_store_features (Mfcc)", max(args.workers), lhotse_s, math.nan))
    load = (load_before, os.getloadavg()[0])

    baseline = rows[0][2]
    print(f"\nload average {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} CPUs "
          "(utt per CPU-s is what load from other processes disturbs least)")
    print(f"{'method':<72} {'workers':>7} {'seconds':>8} {'utt/s':>7} {'x real time':>11} "
          f"{'vs baseline':>11} {'utt/CPU-s':>9}")
    results = []
    for name, workers, seconds, cpu in rows:
        r = {"method": name, "workers": workers, "seconds": round(seconds, 2),
             "utt_per_s": round(len(utts) / seconds, 1), "x_real_time": round(audio_s / seconds, 1),
             "vs_baseline": round(baseline / seconds, 2),
             "utt_per_cpu_s": None if math.isnan(cpu) else round(len(utts) / cpu, 1)}
        results.append(r)
        print(f"{name:<72} {workers:>7} {seconds:>8.2f} {r['utt_per_s']:>7.0f} {r['x_real_time']:>11.0f} "
              f"{r['vs_baseline']:>10.2f}x {len(utts) / cpu:>9.0f}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "baseline_threads": torch.get_num_threads(), "corpus": corpus_kind,
            "repeats": args.repeats, "utterances": len(utts), "audio_hours": round(audio_s / 3600, 3),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in load], "results": results},
            indent=2) + "\n")
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
