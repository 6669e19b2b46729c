"""How many utterances per second the training data path alone delivers, without the model: memory mode
(one gather from the contiguous feature tensor) and stream mode (WebDataset shards read, bucketed and
padded by N reader processes), on one synthetic WebDataset cache, in one process.

    python benchmarks/data_path.py                                   # batch 1024, 400 frames, readers 1 2
    python benchmarks/data_path.py --device cuda --readers 1 2 4 8   # the GPU box

Each figure is `StreamBatches.next` / `MemoryBatches.next` (the very call the training loop makes, with the
copy to --device) in a loop of --steps steps after --warmup steps, best of --repeats rounds. The training
step on a GPU has to wait for the data path when the data path is slower than the model: compare the
stream figures with train_throughput.py's ceiling at the same batch size on the same machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import write_cache  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.train import build_run  # noqa: E402


def rate(cfg: TrainConfig, steps: int, warmup: int, repeats: int) -> float:
    """Best utterances/s of `repeats` rounds of `steps` calls of the data source's next(step)."""
    run = build_run(cfg)
    source, device, step = run.source, run.device, 0
    try:
        for _ in range(warmup):                 # reader start-up, first buffers
            source.next(step)
            step += 1
        best = 0.0
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, utterances = time.perf_counter(), 0
            for _ in range(steps):
                batch = source.next(step)
                utterances += batch.size
                step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, utterances / (time.perf_counter() - start))
        return best
    finally:
        source.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2], help="stream reader processes [1 2]")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round [20]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first [5]")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts [3]")
    parser.add_argument("--utterances", type=int, default=0,
                        help="cache size [default: 16 x the batch, in shards of 2,000]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=None, help="where the synthetic cache goes (reused)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    utterances = args.utterances or 16 * args.batch_size
    with tempfile.TemporaryDirectory(prefix="data-path-") as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        write_cache(cache, utterances, args.frames, "wds")
        print(f"cache: {utterances} utterances x {args.frames} frames (wds, shards of 2,000); batch "
              f"{args.batch_size}; {len(os.sched_getaffinity(0))} CPUs; device {args.device}", flush=True)
        common = dict(cache=str(cache), batch_size=args.batch_size, steps=10**9, warmup=0, device=args.device,
                      max_frames=max(2048, args.frames), progress=False, threads=1)
        results = {"memory": rate(TrainConfig(**common), args.steps, args.warmup, args.repeats)}
        print(f"memory mode:            {results['memory']:10.0f} utt/s", flush=True)
        for n in args.readers:
            cfg = TrainConfig(**common, data_mode="stream", workers=n)
            results[f"stream_{n}"] = rate(cfg, args.steps, args.warmup, args.repeats)
            print(f"stream, {n} reader(s):   {results[f'stream_{n}']:10.0f} utt/s "
                  f"({results[f'stream_{n}'] / n:.0f} per reader)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "utt_per_s": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
