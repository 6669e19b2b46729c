#!/usr/bin/env python
"""Speed of embed-images (files -> cache) beside the model-only ceiling and a naive loop, Flickr-like JPEGs.

    python benchmarks/embed_images.py --images 20000 --device cuda --batch-size 256 --workers 16 --gpu-decode

The JPEGs (500x375, about 70 KB, like Flickr8k's) are made once under --out and reused. The model is
ViT-B-32 with random weights (the speed is the same as with trained ones); nothing is downloaded.
Figures: end to end = images / seconds of the stage's image phase (decode, preprocess, encode, write);
ceiling = random tensors through encode_image at the same batch size; naive = PIL decode + preprocess +
encode_image one image at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cache.manifest import IMAGE_STORE, atomic_write_text  # noqa: E402
from cache.reader import StoreReader  # noqa: E402
import pipeline.images as images_module  # noqa: E402
from pipeline.embed import EmbedConfig, embed_images, load_teacher  # noqa: E402
from pipeline.extract import check_device  # noqa: E402
from pipeline.images import ImageFiles, PackedItems, _decode_jpegs, decode_on_device  # noqa: E402
from pipeline.towers import autocast, image_tower  # noqa: E402
from profiling import profiled  # noqa: E402

WIDTH, HEIGHT, QUALITY = 500, 375, 85    # quality 85 gives about 70 KB for these pictures
WORDS = "a dog man woman child runs jumps on the grass beach street in red blue shirt water ball".split()


def photo(rng: np.random.Generator) -> Image.Image:
    """Smooth random colour regions plus fine grain: JPEG sizes and decode costs like real photos."""
    coarse = (rng.random((HEIGHT // 24 + 2, WIDTH // 24 + 2, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC)).astype(np.float32)
    grain = (rng.normal(0, 40, (HEIGHT // 2, WIDTH // 2)) + 128).clip(0, 255).astype(np.uint8)
    grain = np.asarray(Image.fromarray(grain).resize((WIDTH, HEIGHT), Image.BILINEAR), np.float32) - 128
    return Image.fromarray((base + grain[..., None]).clip(0, 255).astype(np.uint8))


def write_photo(task: tuple[Path, int]) -> str:
    """Image i (seeded by i, so the files do not depend on the number of processes) -> its caption."""
    folder, i = task
    rng = np.random.default_rng(i)
    photo(rng).save(folder / f"{i:06d}.jpg", quality=QUALITY)
    return " ".join(rng.choice(WORDS, size=8))


def make_corpus(out: Path, images: int, processes: int) -> Path:
    """A JSONL corpus of `images` JPEGs, one caption each (all sharing one short WAV); reused when there."""
    root = out / f"corpus-{images}"
    manifest = root / "corpus.jsonl"
    if manifest.is_file():
        return manifest
    print(f"writing {images} JPEGs ({WIDTH}x{HEIGHT}, quality {QUALITY}) to {root} ...", flush=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    sf.write(root / "silence.wav", np.zeros(1600, np.float32), 16000)
    with multiprocessing.get_context("spawn").Pool(max(1, processes)) as pool:
        captions = pool.map(write_photo, [(root / "images", i) for i in range(images)], chunksize=64)
    lines = [json.dumps({"id": f"u{i:06d}", "audio": "silence.wav", "image": f"images/{i:06d}.jpg",
                         "caption": caption, "split": "train"}) for i, caption in enumerate(captions)]
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_ceiling(teacher, device: str, batch_size: int, batches: int, cuda_graph: bool) -> float:
    """img/s of the stage's image tower (`image_tower`: encode_image and the normalisation, as a CUDA graph
    where the stage records one) on random [B, 3, S, S] tensors already on the device, after one warm-up."""
    tower = image_tower(teacher.model, teacher.preprocess, device, batch_size, cuda_graph)
    if cuda_graph and device.startswith("cuda") and tower.graphed is None:
        raise RuntimeError("the image tower could not be recorded as a CUDA graph (see the warning above)")
    size = teacher.preprocess(Image.new("RGB", (64, 64))).shape
    x = torch.randn(batch_size, *size, device=device)
    with torch.inference_mode():
        tower(x)
        sync(device)
        started = time.perf_counter()
        for _ in range(batches):
            tower(x)
        sync(device)
    return batches * batch_size / (time.perf_counter() - started)


def naive_loop(model, preprocess, paths: list[Path], device: str) -> float:
    """img/s of the obvious loop: open, preprocess, encode one image, normalise, back to the host."""
    started = time.perf_counter()
    with torch.inference_mode(), autocast(device):
        for path in paths:
            x = preprocess(Image.open(path))[None].to(device)
            emb = model.encode_image(x).float()
            (emb / emb.norm(dim=-1, keepdim=True)).cpu()
    return len(paths) / (time.perf_counter() - started)


def gpu_path_parts(paths: list[Path], preprocess, device: str, batch_size: int, workers: int,
                   kept: int = 8, profile_to: Path | None = None) -> dict:
    """img/s of each part of the --gpu-decode path alone: the DataLoader handing over raw batches (files
    read in workers, nothing decoded), nvJPEG's batched decode of batches already in memory, and that decode
    with the resize, crop and normalisation of decode_on_device; on a GPU also nvJPEG on the same bytes in
    page-locked memory (the stage's are pageable). After one warm-up batch each, best of two rounds."""
    files = ImageFiles([str(p) for p in paths], preprocess, raw=True)
    loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=workers,
                                         collate_fn=files.collate, prefetch_factor=4 if workers else None)
    started, n, batches = time.perf_counter(), 0, []
    for packed, reasons in loader:
        n += len(packed.unpack())
        if len(batches) <= kept:
            batches.append((packed, reasons))
    rates = {"loader_img_per_s": n / (time.perf_counter() - started)}

    def nvjpeg(items, reasons):
        return _decode_jpegs(items, device)

    parts = [("nvjpeg", nvjpeg, batches),
             ("decode_resize", lambda items, reasons: decode_on_device(items, reasons, preprocess, device),
              batches)]
    if device.startswith("cuda"):   # the same bytes in page-locked memory: are nvJPEG's copies of them cheaper?
        pinned = [(PackedItems(p.data.pin_memory(), p.sizes, p.decoded), reasons) for p, reasons in batches]
        parts.append(("nvjpeg_pinned", nvjpeg, pinned))
    for _ in range(2):   # rounds alternate between the parts, so that none has the machine warmer alone
        for name, work, kept_batches in parts:
            work(kept_batches[0][0].unpack(), list(kept_batches[0][1]))
            sync(device)
            started, m = time.perf_counter(), 0
            for packed, reasons in kept_batches[1:]:
                m += len(work(packed.unpack(), list(reasons)))
            sync(device)
            rate = m / (time.perf_counter() - started)
            rates[f"{name}_img_per_s"] = max(rate, rates.get(f"{name}_img_per_s", 0.0))
    if profile_to is not None:   # where decode_on_device's time goes, op by op, on the host and the device
        def decode_kept():
            for packed, reasons in batches[1:]:
                decode_on_device(packed.unpack(), list(reasons), preprocess, device)
            sync(device)
        _, tables = profiled(decode_kept, device)
        profile_to.parent.mkdir(parents=True, exist_ok=True)
        profile_to.write_text(f"decode_on_device, {len(batches) - 1} batches of {batch_size}\n{tables}\n")
    return rates


