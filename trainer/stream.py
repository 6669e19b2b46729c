"""--data-mode stream: the train split's features read from the WebDataset shards of CACHE/audio by reader
processes, length-bucketed in a buffer with one caption per image per batch, for caches larger than memory.

Each training process (rank) runs `workers` readers; reader slot = rank * workers + role. Slot s owns the
shards perm[s::slots] (perm: a permutation of the shards seeded by the seed, the same in every process);
each pass reads them in a new order and cuts them, `buffer` utterances at a time, into batches with
LengthBucketBatchSampler.
The stream never ends: a slot starts its next pass when one is done and training stops after `steps`, so no
epoch is counted per worker (webdataset's with_epoch pitfall) and no rank runs dry before the others.
The j-th batch of role r is the one of optimiser step r + j * workers (DataLoader takes the workers in
turn), so each reader knows the batch size of the schedule it must cut.

Every caption of an image is streamed with the shard of its image's first caption (the few that are
stored in another shard are read from there by random access), so the captions of one image all go to one
slot, hence to one rank, in every pass: no global batch holds two captions of an image, even over several
processes whose slots are in different passes.

Resume: each batch carries its position (role, generation, pass, batch in pass, j); the checkpoint holds
the position after the last batch the loop consumed, per rank and role, and a resumed reader re-reads its
current pass up to that batch, so the resumed run gets the same batches as one that never stopped. That
needs the same number of processes and readers; otherwise the stream restarts with passes seeded by the
step (a new shuffle; model, optimiser and every other state are still restored exactly).
"""
from __future__ import annotations

import json
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from cache.manifest import AUDIO_STORE, read_manifest
from cache.reader import StoreReader
from cache.store import SIZES_JSON, completed_parts
from trainer.data import Batch, SplitData, apply_speaker_cmvn, padded_frames
from trainer.sampler import LengthBucketBatchSampler
from trainer.schedule import batch_size_at

log = logging.getLogger(__name__)

BUFFER_BATCHES = 8   # the buffer holds at least this many local batches (5 captions of an image must part)


@dataclass(frozen=True)
class ShardPlan:
    """Where each utterance of the split is streamed from; numpy and str only, so readers can pickle it."""
    cache: str
    paths: list[str]             # [S] tar shards holding some of the split, by part number
    utt_ids: list[str]           # [N] in split order (SplitData order)
    rows: np.ndarray             # [N] the row of each in the audio store's index
    lengths: np.ndarray          # [N] frames
    image_codes: np.ndarray      # [N] image of each utterance, 0..M-1
    members: list[np.ndarray]    # [S] positions streamed with shard s, in their order in the tar
    strays: list[np.ndarray]     # [S] those of them stored in another shard (read by random access)
    speakers: list[str] | None   # [N] when the features need speaker-level CMVN


def shard_plan(cache: str | Path, data: SplitData) -> ShardPlan:
    """The streaming layout of `data` (a split loaded with features=False) over CACHE/audio's shards."""
    cache = Path(cache)
    manifest = read_manifest(cache)
    store = cache / AUDIO_STORE
    fmt = manifest.get("audio", {}).get("format")
    if fmt != "wds" or not (store / SIZES_JSON).is_file():
        raise ValueError(f"{cache}: --data-mode stream reads WebDataset shards, but this cache's audio store "
                         f"is {fmt!r}; extract it again with `clipspeech extract-audio --format wds` into "
                         f"another --cache, or train with --data-mode memory")
    parts = completed_parts(store)
    sizes = json.loads((store / SIZES_JSON).read_text(encoding="utf-8"))
    reader = StoreReader(store)
    # the index lists the parts' ids part after part, in part-number order (cache/store.py build_index)
    counts = [sizes[path.name] for path in parts.values()]
    stored_in = np.repeat(np.arange(len(parts)), counts)
    index_row = {u: i for i, u in enumerate(reader.ids)}
    rows = np.array([index_row[u] for u in data.utt_ids], dtype=np.int64)
    shard = stored_in[rows] if len(rows) else np.zeros(0, np.int64)
    codes = data.image_index.cpu().numpy()
    home_of_image = np.full(len(data.image_ids), -1, dtype=np.int64)
    for i in np.argsort(rows, kind="stable"):          # the image's first caption in the store decides
        if home_of_image[codes[i]] < 0:
            home_of_image[codes[i]] = shard[i]
    home = home_of_image[codes]
    used = np.unique(home)
    members, strays = [], []
    for s in used:
        mine = np.flatnonzero(home == s)
        mine = mine[np.argsort(rows[mine], kind="stable")]
        at_home = shard[mine] == s
        members.append(np.concatenate([mine[at_home], mine[~at_home]]))
        strays.append(mine[~at_home])
    speaker_cmvn = manifest["audio"].get("features", {}).get("normalisation") == "speaker"
    paths = list(parts.values())
    return ShardPlan(cache=str(cache), paths=[str(paths[int(s)]) for s in used], utt_ids=list(data.utt_ids),
                     rows=rows, lengths=data.lengths.cpu().numpy(), image_codes=codes, members=members, strays=strays,
                     speakers=data.speakers if speaker_cmvn else None)


