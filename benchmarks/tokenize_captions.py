#!/usr/bin/env python
"""Captions/s of embed-images' caption path on the host: open_clip's tokenizer in DataLoader worker processes
against tokenizing in the main process, one process, alternating rounds.

    python benchmarks/tokenize_captions.py --captions 40000 --workers 2 4

The tower is a trivial stand-in (the first 8 token ids, normalised), so that the figure is the host's side
alone: on a GPU the text tower of ViT-B-32 is a CUDA graph replay per batch and costs the host next to
nothing, and the tokenizer (Python, about 50 us a caption) is what is left.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402

from pipeline.embed import EmbedConfig, Teacher, _embedded_texts  # noqa: E402
from pipeline.towers import Tower  # noqa: E402

WORDS = "a dog man woman child runs jumps on the grass beach street in red blue shirt water ball".split()


def captions_per_s(teacher: Teacher, tower: Tower, batches: list, workers: int) -> float:
    cfg = EmbedConfig(data=REPO, cache=REPO, model="none", workers=workers)
    started = time.perf_counter()
    n = sum(len(emb) for emb, _ in _embedded_texts(teacher, tower, batches, cfg, workers))
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=40000, help="[40000]")
    parser.add_argument("--batch-size", type=int, default=256, help="[256]")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts to try [2]")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best counts [3]")
    parser.add_argument("--model", default="ViT-B-32", help="whose tokenizer [ViT-B-32]")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 14)))) for _ in range(args.captions)]
    batches = [(captions[s:s + args.batch_size], s) for s in range(0, len(captions), args.batch_size)]
    teacher = Teacher(None, None, open_clip.get_tokenizer(args.model), {"embed_dim": 8})
    tower = Tower(lambda tokens: torch.nn.functional.normalize(tokens[:, :8].float(), dim=-1), None, "cpu",
                  args.batch_size)
    best: dict[int, float] = {}
    for _ in range(args.rounds):
        for workers in [0, *args.workers]:
            best[workers] = max(best.get(workers, 0.0), captions_per_s(teacher, tower, batches, workers))
    print(f"{platform.node()}: {len(__import__('os').sched_getaffinity(0))} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}; {args.captions} captions, batch {args.batch_size}")
    for workers, rate in best.items():
        # embed-images tokenizes in the main process below 2 workers (a single one only hands batches over)
        where = "in the main process" if workers < 2 else f"in {workers} worker processes"
        print(f"  tokenized {where + ':':<28}{rate:9.0f} captions/s  {rate / best[0]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                                         "captions_per_s": best}, indent=2) + "\n")


if __name__ == "__main__":
    main()