def end_to_end(manifest: Path, cache: Path, args, gpu_decode: bool, cuda_graph: bool = True,
               batch_size: int | None = None) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    with stage_clocks() as clocks:
        summary = embed_images(EmbedConfig(data=manifest, cache=cache, model=args.model, pretrained=None,
                                           device=args.device, batch_size=batch_size or args.batch_size,
                                           workers=args.workers, gpu_decode=gpu_decode, cuda_graph=cuda_graph,
                                           progress=not args.quiet))
    total = time.perf_counter() - started
    return {"img_per_s": summary.images_embedded / summary.seconds_images,
            "image_phase_s": summary.seconds_images, "caption_phase_s": summary.seconds_captions,
            "captions_per_s": summary.captions_embedded / summary.seconds_captions,
            "total_s": total, "embedded": summary.images_embedded,
            "failed": summary.images_failed, **{k: round(v, 3) for k, v in clocks.items()}}


def agreement(cache: Path, other: Path) -> dict:
    """Cosine of each image's embedding in `other` with its embedding in `cache` (two decoding paths, one
    model): a fast path that computed something else (a stream race, a batch out of order) shows here. Two
    different images of this benchmark with random weights are far apart (test_cuda.py: median cosine
    -0.08), the same image decoded by nvJPEG or PIL >= 0.97."""
    with StoreReader(cache / IMAGE_STORE) as a, StoreReader(other / IMAGE_STORE) as b:
        want, _, ids = a.load_all()
        got, _, _ = b.load_all(ids)
    cosine = np.einsum("ij,ij->i", want.astype(np.float32), got.astype(np.float32))
    return {"images": len(ids), "min_cosine": float(cosine.min()), "median_cosine": float(np.median(cosine))}


