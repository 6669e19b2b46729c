"""Throughput of the training loop: the real loop reading a cache (trainer.train.advance: schedule, batch from
the data path, fit_step) against the same model and optimiser stepping on random tensors already in memory
(trainer.train.fit_step on one fixed batch: the ceiling), in one process, at several batch sizes.

    python benchmarks/train_throughput.py --device cuda                          # the GPU box
    python benchmarks/train_throughput.py --device cpu --steps 2 --repeats 2     # the 2-core CPU box

Every utterance has --frames frames, so both paths step on [B, frames, 39] batches. The cache is synthetic
(random features and embeddings, written through cache/ like the real stages) in --cache or a temporary
folder. Goal: the real loop at least 0.9x the ceiling at every batch size.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.index import build_index  # noqa: E402
from profiling import profiled  # noqa: E402
from cache.manifest import AUDIO_STORE, IMAGE_STORE, TEXT_STORE, claim_section, write_records  # noqa: E402
from cache.store import PartWriter  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data import COMPILE_BUCKET, Batch, padded_frames  # noqa: E402
from trainer.train import advance, build_run, fit_step  # noqa: E402

DIMS, EMBED_DIM, CAPTIONS = 39, 512, 5


def write_cache(root: Path, utterances: int, frames: int, fmt: str = "hdf5", part_size: int = 2000,
                seed: int = 0) -> Path:
    """A train split of `utterances` random (frames x 39) float16 feature matrices, 5 per image, with random
    unit CLIP embeddings for images and captions; reused when `root` already holds one of that size."""
    marker = root / "benchmark.json"
    wanted = {"utterances": utterances, "frames": frames, "format": fmt}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    if root.is_dir() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty and holds no benchmark cache of this size; use another "
                         "--cache")
    rng = np.random.default_rng(seed)
    images = -(-utterances // CAPTIONS)
    records = [{"utt_id": f"u{i:07d}", "image_id": f"i{i // CAPTIONS:07d}", "caption_id": f"c{i:07d}",
                "caption": "a random caption", "split": "train", "speaker": "s0"} for i in range(utterances)]
    write_records(root, records)
    claim_section(root, "audio", {"format": fmt, "features": {"recipe": "random", "dims": DIMS}})
    claim_section(root, "clip", {"model": "random", "embed_dim": EMBED_DIM, "format": fmt})
    for start in range(0, utterances, part_size):
        with PartWriter(root / AUDIO_STORE, start // part_size, fmt, DIMS) as writer:
            for r in records[start:start + part_size]:
                writer.add(r["utt_id"], rng.standard_normal((frames, DIMS), dtype=np.float32))
    image_ids, caption_ids = [f"i{k:07d}" for k in range(images)], [r["caption_id"] for r in records]
    for store, keys in ((IMAGE_STORE, image_ids), (TEXT_STORE, caption_ids)):
        emb = rng.standard_normal((len(keys), EMBED_DIM), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        with PartWriter(root / store, 0, fmt, EMBED_DIM) as writer:
            for key, row in zip(keys, emb):
                writer.add(key, row[None])
    for store in (AUDIO_STORE, IMAGE_STORE, TEXT_STORE):
        build_index(root / store)
    marker.write_text(json.dumps(wanted))
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, n: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for n calls of step(); one sync at the end (the loss),
    as the training loop does. CPU seconds are less disturbed by other processes on a shared CPU box."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    total = 0.0
    for _ in range(n):
        total = total + step()
    float(total)   # waits for the last step, like a log step would
    return time.perf_counter() - start, time.process_time() - cpu


def measure(cfg: TrainConfig, frames: int, steps: int, warmup: int, repeats: int,
            profile_dir: Path | None = None) -> dict:
    """utterances per second (wall) and per CPU second of the real loop and of the ceiling, each the best
    of `repeats` alternating rounds; the data path's share of the real loop (`data_us_per_step`: what
    `advance` adds to `fit_step`, timed alone); with `profile_dir`, torch.profiler tables of both paths."""
    run = build_run(cfg)
    try:
        return _measured(run, cfg, frames, steps, warmup, repeats, profile_dir)
    finally:   # stream readers shut down on an error too: left to exit, they would hang it
        run.source.close()


def _measured(run, cfg: TrainConfig, frames: int, steps: int, warmup: int, repeats: int,
              profile_dir: Path | None) -> dict:
    device, batch = run.device, cfg.batch_size
    gen = torch.Generator(device=device).manual_seed(0)

    def unit(rows: int) -> torch.Tensor:
        x = torch.randn(rows, EMBED_DIM, generator=gen, device=device)
        return x / x.norm(dim=1, keepdim=True)

    # the real loop pads T to a multiple of COMPILE_BUCKET with --compile (400 -> 512): the same shape here
    padded = padded_frames(frames, cfg.max_frames, COMPILE_BUCKET if cfg.compile else 1)
    fixed = Batch(torch.randn(batch, padded, DIMS, generator=gen, device=device),
                  torch.full((batch,), frames, dtype=torch.long, device=device), unit(batch), unit(batch),
                  batch)
    paths = {"real": lambda: advance(run)[0], "ceiling": lambda: fit_step(run, fixed)}
    best = {f"{name}_{unit}": 0.0 for name in paths for unit in ("utt_per_s", "utt_per_cpu_s")}
    warmup_s = {}
    for name, step in paths.items():      # allocator, autotuning, compilation: what a run pays once
        warmup_s[f"{name}_warmup_s"] = round(timed(step, warmup, device)[0], 2)
    for _ in range(repeats):              # alternate, so drifting load on a shared box hits both alike
        for name, step in paths.items():
            wall, cpu = timed(step, steps, device)
            best[f"{name}_utt_per_s"] = max(best[f"{name}_utt_per_s"], steps * batch / wall)
            best[f"{name}_utt_per_cpu_s"] = max(best[f"{name}_utt_per_cpu_s"], steps * batch / cpu)
    # the batches alone, as advance() makes them (the sampler moves on; nothing is trained), for the steps
    # that follow in order (stream mode's readers hand them over step by step)
    following = itertools.count(run.step)
    data_wall, data_cpu = timed(lambda: run.source.next(next(following)).feats[0, 0, 0], steps, device)
    profile_error = {}
    if profile_dir is not None:
        try:   # the profiler (CUPTI) must not cost the figures above
            profile_paths(paths, steps, device, profile_dir / f"train_profile_b{batch}.txt")
        except Exception as e:
            profile_error = {"profile_error": f"{type(e).__name__}: {e}"}
            print(f"batch {batch}: the profile failed: {profile_error['profile_error']}", file=sys.stderr)
    return {"batch_size": batch, **best, **warmup_s, "ratio": best["real_utt_per_s"] / best["ceiling_utt_per_s"],
            "cpu_ratio": best["real_utt_per_cpu_s"] / best["ceiling_utt_per_cpu_s"],
            "data_us_per_step": 1e6 * data_wall / steps, "data_cpu_us_per_step": 1e6 * data_cpu / steps,
            **profile_error}


def profile_paths(paths: dict, steps: int, device: torch.device, out: Path) -> None:
    """torch.profiler over `steps` steps of each path (`profiling.profiled`); the tables to `out`."""
    sections = []
    for name, step in paths.items():
        (wall, _), tables = profiled(lambda: timed(step, steps, device), device)
        sections.append(f"== {name}: {steps} steps, {1e3 * wall / steps:.3f} ms a step under the profiler\n{tables}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(sections) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="64,256,1024")
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per path first")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode with --compile, e.g. reduce-overhead (CUDA graphs) [default]")
    parser.add_argument("--data-mode", choices=["memory", "stream"], default="memory")
    parser.add_argument("--workers", type=int, default=4, help="stream readers")
    parser.add_argument("--utterances", type=int, default=0,
                        help="cache size [default: 10 x the largest batch, 5 captions per image]")
    parser.add_argument("--cache", type=Path, default=None, help="where the synthetic cache goes (reused)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads [torch's default]")
    parser.add_argument("--layers", type=int, default=8, help="transformer layers [seed: 8]")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="also profile both paths (torch.profiler) at each batch size: tables in DIR")
    args = parser.parse_args()

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    utterances = args.utterances or 10 * max(sizes)
    fmt = "wds" if args.data_mode == "stream" else "hdf5"
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        cache = args.cache or Path(tmp)
        cache.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_cache(cache, utterances, args.frames, fmt)
        print(f"cache: {utterances} utterances x {args.frames} frames ({fmt}) in {cache}, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        results = []
        for batch in sizes:
            cfg = TrainConfig(cache=str(cache), batch_size=batch, steps=10**9, warmup=0, device=args.device,
                              compile=args.compile, compile_mode=args.compile_mode, data_mode=args.data_mode,
                              workers=args.workers,
                              threads=args.threads, max_frames=max(2048, args.frames), layers=args.layers,
                              progress=False)
            if args.threads:
                torch.set_num_threads(args.threads)
            r = measure(cfg, args.frames, args.steps, args.warmup, args.repeats, args.profile)
            results.append(r)
            print(f"batch {batch:5d}: real loop {r['real_utt_per_s']:9.1f} utt/s, ceiling "
                  f"{r['ceiling_utt_per_s']:9.1f} utt/s, ratio {r['ratio']:.2f}; per CPU second "
                  f"{r['real_utt_per_cpu_s']:.1f} vs {r['ceiling_utt_per_cpu_s']:.1f}, ratio "
                  f"{r['cpu_ratio']:.2f}; the batches alone {r['data_us_per_step']:.0f} us a step", flush=True)
            if args.json:   # after each batch size: a run stopped at a time limit keeps what it measured
                write_summary(args, results)


def write_summary(args: argparse.Namespace, results: list[dict]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    summary = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
