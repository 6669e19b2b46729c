"""Length-bucketed batches in which no two utterances share an image, as a resumable, deterministic
sequence of epoch plans (REFERENCE.md section 8)."""
from __future__ import annotations

from collections import Counter, deque
from typing import Sequence

import numpy as np


def local_slice(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Global batch [B] -> rank's contiguous share [B / world_size] (rank 0 first, as the loss gathers)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if len(batch) % world_size:
        raise ValueError(f"batch of {len(batch)} cannot be split over {world_size} ranks: choose a batch "
                         f"size divisible by the number of ranks")
    share = len(batch) // world_size
    return batch[rank * share:(rank + 1) * share]


def check_batch_size(batch_size: int, n_images: int, n_utterances: int, one_caption_per_image: bool) -> None:
    """ValueError unless batches of `batch_size` can be filled from the split."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (a batch of one has no negatives), got {batch_size}")
    limit = n_images if one_caption_per_image else n_utterances
    if batch_size > limit:
        what = "distinct images" if one_caption_per_image else "utterances"
        raise ValueError(f"batch_size {batch_size} is larger than the {limit} {what}: no batch can be "
                         f"filled; use a batch size of at most {limit}")


class LengthBucketBatchSampler:
    """Batches of utterance indices, similar in length, never two utterances of one image.

    An epoch plan sorts the utterances by length x U(1 - jitter, 1 + jitter), sets aside n % batch_size
    utterances drawn at random (not the longest ones, which a cut at the end of the order would drop every
    epoch), cuts the order into batches and shuffles the batch order.

    With `one_caption_per_image` (the captions of one image must not be each other's negatives), batches
    are filled walking the order; an utterance whose image is already in the batch waits in a first-in,
    first-out queue for the next batch that lacks its image, so it stays near its length neighbours. The
    queue ends with a few batches' worth of too few distinct images (captions of one image have similar
    lengths); each second caption there is swapped with an utterance of the nearest batch that lacks its
    image and whose image its batch lacks. So every utterance but the n % batch_size set aside is used
    exactly once per epoch. Only when no batch can take a caption (an image with more captions than there
    are batches, e.g. batch_size close to the number of images) is it set aside too, its batch completed
    from the set-aside utterances or, failing that, set aside whole.

    The set-aside utterances are dropped with `drop_last`; otherwise they become extra, smaller batches of
    distinct images (not length-bucketed). A batch of one has no negatives (its loss is 0): a lone
    utterance joins an extra batch that lacks its image, or is dropped, e.g. when a single image is left.

    `next_batch(batch_size)` walks the plans epoch after epoch. Changing the batch size starts a new epoch
    at once (the rest of the current plan is skipped) because a plan is only defined for one batch size.
    """

    def __init__(self, lengths: np.ndarray, image_ids: Sequence[str], seed: int,
                 one_caption_per_image: bool = True, jitter: float = 0.15, drop_last: bool = True):
        lengths = np.asarray(lengths)
        if lengths.ndim != 1 or len(lengths) != len(image_ids):
            raise ValueError(f"lengths (shape {lengths.shape}) and image_ids ({len(image_ids)}) must be one "
                             f"entry per utterance")
        if len(lengths) == 0:
            raise ValueError("no utterances to sample from: the split is empty")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.lengths = lengths.astype(np.float64)
        # only equality of images matters: ids or codes of any kind (str, int) give the same plans
        _, self.image_codes = np.unique(np.asarray(image_ids), return_inverse=True)
        self.num_images = int(self.image_codes.max()) + 1
        self.seed = int(seed)
        self.one_caption_per_image = one_caption_per_image
        self.jitter = jitter
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_size: int | None = None
        self.cursor = 0
        self._plan_key: tuple[int, int] | None = None
        self._plan: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.lengths)

    def plan(self, epoch: int, batch_size: int) -> list[np.ndarray]:
        """The epoch's batches (int64 index arrays, in training order); a pure function of
        (seed, epoch, batch_size) and the data."""
        self._check_batch_size(batch_size)
        rng = np.random.default_rng([self.seed, epoch, batch_size])
        keys = self.lengths * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter, len(self.lengths))
        order = np.argsort(keys, kind="stable")
        aside = np.zeros(len(order), dtype=bool)
        aside[rng.choice(len(order), len(order) % batch_size, replace=False)] = True
        leftover = order[aside].tolist()
        order = order[~aside]
        if self.one_caption_per_image:
            batches, pool = self._fill_distinct(order, batch_size)
            # the queue leaves the last few batches' worth with too few distinct images: swap them apart
            pool.sort(key=keys.__getitem__)
            batches += [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
            batches = self._separate_captions(batches, leftover)
        else:
            batches = order.reshape(-1, batch_size).tolist()
        if not self.drop_last:
            batches += self._leftover_batches(leftover)
        batches = [np.asarray(b, dtype=np.int64) for b in batches]
        return [batches[i] for i in rng.permutation(len(batches))]

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next global batch of utterance indices; a new epoch starts when the plan is exhausted or
        when `batch_size` differs from the previous call's."""
        self._check_batch_size(batch_size)
        if self.batch_size is not None and batch_size != self.batch_size:
            self.epoch, self.cursor = self.epoch + 1, 0
        self.batch_size = batch_size
        plan = self._current_plan()
        if self.cursor >= len(plan):
            self.epoch, self.cursor = self.epoch + 1, 0
            plan = self._current_plan()
        batch = plan[self.cursor]
        self.cursor += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_size": self.batch_size, "cursor": self.cursor,
                "seed": self.seed, "num_utterances": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_utterances"] != len(self.lengths):
            raise ValueError(f"sampler state was saved with seed {state['seed']} over "
                             f"{state['num_utterances']} utterances, this sampler has seed {self.seed} over "
                             f"{len(self.lengths)}: resume with the same seed and the same cache split")
        self.epoch, self.batch_size, self.cursor = state["epoch"], state["batch_size"], state["cursor"]

    def _current_plan(self) -> list[np.ndarray]:
        key = (self.epoch, self.batch_size)
        if self._plan_key != key:
            self._plan, self._plan_key = self.plan(*key), key
        return self._plan

    def _check_batch_size(self, batch_size: int) -> None:
        check_batch_size(batch_size, self.num_images, len(self.lengths), self.one_caption_per_image)

    def _fill_distinct(self, order: np.ndarray, batch_size: int) -> tuple[list[list[int]], list[int]]:
        """Walk `order` into full batches of distinct images, deferring duplicates.

        -> (full batches, the rest: fewer distinct images than a batch, with their other captions)."""
        codes = self.image_codes.tolist()  # Python ints: this loop runs once per utterance
        waiting: deque[int] = deque()
        stream = iter(order.tolist())
        batches: list[list[int]] = []
        while True:
            batch: list[int] = []
            seen: set[int] = set()
            for _ in range(len(waiting)):  # the oldest waiting utterances first
                i = waiting.popleft()
                if len(batch) < batch_size and codes[i] not in seen:
                    batch.append(i)
                    seen.add(codes[i])
                else:
                    waiting.append(i)
            while len(batch) < batch_size:
                i = next(stream, None)
                if i is None:
                    return batches, batch + list(waiting)
                if codes[i] in seen:
                    waiting.append(i)
                else:
                    batch.append(i)
                    seen.add(codes[i])
            batches.append(batch)

    def _separate_captions(self, batches: list[list[int]], leftover: list[int]) -> list[list[int]]:
        """Swap second captions of an image out of their batch into the nearest batch that can take them;
        what cannot be placed goes to `leftover` (appended in place). Batches are length-sorted runs."""
        codes = self.image_codes.tolist()  # Python ints: these loops run once per utterance
        images = [Counter(codes[i] for i in batch) for batch in batches]
        keep = [True] * len(batches)
        for c, batch in enumerate(batches):
            # the last (longest) caption of an image moves, to the next batch if it can: the least padding
            for p in range(len(batch) - 1, -1, -1):
                x = batch[p]
                if images[c][codes[x]] == 1:
                    continue
                partner = self._swap_partner(batches, images, keep, c, codes[x], codes)
                if partner is None:  # no batch can take it: set it aside, refill from the set-aside
                    fill = next((j for j, i in enumerate(leftover) if images[c][codes[i]] == 0), None)
                    if fill is None:
                        keep[c] = False
                        break
                    leftover.append(x)
                    batch[p] = leftover.pop(fill)
                    images[c][codes[x]] -= 1
                    images[c][codes[batch[p]]] += 1
                    continue
                d, q = partner
                y = batches[d][q]
                batch[p], batches[d][q] = y, x
                images[c][codes[x]] -= 1
                images[c][codes[y]] += 1
                images[d][codes[y]] -= 1
                images[d][codes[x]] += 1
        for c in range(len(batches)):
            if not keep[c]:
                leftover.extend(batches[c])
        return [batch for c, batch in enumerate(batches) if keep[c]]

    @staticmethod
    def _swap_partner(batches, images, keep, c, image, codes) -> tuple[int, int] | None:
        """(batch, position) of the utterance nearest to batch c in length whose batch lacks `image` and
        whose image batch c lacks; None if there is none."""
        for distance in range(1, len(batches)):
            for d in (c + distance, c - distance):
                if not 0 <= d < len(batches) or not keep[d] or images[d][image]:
                    continue
                # a later batch's shortest utterances are the nearest in length, an earlier one's longest
                positions = range(len(batches[d])) if d > c else range(len(batches[d]) - 1, -1, -1)
                for q in positions:
                    if images[c][codes[batches[d][q]]] == 0:
                        return d, q
        return None

    def _leftover_batches(self, leftover: list[int]) -> list[list[int]]:
        """Cut the set-aside utterances into batches of distinct images (of any images when
        one_caption_per_image is off); no batch of one."""
        if not self.one_caption_per_image:
            return [leftover] if len(leftover) > 1 else []
        codes = self.image_codes
        batches: list[list[int]] = []
        rest = list(leftover)
        while rest:
            batch, seen, later = [], set(), []
            for i in rest:
                (later if codes[i] in seen else batch).append(i)
                seen.add(codes[i])
            if len(batch) > 1:
                batches.append(batch)
            else:
                host = next((b for b in batches if all(codes[j] != codes[batch[0]] for j in b)), None)
                if host is not None:
                    host.append(batch[0])
            rest = later
        return batches