class _Clock:
    """Adds the wall and the calling thread's CPU seconds of a `with` block to clocks[name + "_wall_s"] and
    clocks[name + "_cpu_s"]."""

    def __init__(self, clocks: dict, name: str):
        self.clocks, self.name = clocks, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc):
        for kind, now, then in (("wall", time.perf_counter(), self.wall), ("cpu", time.thread_time(), self.cpu)):
            key = f"{self.name}_{kind}_s"
            self.clocks[key] = self.clocks.get(key, 0.0) + now - then


@contextlib.contextmanager
def stage_clocks():
    """Where the image phase's time goes, thread by thread, wall and CPU seconds:
    main_*: the main thread over the image phase (the generator embed_image_files and the stage's use of it:
    queueing the image tower, writing the parts); of it, wait_inputs_s waiting for the next batch from the
    --gpu-decode thread and wait_device_s for the device's embeddings (`to_host`). Wall minus CPU minus the two
    waits is what the main thread spent blocked otherwise: mostly waiting for the GIL.
    loader_*, decode_*: the --gpu-decode thread taking batches from the DataLoader and in decode_on_device.
    Wraps functions of pipeline.images, .towers and .embed by name for the duration."""
    import pipeline.embed as embed_module
    import pipeline.towers as towers_module
    clocks: dict[str, float] = {}
    files, inputs = embed_module.embed_image_files, images_module._decoded_ahead
    fetch, decode = towers_module.to_host, images_module.decode_on_device
    images_phase = threading.Event()   # the caption phase fetches its embeddings through to_host too

    def timed_files(*args, **kwargs):
        batches = iter(files(*args, **kwargs))
        images_phase.set()
        try:
            with _Clock(clocks, "main"):
                while True:   # the clock runs while the stage writes too (its own thread's CPU seconds)
                    item = next(batches, None)
                    if item is None:
                        return
                    yield item
        finally:
            images_phase.clear()

    def timed_loader(loader):
        batches = iter(loader)
        while True:
            with _Clock(clocks, "loader"):
                item = next(batches, None)
            if item is None:
                return
            yield item

    def timed_inputs(loader, *args, **kwargs):
        batches = inputs(timed_loader(loader), *args, **kwargs)
        try:
            while True:
                start = time.perf_counter()
                item = next(batches, None)
                clocks["wait_inputs_s"] = clocks.get("wait_inputs_s", 0.0) + time.perf_counter() - start
                if item is None:
                    return
                yield item
        finally:
            batches.close()

    def timed_fetch(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fetch(*args, **kwargs)
        finally:
            if images_phase.is_set():
                clocks["wait_device_s"] = clocks.get("wait_device_s", 0.0) + time.perf_counter() - start

    def timed_decode(*args, **kwargs):
        with _Clock(clocks, "decode"):
            return decode(*args, **kwargs)

    embed_module.embed_image_files, towers_module.to_host = timed_files, timed_fetch
    images_module._decoded_ahead, images_module.decode_on_device = timed_inputs, timed_decode
    try:
        yield clocks
    finally:
        embed_module.embed_image_files, towers_module.to_host = files, fetch
        images_module._decoded_ahead, images_module.decode_on_device = inputs, decode


class Figures(dict):
    """The run's figures; each one set rewrites the JSON file (when there is one), so that a run cut off at
    its time limit (a device call) keeps what it measured."""

    def __init__(self, path: Path | None, figures: dict):
        super().__init__()
        self.path = path
        for key, value in figures.items():
            self[key] = value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self, indent=2) + "\n")


