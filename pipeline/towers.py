"""The CLIP teacher's towers as embed-images runs them: bf16 autocast on a GPU, unit-norm float32 output, and
on a GPU one CUDA graph replay per batch instead of a few hundred kernel launches; results copied to the host
asynchronously, so that the host prepares batch i+1 while the device computes batch i."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def autocast(device: str):
    """bf16 on a GPU (CLIP was trained in mixed precision; the normalisation after it is fp32); fp32 else.
    No cache of cast weights: it only helps backward passes, and a CUDA graph cannot record one."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return torch.autocast("cpu", enabled=False)


class GraphedForward:
    """`forward` (a tensor [n, ...] on a CUDA device -> a tensor [n, ...]) recorded once as a CUDA graph for up
    to `capacity` rows, then replayed: one launch per call instead of one per kernel, and no Python.

    A call copies its n rows into the graph's input buffer, replays, and returns the first n rows of the
    graph's output buffer, which the next call overwrites: queue the copy of the result (or use it) on the
    current stream before calling again. Rows n.. still hold an earlier call's inputs, so only a forward whose
    output rows each depend on their own input row alone may be graphed (the CLIP towers at inference: no
    batch statistics).
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, capacity: int):
        self.forward = forward
        dev = example.device
        self.inputs = torch.zeros((capacity, *example.shape[1:]), dtype=example.dtype, device=dev)
        self.inputs[:min(len(example), capacity)].copy_(example[:capacity])
        with torch.cuda.device(dev):
            caller = torch.cuda.current_stream(dev)
            warm = torch.cuda.Stream(dev)
            warm.wait_stream(caller)
            with torch.cuda.stream(warm):   # the first runs choose kernels and allocate workspaces
                for _ in range(2):
                    forward(self.inputs)
            caller.wait_stream(warm)
            self.graph = torch.cuda.CUDAGraph()
            # "thread_local": what another thread does on the device meanwhile (a DataLoader's pinning
            # thread, a caller's own work) does not spoil the recording; this thread's forward must not sync
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = forward(self.inputs)

    @property
    def capacity(self) -> int:
        return len(self.inputs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        self.inputs[:n].copy_(x)
        self.graph.replay()
        return self.outputs[:n]


class Tower:
    """`forward` (a batch of the model's inputs on `device` -> unit-norm embeddings [n, D] float32 there), on a
    GPU with `cuda_graph`, for n <= batch_size, replayed as one CUDA graph (`GraphedForward`, in `graphed`).

    An eager ViT-B-32 forward launches a few hundred kernels, and at batch 256 on an H200 the host's launching,
    not the device, set embed-images' model-only speed (docs/benchmarks.md). The graph replays the eager
    forward's kernels, so the embeddings are the eager ones. Where recording fails (a model that synchronises
    in its forward, say), a warning says so and the eager forward runs instead (`graphed` is None). A graphed
    result is overwritten by the next call. `example()` makes one input, on `device`, for the recording.
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], example: Callable[[], torch.Tensor],
                 device: str, batch_size: int, cuda_graph: bool = True, name: str = "tower"):
        self.eager = forward
        self.graphed: GraphedForward | None = None
        if not (cuda_graph and torch.device(device).type == "cuda"):
            return
        try:
            with torch.inference_mode():
                self.graphed = GraphedForward(forward, example(), batch_size)
        except Exception as e:   # the eager forward is still right, only slower
            log.warning("the %s could not be recorded as a CUDA graph (%s: %s); it runs eagerly, slower, with "
                        "the same embeddings", name, type(e).__name__, e)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.graphed is not None and len(x) <= self.graphed.capacity:
            return self.graphed(x)
        return self.eager(x)


def image_tower(model, preprocess, device: str, batch_size: int, cuda_graph: bool = True) -> Tower:
    """The model's input [n, 3, S, S] on `device` -> unit-norm image embeddings [n, D] float32 (see Tower)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            emb = model.encode_image(x)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    return Tower(forward, lambda: preprocess(Image.new("RGB", (64, 64)))[None].to(device), device, batch_size,
                 cuda_graph, name="image tower")


def text_tower(model, tokenizer, device: str, batch_size: int, cuda_graph: bool = True) -> Tower:
    """Token ids [n, context] on `device` -> unit-norm text embeddings [n, D] float32 (see Tower)."""
    def forward(tokens: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            emb = model.encode_text(tokens)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    return Tower(forward, lambda: tokenizer([""]).to(device), device, batch_size, cuda_graph, name="text tower")


def encode_async(tower: Tower, x: torch.Tensor | None):
    """Queues `tower` on x and the copy of its output to host memory: (host tensor, event), or None for no
    input. The copy is queued before the next batch's tower, which may overwrite the output; `to_host` waits
    for it."""
    if x is None or len(x) == 0:
        return None
    emb = tower(x)
    if not emb.is_cuda:
        return emb, None
    host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
    host.copy_(emb, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(emb.device))   # the copy's stream, on whichever GPU
    return host, ready


def to_host(encoded) -> np.ndarray:
    """What encode_async queued, once the device has written it: [n, D] float32 ([0, 0] for None)."""
    if encoded is None:
        return np.zeros((0, 0), np.float32)
    host, ready = encoded
    if ready is not None:
        ready.synchronize()
    return host.numpy()


def pipelined(tower: Tower, items: Iterable[tuple[torch.Tensor | None, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
    """(inputs [n, ...] on the device or None, tag) -> (embeddings [n, D] on the host, tag), in order. Batch
    i+1's tower is queued before batch i's result is awaited, so the device computes while the host takes
    the next batch (and whatever the caller does with the previous one)."""
    pending = None
    with torch.inference_mode():
        for x, tag in items:
            launched = (encode_async(tower, x), tag)
            if pending is not None:
                yield to_host(pending[0]), pending[1]
            pending = launched
        if pending is not None:
            yield to_host(pending[0]), pending[1]
