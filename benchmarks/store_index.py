"""How fast a finished store is indexed: build_index (what each stage runs once its last part is written) on
wds parts read from the tar blocks directly, against the same build reading them through Python's tarfile and
numpy's .npy header reader (how it was done before), and against hdf5 parts of the same items, in one process.

    python benchmarks/store_index.py                       # 20,000 embeddings and 3,000 utterances
    python benchmarks/store_index.py --embeddings 100000 --utterances 0

Two stores, written once: CLIP-like embeddings (one 512-dim row each, embed-images' parts of 2,048) and
MFCC-like utterances (100-600 frames of 39 dims, extract-audio's parts of 1,000: a distinct .npy header
for almost every length). Figures are microseconds of this process's CPU time per item, best of --repeats
rounds, the two ways alternating. At 8,000 images/s (embed-images' goal on one GPU) an image costs 125 us.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import index  # noqa: E402
from cache.store import PartWriter  # noqa: E402


def write_store(out: Path, fmt: str, arrays, keys: list[str], metas: list[dict], part_size: int) -> None:
    for part, start in enumerate(range(0, len(keys), part_size)):
        stop = min(start + part_size, len(keys))
        with PartWriter(out, part, fmt, arrays(0).shape[1]) as writer:
            for i in range(start, stop):
                writer.add(keys[i], arrays(i), metas[i])


def timed_build(store: Path, scan) -> float:
    """CPU seconds of one build_index of `store` with `scan` as the wds part scanner."""
    kept = index._scan_tar
    index._scan_tar = scan
    try:
        start = time.process_time()
        index.build_index(store)
        return time.process_time() - start
    finally:
        index._scan_tar = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=int, default=20_000, help="items of the embedding store")
    parser.add_argument("--utterances", type=int, default=3_000, help="items of the MFCC-like store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.embeddings, args.utterances) < 0 or args.repeats < 1 or args.embeddings + args.utterances < 1:
        parser.error("--embeddings and --utterances must be >= 0 (not both 0), --repeats >= 1")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((max(args.embeddings, 1), 512), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    frames = rng.integers(100, 601, size=max(args.utterances, 1))
    mfcc = rng.standard_normal((int(frames.max()), 39), dtype=np.float32)
    stores = {
        "embeddings": (args.embeddings, 2048, lambda i: emb[i:i + 1],
                       [f"{1000268201 + 7 * i}_{i:08x}" for i in range(args.embeddings)],
                       lambda key: {"path": f"/data/flickr8k/Flicker8k_Dataset/{key}.jpg"}),
        "utterances": (args.utterances, 1000, lambda i: mfcc[:frames[i]],
                       [f"{1000268201 + 7 * i}_{i:08x}_{i % 5}" for i in range(args.utterances)],
                       lambda key: {"path": f"/data/flickr_audio/wavs/{key}.wav", "sample_rate": 16000}),
    }
    results = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (n, part_size, arrays, keys, meta) in stores.items():
            if n == 0:
                continue
            metas = [meta(key) for key in keys]
            paths = {fmt: Path(tmp) / f"{name}-{fmt}" for fmt in ("wds", "hdf5")}
            for fmt, path in paths.items():
                write_store(path, fmt, arrays, keys, metas, part_size)
            best = {"blocks": float("inf"), "tarfile": float("inf"), "hdf5": float("inf")}
            for _ in range(args.repeats):
                best["blocks"] = min(best["blocks"], timed_build(paths["wds"], index._scan_tar))
                best["tarfile"] = min(best["tarfile"], timed_build(paths["wds"], index._scan_tar_tarfile))
                best["hdf5"] = min(best["hdf5"], timed_build(paths["hdf5"], index._scan_tar))
            us = {way: 1e6 * seconds / n for way, seconds in best.items()}
            results[name] = {"items": n, "part_size": part_size, **{f"{way}_us_per_item": round(v, 2)
                                                                    for way, v in us.items()},
                             "ratio_tarfile_over_blocks": best["tarfile"] / best["blocks"]}
            print(f"{name} ({n} items in parts of {part_size}): wds from the tar blocks {us['blocks']:6.1f} us an "
                  f"item, through tarfile {us['tarfile']:6.1f} us (ratio {best['tarfile'] / best['blocks']:.1f}x); "
                  f"hdf5 parts {us['hdf5']:6.1f} us")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