def slot_shards(n_shards: int, seed: int, generation: int, pass_: int, slot: int, slots: int) -> np.ndarray:
    """The shards (indices into ShardPlan.paths) that reader slot `slot` of `slots` streams in a pass, in
    the pass's order.

    A slot keeps its shards in every pass of a generation (one permutation seeded by seed and generation,
    dealt out slot by slot); each pass only shuffles their order. Slots run through their passes at their
    own pace, so with shards dealt anew per pass, two ranks in different passes could stream one shard at
    the same step, and the captions of an image (which share a shard) would meet in one global batch.
    """
    mine = np.random.default_rng([seed, generation]).permutation(n_shards)[slot::slots]
    return np.random.default_rng([seed, generation, pass_, slot]).permutation(mine)


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


def pass_batches(order: np.ndarray, lengths: np.ndarray, image_codes: np.ndarray,
                 batch_size_of: Callable[[int], int], seed_key: tuple[int, ...], buffer: int,
                 one_caption_per_image: bool = True, bucket: bool = True) -> Iterator[np.ndarray]:
    """One pass's batches (arrays of positions), lazily, in training order.

    `order` [n] positions in stream order; batch k of the pass gets batch_size_of(k) utterances. The stream
    is taken `buffer` utterances at a time (plus what the previous buffer left over); each buffer is cut by
    LengthBucketBatchSampler (length-bucketed, shuffled batch order, no two captions of an image with
    one_caption_per_image). What a buffer cannot place waits for the next; at the end of the pass the rest,
    less than a batch, is dropped. When the batch size changes, the rest of the buffer is cut again.
    """
    carry = np.zeros(0, dtype=np.int64)
    cursor, block_no, k = 0, 0, 0
    while True:
        size = batch_size_of(k)
        take = max(buffer - len(carry), size)
        block = np.concatenate([carry, order[cursor:cursor + take]]).astype(np.int64)
        cursor += take
        exhausted = cursor >= len(order)
        distinct = len(np.unique(image_codes[block])) if one_caption_per_image else len(block)
        if distinct < size:
            if exhausted:
                return
            carry = block      # captions of few images: read on until a batch can be formed
            continue
        sampler = LengthBucketBatchSampler(lengths[block] if bucket else np.ones(len(block)),
                                           image_codes[block], _seed(*seed_key, block_no),
                                           one_caption_per_image=one_caption_per_image)
        block_no += 1
        used = np.zeros(len(block), dtype=bool)
        batches = sampler.plan(0, size)
        for batch in batches:
            if batch_size_of(k) != size:
                break
            used[batch] = True
            yield block[batch]
            k += 1
        carry = block[~used]
        if exhausted and not batches:
            return


