"""Image files -> CLIP image embeddings in batches: PIL decoding in DataLoader workers (with JPEG draft mode),
or JPEG bytes decoded in batches on the device (torchvision.io: nvjpeg on a GPU), then the image tower."""
from __future__ import annotations

import contextlib
import io
import os
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from pipeline.stopping import ignore_stop_signals
from pipeline.towers import image_tower, pipelined

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
# JPEG colour modes that torchvision.io.decode_jpeg turns into RGB on every device; others (CMYK) go to PIL
DEVICE_JPEG_MODES = ("RGB", "L")
# open_clip preprocessing steps that leave an RGB tensor as it is
PASS_THROUGH = ("MaybeConvertMode", "_convert_to_rgb")


class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (pixels, reason): reason is "" when the image decoded, else why it failed (pixels None).

    raw=False: decoded by PIL here, in the worker (with `draft_size`, a JPEG is decoded at 1/2, 1/4 or 1/8
    scale straight from the DCT, never below draft_size pixels on either side: PIL's draft mode), resized and
    cropped by the model's `preprocess`, and returned as uint8 [3, S, S]: a quarter of the bytes of float32
    through shared and pinned memory; `model_input` scales and normalises on the device, as `preprocess`
    would. A preprocessing that cannot be split so runs whole here (float32 [3, S, S]).
    raw=True: plain RGB or greyscale JPEGs come back as their file bytes (uint8 [n]) for `decode_on_device`;
    anything else (PNG, CMYK JPEG, a JPEG without its end marker) is decoded here to uint8 [3, H, W] RGB.
    Transparent pixels are put over white in both modes.
    """

    def __init__(self, paths: list[str], preprocess, draft_size: int | None = None, raw: bool = False):
        self.paths, self.preprocess, self.draft_size, self.raw = paths, preprocess, draft_size, raw
        try:
            self.steps, self.normalize = device_steps(preprocess)
        except ValueError:
            self.steps = self.normalize = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str]:
        path = self.paths[i]
        try:
            if self.raw:
                return _read_raw(path), ""
            img = open_rgb(path, self.draft_size)
            if self.steps is None:
                return self.preprocess(img), ""
            for step in self.steps:
                img = step(img)
            return pil_to_uint8(img), ""
        except FileNotFoundError:
            return None, "missing file"
        except IsADirectoryError:
            return None, "a folder, not a file"
        except UnidentifiedImageError:
            return None, "empty file (0 bytes)" if os.path.getsize(path) == 0 else \
                "not an image (PIL cannot identify it)"
        except Exception as e:   # truncated or corrupt data, decompression bombs: one file must not stop all
            return None, f"unreadable image: {type(e).__name__}: {e}"

    def collate(self, batch: list) -> tuple[torch.Tensor | PackedItems | None, list[str]]:
        """(pixels of the items that decoded, in order, reasons of all items). pixels: [m, 3, S, S]
        (raw=False; None when m == 0) or the m raw items packed in one buffer (raw=True)."""
        reasons = [reason for _, reason in batch]
        good = [x for x, reason in batch if not reason]
        if self.raw:
            return PackedItems.pack(good), reasons
        return (torch.stack(good) if good else None), reasons

    def model_input(self, pixels: torch.Tensor, device: str) -> torch.Tensor:
        """A collated raw=False batch -> the model's input [m, 3, S, S] float32 on `device`."""
        x = pixels.to(device, non_blocking=True)
        return self.normalize(x.float() / 255) if x.dtype == torch.uint8 else x


@dataclass
class PackedItems:
    """A batch of ImageFiles(raw=True) items in one buffer. A DataLoader worker hands each tensor to the main
    process through a shared-memory file of its own, at about 0.5 ms of the main process' time apiece: 256
    JPEGs sent one by one capped the GPU path at ~2,000 images/s whatever the decoder could do; one buffer
    per batch costs that once.
    """
    data: torch.Tensor             # the JPEG files end to end, uint8 [total bytes]
    sizes: list[int]               # per item: its bytes in `data`, or 0 for an image decoded in the worker
    decoded: list[torch.Tensor]    # those images (uint8 [3, H, W]), in order

    @classmethod
    def pack(cls, items: list[torch.Tensor]) -> PackedItems:
        jpegs = [x for x in items if x.dim() == 1]
        data = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
        return cls(data, [len(x) if x.dim() == 1 else 0 for x in items], [x for x in items if x.dim() != 1])

    def unpack(self) -> list[torch.Tensor]:
        """The items, in order: each JPEG a view of `data` (uint8 [n], contiguous), no copy."""
        views = iter(torch.split(self.data, [n for n in self.sizes if n]))
        decoded = iter(self.decoded)
        return [next(views) if n else next(decoded) for n in self.sizes]


def open_rgb(source, draft_size: int | None = None) -> Image.Image:
    """An image file (path or file object) as an RGB PIL image; transparency over white, as viewers show it.
    draft_size: decode a JPEG at the smallest DCT scale that keeps both sides >= draft_size."""
    with Image.open(source) as img:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            # not over the hidden colour of transparent pixels, which is what convert("RGB") would show
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
        return img.convert("RGB")


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()


def _read_raw(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        data = f.read()
    # The end marker check sends truncated JPEGs to PIL, which refuses them, whatever nvjpeg would do.
    if data[:2] == JPEG_START and data.rstrip(b"\0")[-2:] == JPEG_END:
        with Image.open(io.BytesIO(data)) as header:   # reads the header only
            if header.mode in DEVICE_JPEG_MODES:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return pil_to_uint8(open_rgb(io.BytesIO(data)))


# ----------------------------------------------------------------------------------------------------
# Decoding and preprocessing on the device


def device_steps(preprocess) -> tuple[list, T.Normalize]:
    """open_clip's eval transform split into the resize/crop steps, which torchvision runs on uint8 tensors
    [B, 3, H, W] on any device, and the final Normalize. ValueError for steps that only work on PIL images."""
    steps, normalize = [], None
    for step in getattr(preprocess, "transforms", [preprocess]):
        if isinstance(step, (T.Resize, T.CenterCrop)) or type(step).__name__ == "CenterCropOrPad":
            steps.append(step)
        elif isinstance(step, T.Normalize):
            normalize = step
        elif isinstance(step, T.ToTensor) or getattr(step, "__name__", type(step).__name__) in PASS_THROUGH:
            continue   # decode_jpeg already gives RGB; the scaling to [0, 1] happens before Normalize
        else:
            raise ValueError(f"the GPU decoding path cannot run the preprocessing step {step!r} of this "
                             "model (resize_mode 'longest', a non-square input?); run without --gpu-decode")
    if normalize is None:
        raise ValueError(f"no Normalize step in the model's preprocessing {preprocess!r}; run without "
                         "--gpu-decode")
    return steps, normalize


def decode_on_device(items: list[torch.Tensor], reasons: list[str], preprocess, device: str) -> torch.Tensor:
    """What ImageFiles(raw=True) gave (JPEG bytes uint8 [n] or RGB uint8 [3, H, W]) -> the model's input
    [m, 3, S, S] float32 on `device`, like `preprocess` on PIL images (same resize and crop, on tensors).

    `items` are the images whose reason is "" (the collated batch), in order; a JPEG the device cannot decode
    is decoded by PIL instead, and one that PIL cannot decode either gets its reason set here. The rows of the
    result are the items whose reason is still "" afterwards.
    """
    steps, normalize = device_steps(preprocess)
    slots = [i for i, reason in enumerate(reasons) if not reason]   # batch position of each item
    assert len(slots) == len(items), "items must be the images of `reasons` that have no failure"
    images: dict[int, torch.Tensor] = {s: x for s, x in zip(slots, items) if x.dim() == 3}
    jpegs = [(s, x) for s, x in zip(slots, items) if x.dim() == 1]
    for s, data, x in _decode_halving(jpegs, device):
        if x is not None:
            images[s] = x
            continue
        try:   # what the device cannot decode, PIL may (or says why not)
            images[s] = pil_to_uint8(open_rgb(io.BytesIO(data.numpy().tobytes())))
        except Exception as e:
            reasons[s] = f"unreadable image: {type(e).__name__}: {e}"
    # Same-sized images (most of a photo corpus) are resized together: a few kernels per batch, not per image.
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for s in sorted(images):
        if not reasons[s]:
            by_shape[tuple(images[s].shape)].append(s)
    outputs, order = [], []
    for group in by_shape.values():
        x = torch.stack([images[s].to(device, non_blocking=True) for s in group])
        for step in steps:
            x = step(x)
        outputs.append(x)
        order += group
    if not outputs:
        return torch.zeros(0, 3, 1, 1, device=device)
    x = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if len(outputs) > 1:   # back to batch order: one gather, not a view and a copy per image
        x = x[torch.from_numpy(np.argsort(order, kind="stable")).to(x.device)]
    return normalize(x.float() / 255)


def _decode_halving(jpegs: list[tuple[int, torch.Tensor]],
                    device: str) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(slot, JPEG bytes, decoded RGB uint8 [3, H, W] or None where the device cannot decode that file), in
    order.

    One call decodes the whole batch (batched nvJPEG on a GPU), but one file it cannot decode fails the
    call: then each half is tried again, so a bad file among n costs about 2 log2(n) calls, not n."""
    if not jpegs:
        return []
    try:
        return [(s, x, image) for (s, x), image in zip(jpegs, _decode_jpegs([x for _, x in jpegs], device))]
    except RuntimeError:
        if len(jpegs) == 1:
            return [(*jpegs[0], None)]
        half = len(jpegs) // 2
        return _decode_halving(jpegs[:half], device) + _decode_halving(jpegs[half:], device)


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _decode_jpegs(data: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """torchvision's decode_jpeg of a list of JPEG byte tensors to RGB uint8 on `device`.

    On a GPU it runs with a side stream current. torchvision allocates the outputs on the current stream and
    nvJPEG writes them from a stream of its own that waits for nothing (pytorch/vision PR #9606, unmerged;
    nvJPEG's hardware engine ignores stream order anyway: meta-pytorch/torchcodec PR #1634): from the main
    stream's pool it could be handed a block that the image tower of the previous batch, still queued,
    is about to read. The side stream's pool only holds the decoder's own earlier outputs, which
    record_stream keeps until the main stream is done with them; the main stream waits for the decode.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    dev = torch.device(device)
    if dev.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
    main = torch.cuda.current_stream(dev)
    side = _SIDE_STREAMS.setdefault(main.device, torch.cuda.Stream(main.device))
    with torch.cuda.stream(side):
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=main.device)
    main.wait_stream(side)
    for image in decoded:
        image.record_stream(main)
    return decoded


# ----------------------------------------------------------------------------------------------------
# Embedding


def embed_image_files(model, preprocess, paths: list[str], device: str = "cpu", batch_size: int = 256,
                      workers: int = 0, draft_size: int | None = None, gpu_decode: bool = False,
                      cuda_graph: bool = True) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Per batch of `batch_size` paths, in order: (unit-norm image embeddings [m, D] float32 of the images
    that decoded, reasons [n]: "" or why the image failed). `workers` processes decode and preprocess (see
    ImageFiles); the device computes batch i+1 while the caller consumes batch i. On a GPU the image tower
    runs as a CUDA graph unless `cuda_graph` is False (pipeline.towers.Tower)."""
    files = ImageFiles(paths, preprocess, draft_size=draft_size, raw=gpu_decode)
    # recorded before the loop starts the decoding thread: a graph capture must have the device to itself
    tower = image_tower(model, preprocess, device, batch_size, cuda_graph)
    # the workers fork when the loop starts: the caller must not hold an HDF5 file open then. JPEG bytes are
    # not pinned: nvJPEG reads them on the host and copies them itself
    loader = torch.utils.data.DataLoader(
        files, batch_size=batch_size, num_workers=workers, collate_fn=files.collate,
        pin_memory=device.startswith("cuda") and not gpu_decode, prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals)
    if gpu_decode:
        batches = _decoded_ahead(loader, preprocess, device)
    else:
        batches = ((files.model_input(pixels, device) if pixels is not None else None, reasons)
                   for pixels, reasons in loader)
    yield from pipelined(tower, batches)


def _decoded_ahead(loader, preprocess, device: str, ahead: int = 2) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The loader's raw batches through `decode_on_device`, on a thread of its own up to `ahead` batches
    ahead of the caller. torchvision's nvJPEG call holds its thread until the batch is decoded (it waits for
    its stream) but not the GIL, so meanwhile the caller queues the image tower and writes the previous
    batch instead of waiting in turn. On a GPU the thread's kernels (resizing, normalising) go to a stream
    of its own, so that they can run beside the image tower's instead of queueing behind them; each batch
    comes with an event that the caller's stream waits for. An exception of the thread is raised here;
    closing the generator stops the thread (and with it the loader's workers)."""
    done: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()
    finished = object()
    dev = torch.device(device)
    stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    def decode() -> None:
        try:
            with torch.inference_mode(), torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for packed, reasons in loader:
                    if stop.is_set():
                        return
                    x = decode_on_device(packed.unpack(), reasons, preprocess, device)
                    ready = None
                    if stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(stream)
                    done.put((x, reasons, ready))
            done.put(finished)
        except BaseException as e:   # the caller re-raises it
            done.put(e)

    thread = threading.Thread(target=decode, name="clipspeech-decode", daemon=True)
    thread.start()
    try:
        while (item := done.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            x, reasons, ready = item
            if ready is not None:   # the caller's stream reads x once the thread's stream has written it,
                caller = torch.cuda.current_stream(x.device)
                caller.wait_event(ready)
                x.record_stream(caller)   # and x's memory is not reused before the caller is done with it
            yield x, reasons
    finally:
        stop.set()
        while thread.is_alive():   # empty the queue, so that a put() waiting on it returns
            try:
                done.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
