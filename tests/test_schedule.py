"""Learning-rate and batch-size schedules as pure functions of the optimiser step."""
import math
import re

import pytest

from trainer.schedule import batch_size_at, lr_at, parse_batch_schedule, run_lr


def test_lr_warms_up_linearly_then_decays_to_zero():
    base, warmup, total = 4e-4, 1000, 25000
    assert lr_at(0, base, warmup, total) == 0.0
    assert lr_at(500, base, warmup, total) == pytest.approx(base / 2)
    assert lr_at(warmup, base, warmup, total) == pytest.approx(base)
    middle = (warmup + total) // 2
    assert lr_at(middle, base, warmup, total) == pytest.approx(base / 2)
    assert lr_at(total, base, warmup, total) == 0.0
    assert lr_at(total + 10, base, warmup, total) == 0.0
    # cosine, not linear: a quarter of the way through the decay it is at (1 + cos(pi / 4)) / 2
    quarter = warmup + (total - warmup) // 4
    assert lr_at(quarter, base, warmup, total) == pytest.approx(base * (1 + math.cos(math.pi / 4)) / 2)


def test_lr_is_monotonic_on_each_side_of_the_peak():
    base, warmup, total = 1e-3, 100, 1000
    rising = [lr_at(s, base, warmup, total) for s in range(warmup + 1)]
    falling = [lr_at(s, base, warmup, total) for s in range(warmup, total + 1)]
    assert all(a < b for a, b in zip(rising, rising[1:]))
    assert all(a > b for a, b in zip(falling, falling[1:]))
    assert max(rising + falling) == pytest.approx(base)


def test_lr_without_warmup_starts_at_the_base_rate():
    assert lr_at(0, 1e-3, 0, 10) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="warmup"):
        lr_at(0, 1e-3, 20, 10)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 1e-3, 0, 10)


@pytest.mark.parametrize("warmup", [0, 1, 10, 50])
def test_every_step_of_a_run_moves_the_weights(warmup):
    """The rate the trainer uses at each of its steps: positive at the first and the last step, rising
    to the base rate at the end of the warm-up, falling after it."""
    base, steps = 1e-3, 100
    rates = [run_lr(s, base, warmup, steps) for s in range(steps)]
    assert min(rates) > 0
    peak = max(warmup - 1, 0)
    assert rates[peak] == pytest.approx(base, rel=1e-3)
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1]))
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1:]))
    assert rates[-1] < 0.01 * base


def test_batch_schedule_parses_and_applies():
    schedule = parse_batch_schedule("64:2000,256:4000,1024")
    assert schedule == [(0, 64), (2000, 256), (4000, 1024)]
    sizes = {step: batch_size_at(step, schedule) for step in (0, 1999, 2000, 3999, 4000, 10 ** 6)}
    assert sizes == {0: 64, 1999: 64, 2000: 256, 3999: 256, 4000: 1024, 10 ** 6: 1024}
    assert parse_batch_schedule(" 128 ") == [(0, 128)]
    assert batch_size_at(123, parse_batch_schedule("128")) == 128
    assert parse_batch_schedule("64:10, 128") == [(0, 64), (10, 128)]


@pytest.mark.parametrize("text", ["", "64:2000,256:4000", "64,256", "64:2000:3,128", "abc", "64:x,128",
                                  "64:2000,256:1000,1024", "0", "64:0,128", "-8"])
def test_malformed_batch_schedules_are_errors_that_show_the_form(text):
    with pytest.raises(ValueError, match=re.escape('e.g. "64:2000,256:4000,1024"')):
        parse_batch_schedule(text)