def recorded(results: dict, name: str, work, *args, key: str | None = None):
    """work(*args), stored as results[key] (when key is given and it returned something), or None where it
    fails (a GPU-only bug, say): then the failure is logged and recorded as results[name + "_error"] instead
    of costing the figures measured before and after it, which are written regardless (exit 1 at the end)."""
    try:
        value = work(*args)
    except Exception as e:
        logging.exception("%s failed", name)
        results[f"{name}_error"] = f"{type(e).__name__}: {e}"
        return None
    if key is not None and value is not None:
        results[key] = value
    return value


def clock_lines(r: dict) -> list[str]:
    """stage_clocks' figures of one stage run, in words."""
    if "main_wall_s" not in r:
        return []
    waits = [f"{k[5:-2]} {r[k]:.2f} s" for k in ("wait_inputs_s", "wait_device_s") if k in r]
    lines = [f"main thread: {r['main_wall_s']:.2f} s, CPU {r['main_cpu_s']:.2f} s, waiting for {', '.join(waits)}"]
    if "decode_wall_s" in r:
        lines.append(f"decode thread: loader {r.get('loader_wall_s', 0):.2f} s (CPU {r.get('loader_cpu_s', 0):.2f}),"
                     f" decode_on_device {r['decode_wall_s']:.2f} s (CPU {r['decode_cpu_s']:.2f})")
    return lines


