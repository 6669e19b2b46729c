"""How fast a store part takes embeddings: PartWriter.add_rows (what embed-images calls once per batch) against
the formats' own writers, in one process, on the same rows.

    python benchmarks/store_write.py                      # 20,000 rows of 512 dims, blocks of 256
    python benchmarks/store_write.py --dims 768 --rows 50000

Rows are CLIP-like embeddings (float32 in, float16 stored), each with the meta embed-images gives an image
({"path": ...}), written in blocks of --block rows into parts of --part-size rows. Baselines:
- wds: webdataset's own TarWriter writing the same samples (key.npy and key.json, as our parts hold them);
- hdf5: h5py writing each part's rows, ids and metas in one call each, nothing checked: a ceiling.
Figures are rows/s and microseconds of the calling process per row, best of --repeats rounds. At 8,000
images/s (embed-images' goal on one GPU) the main process has 125 us an image for all its work.
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

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.store import PartWriter, escape_key, fixed_bytes  # noqa: E402


def blocks(rows: int, block: int, part_size: int):
    """(part, first row, last row) of each block: blocks never cross a part's end (as embed-images)."""
    for start in range(0, rows, part_size):
        stop = min(start + part_size, rows)
        for first in range(start, stop, block):
            yield start // part_size, first, min(first + block, stop)


def ours(out: Path, fmt: str, keys, emb, metas, block: int, part_size: int) -> None:
    writer, current = None, None
    for part, first, last in blocks(len(keys), block, part_size):
        if part != current:
            if writer is not None:
                writer.commit()
            writer, current = PartWriter(out, part, fmt, emb.shape[1]), part
        writer.add_rows(keys[first:last], emb[first:last], metas[first:last])
    writer.commit()


def webdataset_writer(out: Path, keys, emb, metas, block: int, part_size: int) -> None:
    import webdataset as wds
    out.mkdir(parents=True)
    for start in range(0, len(keys), part_size):
        with wds.TarWriter(str(out / f"part-{start // part_size:05d}.tar")) as sink:
            for i in range(start, min(start + part_size, len(keys))):
                sink.write({"__key__": escape_key(keys[i]), "npy": emb[i:i + 1].astype(np.float16),
                            "json": {**metas[i], "id": keys[i], "frames": 1}})


def h5py_ceiling(out: Path, keys, emb, metas, block: int, part_size: int) -> None:
    out.mkdir(parents=True)
    for start in range(0, len(keys), part_size):
        stop = min(start + part_size, len(keys))
        with h5py.File(out / f"part-{start // part_size:05d}.h5", "w") as f:
            f.create_dataset("features", data=emb[start:stop].astype(np.float16))
            f.create_dataset("offsets", data=np.arange(stop - start + 1, dtype=np.int64))
            f.create_dataset("ids", data=fixed_bytes(keys[start:stop]))
            f.create_dataset("meta", data=fixed_bytes([json.dumps(m) for m in metas[start:stop]]))


def timed(write, root: Path, repeats: int, *args) -> float:
    """Best seconds of `repeats` runs (CPU time of this process: the other writers' files are not in it)."""
    best = float("inf")
    for r in range(repeats):
        out = root / f"run{r}"
        start = time.process_time()
        write(out, *args)
        best = min(best, time.process_time() - start)
        shutil.rmtree(out)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dims", type=int, default=512)
    parser.add_argument("--block", type=int, default=256, help="rows per add_rows call (embed-images' batch)")
    parser.add_argument("--part-size", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if min(args.rows, args.dims, args.block, args.part_size, args.repeats) < 1:
        parser.error("every count must be >= 1")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((args.rows, args.dims), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    keys = [f"{1000268201 + 7 * i}_{i:08x}" for i in range(args.rows)]   # Flickr8k-like image ids
    metas = [{"path": f"/data/flickr8k/Flicker8k_Dataset/{k}.jpg"} for k in keys]
    shape = (keys, emb, metas, args.block, args.part_size)
    results = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d"),
               "rows": args.rows, "dims": args.dims, "block": args.block}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for fmt, name, baseline in (("wds", "webdataset.TarWriter", webdataset_writer),
                                    ("hdf5", "h5py in one call (ceiling)", h5py_ceiling)):
            mine = timed(lambda out, *a: ours(out, fmt, *a), root, args.repeats, *shape)
            theirs = timed(baseline, root, args.repeats, *shape)
            results[fmt] = {"rows_per_s": args.rows / mine, "us_per_row": 1e6 * mine / args.rows,
                            "baseline": name, "baseline_rows_per_s": args.rows / theirs,
                            "ratio": theirs / mine}
            print(f"{fmt:5s} PartWriter.add_rows {args.rows / mine:9.0f} rows/s ({1e6 * mine / args.rows:5.1f} us a "
                  f"row); {name}: {args.rows / theirs:9.0f} rows/s; ratio {theirs / mine:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
