"""How long the corpus readers' file check takes on a SpokenCOCO-sized tree, which every extract-audio job
(each of N --shard jobs too) and `info` pay before the first utterance: `existing_files` (folders that hold
many of the corpus' files are listed once) against one os.path.isfile per path (how it checked before), on
the same paths in one process, the ways alternating; best of --repeats wall-clock rounds.

    python benchmarks/corpus_check.py                      # 123,287 images, 616,435 utterances
    python benchmarks/corpus_check.py --images 20000
    python benchmarks/corpus_check.py --images 20000 --only isfile --tree /tmp/t   # one way, e.g. under
        strace -c -f -e trace=newfstatat,statx,getdents64 (the file-system requests each way makes)

The tree is SpokenCOCO's layout with empty files (benchmarks/corpus_read.py writes the metadata): wavs in
wavs/{split}/{k}/, images in train2014/ and val2014/; one file in 1,000 is left out, so that misses are
checked too. A local disk with the tree in the page cache is the best case for a stat; on NFS or Lustre
each stat is a round trip to a server, and the request counts say how many each way makes.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.corpus_read import timed, write_spokencoco  # noqa: E402
from pipeline.corpus import existing_files, read_spokencoco  # noqa: E402


def corpus_paths(root: Path, images: int) -> list[str]:
    """The paths the reader checks (every wav, each image once), made as empty files under `root` but for
    one in 1,000; written once per tree."""
    if not any(root.glob("SpokenCOCO_*.json")):
        write_spokencoco(root, images)
    corpus = read_spokencoco(root, check_files=False)
    paths = [u.audio_path for u in corpus.utterances]
    paths += list({u.image_id: u.image_path for u in corpus.utterances}.values())
    if not (root / "made").is_file():
        for folder in {p.rpartition("/")[0] for p in paths}:
            os.makedirs(folder, exist_ok=True)
        for i, path in enumerate(paths):
            if i % 1000 != 999:
                open(path, "wb").close()
        (root / "made").write_text("")
    return paths


def by_isfile(paths: list[str]) -> set[str]:
    return {p for p in paths if os.path.isfile(p)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=123_287)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tree", type=Path, help="make (or reuse) the tree here instead of a temporary folder")
    parser.add_argument("--only", choices=("isfile", "existing_files"), help="run one way once")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.tree or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = corpus_paths(root, args.images)
        print(f"tree of {len(paths):,} paths ready in {time.perf_counter() - started:.0f} s")
        ways = {"existing_files": existing_files, "isfile": by_isfile}
        if args.only:
            print(f"{args.only}: {len(ways[args.only](paths)):,} present")
            return
        assert existing_files(paths) == by_isfile(paths)
        rounds = [{name: timed(lambda: way(paths)) for name, way in ways.items()} for _ in range(args.repeats)]

    best = {name: min(r[name] for r in rounds) for name in ways}
    print(f"{platform.python_implementation()} {platform.python_version()} on {platform.machine()}; "
          f"{len(paths):,} paths of {args.images:,} images; best of {args.repeats}: "
          + ", ".join(f"{name} {t:.2f} s ({len(paths) / t / 1000:.0f}k paths/s)" for name, t in best.items())
          + f"; speed-up over isfile {best['isfile'] / best['existing_files']:.2f}x")


if __name__ == "__main__":
    main()
