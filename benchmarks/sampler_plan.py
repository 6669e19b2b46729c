#!/usr/bin/env python
"""Time the batch sampler's once-per-epoch plan (one caption per image, length buckets): the host work the
memory data path adds at each epoch boundary, spread over the epoch's steps.

    python benchmarks/sampler_plan.py --utterances 30000 100000 --batch-size 1024
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.sampler import LengthBucketBatchSampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, nargs="+", default=[30_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    for n in args.utterances:
        rng = np.random.default_rng(0)
        lengths, images = rng.integers(100, 1000, n), np.arange(n) // 5   # 5 captions per image
        sampler = LengthBucketBatchSampler(lengths, images, seed=0)
        started = time.perf_counter()
        plan = sampler.plan(0, args.batch_size)
        seconds = time.perf_counter() - started
        print(f"{n} utterances: plan {seconds:.3f} s for {len(plan)} batches of {args.batch_size}, "
              f"{seconds / len(plan) * 1000:.2f} ms per step")


if __name__ == "__main__":
    main()