def machine(device: str) -> str:
    cpu = f"{len(os.sched_getaffinity(0))} cores" if hasattr(os, "sched_getaffinity") else "?"
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "no GPU"
    return f"{platform.node()}: {cpu}, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000, help="JPEGs to make and embed [3000]")
    parser.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    parser.add_argument("--batch-size", type=int, default=256, help="[256]")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="decoding processes of the stage [all cores]")
    parser.add_argument("--gpu-decode", action="store_true",
                        help="also run the stage with --gpu-decode (torchvision.io; on cpu: libjpeg-turbo)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model, random weights [ViT-B-32]")
    parser.add_argument("--naive-images", type=int, default=None,
                        help="images for the naive loop [min(--images, 200)]")
    parser.add_argument("--ceiling-batches", type=int, default=3, help="timed batches for the ceiling [3]")
    parser.add_argument("--also-batch-sizes", default="", metavar="B,B,..",
                        help="with --gpu-decode: that stage again at each of these batch sizes, last []")
    parser.add_argument("--out", type=Path, default=Path("bench-embed"),
                        help="JPEGs and caches [bench-embed]")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="with --gpu-decode: a torch.profiler table of decode_on_device in DIR")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        also = [int(b) for b in args.also_batch_sizes.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--also-batch-sizes {args.also_batch_sizes!r}: give batch sizes like 512,1024")
    if min(args.images, args.batch_size, args.ceiling_batches, *also) < 1 or args.workers < 0:
        parser.error("--images, --batch-size, --ceiling-batches, --also-batch-sizes must be >= 1 and "
                     "--workers >= 0")
    try:   # before the pictures are written: a missing GPU is said at once, in the stage's words
        check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    manifest = make_corpus(args.out, args.images, args.workers)
    paths = sorted((manifest.parent / "images").glob("*.jpg"))
    size_kb = np.mean([p.stat().st_size for p in paths[:200]]) / 1000

    results = Figures(args.json, {
        "date": datetime.date.today().isoformat(), "machine": machine(args.device), "command": " ".join(sys.argv),
        "images": args.images, "mean_jpeg_kb": round(size_kb, 1), "model": f"{args.model} (random weights)",
        "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
        "torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg()[0]})
    teacher = load_teacher(args.model, None, args.device)
    graphs = args.device.startswith("cuda")   # where the stage records its image tower as a CUDA graph
    recorded(results, "ceiling", model_ceiling, teacher, args.device, args.batch_size, args.ceiling_batches,
             True, key="ceiling_img_per_s")
    if graphs:   # what the tower did before, launched kernel by kernel
        results["ceiling_eager_img_per_s"] = model_ceiling(teacher, args.device, args.batch_size,
                                                           args.ceiling_batches, cuda_graph=False)
    del teacher   # the stages load their own
    # the stages first, the figures that matter most: a run cut off at its time limit keeps them
    results["stage"] = end_to_end(manifest, args.out / "cache", args, gpu_decode=False)
    if args.gpu_decode:
        def stages():
            results["stage_gpu_decode"] = end_to_end(manifest, args.out / "cache-gpu-decode", args,
                                                     gpu_decode=True)
            results["agreement"] = agreement(args.out / "cache", args.out / "cache-gpu-decode")
        recorded(results, "stage_gpu_decode", stages)
        for b in also:   # fewer, larger batches: what the per-batch costs of both threads are worth
            name = f"stage_gpu_decode_batch_{b}"
            recorded(results, name, end_to_end, manifest, args.out / "cache-gpu-decode", args, True, True, b,
                     key=name)
        if graphs:   # the same stage with the tower launched kernel by kernel: what the graph changes
            recorded(results, "stage_gpu_decode_eager", end_to_end, manifest, args.out / "cache-gpu-decode",
                     args, True, False, key="stage_gpu_decode_eager")
    teacher = load_teacher(args.model, None, args.device)
    naive = paths[:args.naive_images or min(args.images, 200)]
    results["naive_img_per_s"] = naive_loop(teacher.model, teacher.preprocess, naive, args.device)
    if args.gpu_decode:
        recorded(results, "gpu_path_parts", gpu_path_parts, paths, teacher.preprocess, args.device,
                 args.batch_size, args.workers, 8, args.profile / "embed_profile_decode.txt" if args.profile else None,
                 key="gpu_path_parts")
    del teacher

    print(f"\n{results['machine']}\n{args.images} JPEGs of {WIDTH}x{HEIGHT}, {size_kb:.0f} KB; "
          f"{args.model} random weights on {args.device}, batch {args.batch_size}, {args.workers} workers")
    if "ceiling_img_per_s" in results:
        print(f"  model only (random tensors, encode_image):  {results['ceiling_img_per_s']:8.1f} img/s"
              + (" (a CUDA graph a batch, as the stage)" if graphs else ""))
    if "ceiling_eager_img_per_s" in results:
        print(f"  model only, launched kernel by kernel:       {results['ceiling_eager_img_per_s']:8.1f} img/s")
    print(f"  naive loop (PIL + preprocess, 1 at a time):  {results['naive_img_per_s']:8.1f} img/s "
          f"({len(naive)} images)")
    if "gpu_path_parts" in results:
        parts = results["gpu_path_parts"]
        print(f"  --gpu-decode's parts alone: DataLoader (raw files) {parts['loader_img_per_s']:.0f}, nvJPEG "
              f"{parts['nvjpeg_img_per_s']:.0f}, nvJPEG + resize {parts['decode_resize_img_per_s']:.0f} img/s"
              + (f"; nvJPEG from pinned memory {parts['nvjpeg_pinned_img_per_s']:.0f} img/s"
                 if "nvjpeg_pinned_img_per_s" in parts else ""))
    for key, name in (("stage", "embed-images, PIL in workers"),
                      ("stage_gpu_decode", "embed-images --gpu-decode"),
                      ("stage_gpu_decode_eager", "embed-images --gpu-decode --no-cuda-graph"),
                      *((f"stage_gpu_decode_batch_{b}", f"embed-images --gpu-decode --batch-size {b}")
                        for b in also)):
        if key in results:
            r = results[key]
            print(f"  {name + ':':<44}{r['img_per_s']:8.1f} img/s (image phase {r['image_phase_s']:.1f} s; "
                  f"captions {r['captions_per_s']:.0f}/s, {r['caption_phase_s']:.1f} s; whole stage "
                  f"{r['total_s']:.1f} s with the teacher's loading, keywords and indexes)")
            for line in clock_lines(r):
                print(f"  {'':<44}{line}")
    if "agreement" in results:
        a = results["agreement"]
        print(f"  --gpu-decode's embeddings against the PIL path's: cosine min {a['min_cosine']:.4f}, median "
              f"{a['median_cosine']:.4f} over {a['images']} images")
    results["load_average_after"] = os.getloadavg()[0]   # and the JSON file is complete
    print(f"  load average (1 min) before / after: {results['load_average_before']:.1f} / "
          f"{results['load_average_after']:.1f} (other processes share the cores when it exceeds them)")
    errors = [k for k in results if k.endswith("_error")]
    if errors:
        sys.exit(f"failed: {', '.join(errors)} (the other figures were measured and written)")


if __name__ == "__main__":
    main()
