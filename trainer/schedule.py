"""Schedules as pure functions of the optimiser step: the learning rate (linear warm-up, cosine decay)
and the batch size (annealed from small to large, a follow-up the seed note lists)."""
from __future__ import annotations

import math

BATCH_SCHEDULE_FORM = ('"BATCH" or "BATCH:UNTIL_STEP,...,BATCH" with increasing steps, '
                       'e.g. "64:2000,256:4000,1024"')


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate at optimiser step `step` (0-based): base_lr * step / warmup during the warm-up,
    then base_lr * (1 + cos(pi * progress)) / 2 with progress going 0 -> 1 from `warmup` to `total`,
    then 0."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 <= warmup <= total or total < 1:
        raise ValueError(f"need 0 <= warmup <= total and total >= 1, got warmup={warmup}, total={total}")
    if step < warmup:
        return base_lr * step / warmup
    if step >= total:
        return 0.0
    progress = (step - warmup) / (total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_lr(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """Learning rate of optimiser step `step` (0-based) of a run of `steps` steps: lr_at over the points
    1..steps of a schedule of steps + 1, so that neither the first step (warm-up at 0) nor the last (cosine
    at 0) is taken at rate 0."""
    return lr_at(step + 1, base_lr, min(warmup, steps), steps + 1)


def parse_batch_schedule(text: str) -> list[tuple[int, int]]:
    """"64:2000,256:4000,1024" -> [(0, 64), (2000, 256), (4000, 1024)]: (first step, batch size) pairs.

    Batch 64 is used for steps 0..1999, 256 for 2000..3999, 1024 from step 4000 on. A single "256" is a
    constant batch size. Only the last entry has no step (it lasts until the end of training).
    """
    entries = [e.strip() for e in text.split(",")]
    schedule: list[tuple[int, int]] = []
    start = 0
    for n, entry in enumerate(entries):
        last = n == len(entries) - 1
        parts = entry.split(":")
        if len(parts) != (1 if last else 2):
            where = ("the last entry must have no ':STEP'" if last
                     else "every entry but the last needs ':STEP'")
            raise ValueError(f"bad batch schedule {text!r}: {where}; expected {BATCH_SCHEDULE_FORM}")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"bad batch schedule {text!r}: {entry!r} is not integers; "
                             f"expected {BATCH_SCHEDULE_FORM}") from None
        if values[0] < 1:
            raise ValueError(f"bad batch schedule {text!r}: batch size {values[0]} must be >= 1; "
                             f"expected {BATCH_SCHEDULE_FORM}")
        schedule.append((start, values[0]))
        if not last:
            if values[1] <= start:
                raise ValueError(f"bad batch schedule {text!r}: step {values[1]} must be greater than "
                                 f"{start}; expected {BATCH_SCHEDULE_FORM}")
            start = values[1]
    return schedule


def batch_size_at(step: int, schedule: list[tuple[int, int]]) -> int:
    """Batch size at optimiser step `step` for a schedule from `parse_batch_schedule`."""
    size = schedule[0][1]
    for first_step, batch_size in schedule:
        if step >= first_step:
            size = batch_size
    return size
