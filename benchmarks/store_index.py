"""How fast a finished store is indexed: build_index (what each stage runs once its last part is written) on
wds parts read from the tar blocks directly, against the same build reading them through Python's tarfile and
numpy's .npy header reader (how it was done before), and against hdf5 parts of the same items, in one process.

    python benchmarks/store_index.py                       # 20,000 embeddings and 3,000 utterances
    python benchmarks/store_index.py --embeddings 100000 --utterances 0

Two stores, written once: CLIP-like embeddings (one 512-dim row each, embed-images' parts of 2,048) and
MFCC-like utterances (100-600 frames of 39 dims, extract-audio's parts of 1,000: a distinct .npy header
for almost every length). Figures are microseconds of this process's CPU time per item, best of --repeats
rounds, the two ways alternating. At 8,000 images/s (embed-images' goal on one GPU) an image costs 125 us.

Then the same three ways inside embed-images' image phase as its main thread runs it (`_embed_image_store`:
the loop over batches, the parts' writing, the index), with a stand-in for the image tower that hands out
ready embeddings in batches of 256, over --stage-images images (0: skip).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


def stage_main_thread(root: Path, images: int, scan, fmt: str) -> float:
    """CPU seconds of embed-images' image phase on its main thread, tower aside, with `scan` indexing."""
    import pipeline.embed as embed
    batch, dims = 256, 512
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((batch, dims), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    def ready_embeddings(model, preprocess, paths, **options):   # the tower's output, nothing computed
        for start in range(0, len(paths), batch):
            n = min(batch, len(paths) - start)
            yield emb[:n], [""] * n

    teacher = embed.Teacher(None, None, None, {"embed_dim": dims, "preprocess": {"size": 224}})
    items = [(f"{1000268201 + 7 * i}_{i:08x}", f"/data/flickr8k/Flicker8k_Dataset/{i:08x}.jpg")
             for i in range(images)]
    cache = root / f"stage-{fmt}"
    cfg = embed.EmbedConfig(data=root, cache=cache, model="stand-in", batch_size=batch, workers=0, fmt=fmt,
                            progress=False)
    kept = embed.embed_image_files, index._scan_tar
    embed.embed_image_files, index._scan_tar = ready_embeddings, scan
    try:
        start = time.process_time()
        embed._embed_image_store(cfg, fmt, teacher, items, {"stage": "embed-images"}, embed.EmbedSummary())
        return time.process_time() - start
    finally:
        embed.embed_image_files, index._scan_tar = kept
        shutil.rmtree(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=int, default=20_000, help="items of the embedding store")
    parser.add_argument("--utterances", type=int, default=3_000, help="items of the MFCC-like store")
    parser.add_argument("--stage-images", type=int, default=20_480, help="images of the stage's loop (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.embeddings, args.utterances, args.stage_images) < 0 or args.repeats < 1:
        parser.error("--embeddings, --utterances and --stage-images must be >= 0, --repeats >= 1")
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
        if args.stage_images:
            ways = {"wds_blocks": (index._scan_tar, "wds"), "wds_tarfile": (index._scan_tar_tarfile, "wds"),
                    "hdf5": (index._scan_tar, "hdf5")}
            best = dict.fromkeys(ways, float("inf"))
            for _ in range(args.repeats):
                for way, (scan, fmt) in ways.items():
                    best[way] = min(best[way], stage_main_thread(Path(tmp), args.stage_images, scan, fmt))
            us = {way: 1e6 * seconds / args.stage_images for way, seconds in best.items()}
            results["stage_main_thread"] = {"images": args.stage_images,
                                            **{f"{way}_us_per_image": round(v, 2) for way, v in us.items()}}
            print(f"embed-images' main thread, tower aside ({args.stage_images} images): wds indexed from the tar "
                  f"blocks {us['wds_blocks']:5.1f} us an image, through tarfile {us['wds_tarfile']:5.1f} us; "
                  f"hdf5 {us['hdf5']:5.1f} us")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