class _ShardReader:
    """Reads a slot's shards one after the other and hands out arrays by position. A shard's own members
    come in tar order, read through the store's index (data offsets) in large sequential spans, with no
    tar or .npy header parsing per utterance (3-5x faster than webdataset's tar iterator + np.load:
    benchmarks/data_path.py); its strays are read by random access."""

    def __init__(self, plan: ShardPlan, shards: np.ndarray, store: StoreReader):
        self.plan, self.store = plan, store
        self.loaded: dict[int, np.ndarray] = {}
        self._samples = self._read(shards)

    def _read(self, shards: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for s in shards.tolist():
            members = self.plan.members[s]   # those stored in the shard, in tar order, then its strays
            yield from zip(members.tolist(), self.store.iter_rows(self.plan.rows[members]))

    def take(self, positions: np.ndarray) -> list[np.ndarray]:
        for pos in positions.tolist():
            while pos not in self.loaded:
                got, array = next(self._samples)
                self.loaded[got] = array
        return [self.loaded.pop(pos) for pos in positions.tolist()]


class ShardStream(torch.utils.data.IterableDataset):
    """The endless stream of one rank's local batches; iterated by `workers` DataLoader processes."""

    def __init__(self, plan: ShardPlan, schedule: list[tuple[int, int]], seed: int, rank: int, world: int,
                 workers: int, start_step: int, positions: dict[int, tuple[int, ...]], generation: int,
                 buffer: int, max_frames: int, frame_multiple: int = 1, one_caption_per_image: bool = True,
                 bucket: bool = True):
        super().__init__()
        self.plan, self.schedule, self.seed, self.rank, self.world = plan, schedule, seed, rank, world
        self.roles, self.start_step, self.positions = max(1, workers), start_step, positions
        self.generation = generation
        self.buffer, self.max_frames, self.frame_multiple = buffer, max_frames, frame_multiple
        self.one_caption_per_image, self.bucket = one_caption_per_image, bucket

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        role = ((info.id if info else 0) + self.start_step) % self.roles
        slot, slots = self.rank * self.roles + role, self.world * self.roles
        first = (self.start_step + (info.id if info else 0)) // self.roles   # j of this reader's first batch
        generation, pass_, skip, j = self.positions.get(role, (self.generation, 0, 0, first))
        assert j == first, f"resume position of role {role} is at batch {j}, the step needs {first}"
        store = StoreReader(Path(self.plan.cache) / AUDIO_STORE)

        def local_size(jj: int) -> int:
            return batch_size_at(role + jj * self.roles, self.schedule) // self.world

        while True:
            shards = slot_shards(len(self.plan.paths), self.seed, generation, pass_, slot, slots)
            order = np.concatenate([self.plan.members[s] for s in shards.tolist()] + [np.zeros(0, np.int64)])
            start = j - skip
            batches = pass_batches(order, self.plan.lengths, self.plan.image_codes,
                                   lambda k: local_size(start + k), (self.seed, generation, pass_, slot),
                                   self.buffer, self.one_caption_per_image, self.bucket)
            reader = _ShardReader(self.plan, shards, store)
            produced = 0
            for k, batch in enumerate(batches):
                arrays = reader.take(batch)
                if k < skip:
                    continue
                yield self._collate(batch, arrays, (role, generation, pass_, k, j))
                j, produced = j + 1, produced + 1
            if produced == 0 and skip == 0:
                images = len(np.unique(self.plan.image_codes[order]))
                raise ValueError(
                    f"reader {role} of rank {self.rank} got {len(order)} utterances of {images} images in a "
                    f"pass over {len(shards)} shard(s), too few for a batch of {local_size(j)}: use fewer "
                    "--workers or processes, a smaller batch, or a cache with more shards (smaller "
                    "--part-size)")
            pass_, skip = pass_ + 1, 0

    def _collate(self, positions: np.ndarray, arrays: list[np.ndarray], tag: tuple[int, ...]) -> dict:
        lengths = np.minimum(np.array([len(a) for a in arrays]), self.max_frames)
        if self.plan.speakers is not None:
            cut = [a[:n] for a, n in zip(arrays, lengths)]
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            flat = apply_speaker_cmvn(Path(self.plan.cache), np.concatenate(cut), offsets,
                                      [self.plan.speakers[p] for p in positions.tolist()])
            arrays = [flat[offsets[i]:offsets[i + 1]] for i in range(len(cut))]
        frames = padded_frames(lengths.max(), self.max_frames, self.frame_multiple)
        feats = np.zeros((len(arrays), frames, arrays[0].shape[1]), dtype=np.float16)
        for i, (a, n) in enumerate(zip(arrays, lengths.tolist())):
            feats[i, :n] = a[:n]
        return {"feats": torch.from_numpy(feats), "lengths": torch.from_numpy(lengths.astype(np.int64)),
                "positions": torch.from_numpy(positions.astype(np.int64)), "tag": torch.tensor(tag)}


def _ignore_stop_signals(worker_id: int) -> None:
    """Readers ignore the scheduler's SIGTERM/SIGUSR1 and Ctrl-C's SIGINT (sent to the whole process group):
    the training process takes it, writes last.pt at the end of its step and then shuts the readers down
    itself; a reader killed first would make the DataLoader raise in the middle of that step."""
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class StreamBatches:
    """--data-mode stream, main-process side: the same `next(step) -> Batch` as data.MemoryBatches."""

    def __init__(self, data: SplitData, cache: str | Path, schedule: list[tuple[int, int]], seed: int,
                 rank: int, world: int, workers: int, buffer: int, max_frames: int, device: torch.device,
                 frame_multiple: int = 1, one_caption_per_image: bool = True, bucket: bool = True):
        self.data, self.device, self.rank, self.world = data, device, rank, world
        self.plan = shard_plan(cache, data)
        shards = len(self.plan.paths)
        if shards < world:
            raise ValueError(f"{Path(cache) / AUDIO_STORE}: {shards} shards hold training utterances, fewer than "
                             f"the {world} processes: a rank without a shard would leave the others waiting "
                             "forever; use fewer processes, or extract the cache again with a smaller "
                             "--part-size")
        self.workers = min(workers, shards // world)
        if self.workers < workers:
            # a notice for the user (logged as the command's own messages are), not a Python warning
            log.warning(f"--workers {workers}: only {shards} shards for {world} process(es); using "
                        f"{self.workers} reader(s) per process so that every reader has a shard")
        local_max = max(size for _, size in schedule) // world
        self.settings = dict(plan=self.plan, schedule=schedule, seed=seed, rank=rank, world=world,
                             workers=self.workers, buffer=max(buffer, BUFFER_BATCHES * local_max),
                             max_frames=max_frames, frame_multiple=frame_multiple,
                             one_caption_per_image=one_caption_per_image, bucket=bucket)
        self.positions: dict[int, tuple[int, ...]] = {}
        self.generation = 0
        self._loader = self._iter = None

    def _start(self, step: int) -> None:
        stream = ShardStream(**self.settings, start_step=step, positions=dict(self.positions),
                             generation=self.generation)
        # its own generator: the loader draws the workers' base seed, which must not move the global RNG
        # (dropout) when a resumed run starts its loader at another step than the original run did
        self._loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.workers else None, generator=torch.Generator().manual_seed(0),
            worker_init_fn=_ignore_stop_signals)
        self._iter = iter(self._loader)

    def next(self, step: int) -> Batch:
        if self._iter is None:
            self._start(step)
        item = next(self._iter)
        role, generation, pass_, k, j = item["tag"].tolist()
        assert role + j * max(1, self.workers) == step, f"a batch of step {role + j * self.workers} at {step}"
        self.positions[role] = (generation, pass_, k + 1, j + 1)
        to = dict(device=self.device, non_blocking=True)
        positions = item["positions"].to(**to)
        return Batch(item["feats"].to(**to).float(), item["lengths"].to(**to),
                     self.data.images[self.data.image_index[positions]], self.data.texts[positions],
                     len(positions) * self.world)

    # what cuts a pass into batches: a position (batch k of pass p) means the same batches only under these
    CUT_BY = ("schedule", "seed", "buffer", "one_caption_per_image", "bucket")

    def state_dict(self) -> dict:
        return {"mode": "stream", "workers": self.workers, "world": self.world, "generation": self.generation,
                "positions": {str(r): list(p) for r, p in self.positions.items()},
                **{k: self._cut(k) for k in self.CUT_BY}}

    def _cut(self, key: str):
        value = self.settings[key]
        return [list(x) for x in value] if key == "schedule" else value

    def load_state_dict(self, state: dict, step: int) -> bool:
        """Restores the stream position; False (and a new shuffle seeded by `step`) when the checkpoint
        was written with another number of processes or readers, or with settings that cut a pass into
        other batches (batch size, --stream-buffer, seed): its positions would skip batches other than those
        trained on, and repeat utterances within the pass."""
        if state.get("mode") != "stream":
            raise ValueError(f"the checkpoint was written with --data-mode {state.get('mode')}; resume it "
                             "with the same data mode")
        same_cut = all(state.get(k, self._cut(k)) == self._cut(k) for k in self.CUT_BY)   # older: not kept
        if state["workers"] == self.workers and state["world"] == self.world and same_cut:
            self.close()
            self.positions = {int(r): tuple(p) for r, p in state["positions"].items()}
            self.generation = state.get("generation", 0)
            return True
        self.reshuffle(step)
        return False

    def reshuffle(self, step: int) -> None:
        """Starts a new order of the shards, seeded by `step`: for a resume whose stream position cannot be
        restored (another number of processes or readers)."""
        self.close()
        self.positions, self.generation = {}, step

    def close(self) -> None:
        """Shuts the readers down now. Not left to the DataLoader iterator's collection: after a reader's error
        the traceback keeps the iterator alive until exit, where multiprocessing's terminate() (SIGTERM) is
        lost on readers that ignore it, and its join() waited forever."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iter = self._loader = None
