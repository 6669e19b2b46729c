"""The length-bucketed batch sampler: one caption per image per batch, coverage of an epoch, determinism,
resumption, length homogeneity, batch-size changes, DDP slices."""
import numpy as np
import pytest

from trainer.sampler import LengthBucketBatchSampler, local_slice

IMAGES, CAPTIONS = 200, 5


def _corpus(seed=0):
    """5 spoken captions per image, lengths 80..1200 frames, in a shuffled corpus order."""
    rng = np.random.default_rng(seed)
    image_ids = np.repeat([f"img{k:04d}" for k in range(IMAGES)], CAPTIONS)
    # captions of one image have related lengths, as in real data (which makes duplicates meet in a bucket)
    base = np.repeat(rng.uniform(80, 1000, IMAGES), CAPTIONS)
    lengths = (base * rng.uniform(0.8, 1.2, len(base))).astype(np.int64)
    order = rng.permutation(len(lengths))
    return lengths[order], list(image_ids[order])


def _epoch_batches(sampler, batch_size):
    """All batches of the sampler's next epoch, through next_batch."""
    first = sampler.next_batch(batch_size)
    epoch = sampler.epoch
    batches = [first]
    while True:
        state = sampler.state_dict()
        batch = sampler.next_batch(batch_size)
        if sampler.epoch != epoch:
            sampler.load_state_dict(state)
            return batches
        batches.append(batch)


@pytest.mark.parametrize("batch_size", [8, 32, 100])
def test_no_batch_holds_two_captions_of_one_image(batch_size):
    lengths, image_ids = _corpus()
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=1)
    images = np.asarray(image_ids)
    for _ in range(3):
        for batch in _epoch_batches(sampler, batch_size):
            assert len(batch) == batch_size
            assert len(set(images[batch])) == batch_size


@pytest.mark.parametrize("batch_size", [8, 32, 100, 200])
def test_every_utterance_once_per_epoch_but_the_remainder(batch_size):
    lengths, image_ids = _corpus()
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=1)
    left_out = []
    for epoch in range(3):
        used = np.concatenate(sampler.plan(epoch, batch_size))
        assert len(used) == len(set(used.tolist()))
        unused = np.setdiff1d(np.arange(len(lengths)), used)
        assert len(unused) == len(lengths) % batch_size
        left_out.append(set(unused.tolist()))
    if batch_size == 32:  # the 8 left out are drawn anew each epoch, not always the longest
        assert left_out[0] != left_out[1]
        assert lengths[list(left_out[0])].max() < lengths.max()


def test_without_drop_last_the_remainder_becomes_extra_batches():
    lengths, image_ids = _corpus()
    images = np.asarray(image_ids)
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=2, drop_last=False)
    for epoch in range(4):
        batches = sampler.plan(epoch, 64)
        assert sum(len(b) < 64 for b in batches) >= 1  # 1000 % 64 = 40 left over
        for batch in batches:
            assert 2 <= len(batch) <= 64 and len(set(images[batch])) == len(batch)
        used = np.concatenate(batches)
        assert len(used) == len(set(used.tolist()))
        # only lone captions of one image, which every extra batch already holds, can be left out
        unused = np.setdiff1d(np.arange(len(lengths)), used)
        assert len(set(images[unused])) <= 1
        for i in unused:
            assert all(images[i] in images[b] for b in batches if len(b) < 64)


@pytest.mark.parametrize("drop_last", [True, False])
def test_an_image_with_more_captions_than_batches_is_set_aside(drop_last):
    # 6 captions of image a, one each of b and c, batches of 2: only two batches can avoid pairing a with a.
    lengths = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    image_ids = ["a"] * 6 + ["b", "c"]
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=0, drop_last=drop_last)
    images = np.asarray(image_ids)
    for epoch in range(5):
        batches = sampler.plan(epoch, 2)
        assert len(batches) == 2
        assert all(len(set(images[b])) == 2 for b in batches)
        assert sorted(images[np.concatenate(batches)].tolist()) == ["a", "a", "b", "c"]


def test_captions_may_share_a_batch_when_allowed():
    lengths, image_ids = _corpus()
    images = np.asarray(image_ids)
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=1, one_caption_per_image=False)
    batches = sampler.plan(0, 50)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert any(len(set(images[b])) < len(b) for b in batches)


def test_plan_is_a_pure_function_of_seed_epoch_and_batch_size():
    lengths, image_ids = _corpus()
    a = LengthBucketBatchSampler(lengths, image_ids, seed=7)
    b = LengthBucketBatchSampler(lengths, image_ids, seed=7)
    b.next_batch(32)  # walking one sampler must not change what plan() returns
    for epoch in range(2):
        assert all(np.array_equal(x, y) for x, y in zip(a.plan(epoch, 32), b.plan(epoch, 32), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a.plan(0, 32), a.plan(1, 32)))
    other = LengthBucketBatchSampler(lengths, image_ids, seed=8)
    assert not all(np.array_equal(x, y) for x, y in zip(a.plan(0, 32), other.plan(0, 32)))


def test_next_batch_walks_the_plans_epoch_after_epoch():
    lengths, image_ids = _corpus()
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=3)
    expected = sampler.plan(0, 64) + sampler.plan(1, 64) + sampler.plan(2, 64)[:3]
    walked = [sampler.next_batch(64) for _ in expected]
    assert all(np.array_equal(x, y) for x, y in zip(walked, expected, strict=True))
    assert sampler.epoch == 2


def test_state_dict_resume_gives_the_same_batches():
    lengths, image_ids = _corpus()
    sizes = [32] * 40 + [64] * 30  # crosses an epoch end (31 batches of 32) and a batch-size change
    run = LengthBucketBatchSampler(lengths, image_ids, seed=4)
    for size in sizes[:35]:
        run.next_batch(size)
    state = run.state_dict()
    expected = [run.next_batch(size) for size in sizes[35:]]

    resumed = LengthBucketBatchSampler(lengths, image_ids, seed=4)
    resumed.load_state_dict(state)
    again = [resumed.next_batch(size) for size in sizes[35:]]
    assert all(np.array_equal(x, y) for x, y in zip(again, expected, strict=True))

    with pytest.raises(ValueError, match="same seed"):
        LengthBucketBatchSampler(lengths, image_ids, seed=5).load_state_dict(state)


def _padding_ratio(batches, lengths):
    """Share of a padded batch that is padding, over all batches."""
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1.0 - sum(lengths[b].sum() for b in batches) / padded


def test_batches_are_length_homogeneous():
    lengths, image_ids = _corpus()
    bucketed = LengthBucketBatchSampler(lengths, image_ids, seed=5).plan(0, 32)
    order = np.random.default_rng(5).permutation(len(lengths))
    random = [order[i:i + 32] for i in range(0, len(order) - 31, 32)]
    bucketed_ratio, random_ratio = _padding_ratio(bucketed, lengths), _padding_ratio(random, lengths)
    assert random_ratio > 0.4
    assert bucketed_ratio < random_ratio / 2  # what is left is mostly the +-15% length jitter
    sharp = LengthBucketBatchSampler(lengths, image_ids, seed=5, jitter=0.0).plan(0, 32)
    assert _padding_ratio(sharp, lengths) < random_ratio / 4


def test_batch_size_change_starts_a_new_epoch():
    lengths, image_ids = _corpus()
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=6)
    for _ in range(5):
        assert len(sampler.next_batch(32)) == 32
    assert sampler.epoch == 0
    batch = sampler.next_batch(128)
    assert sampler.epoch == 1 and sampler.state_dict()["cursor"] == 1
    assert np.array_equal(batch, sampler.plan(1, 128)[0])
    assert len(sampler.next_batch(128)) == 128


def test_batch_size_larger_than_the_images_is_an_error():
    lengths, image_ids = _corpus()
    sampler = LengthBucketBatchSampler(lengths, image_ids, seed=0)
    with pytest.raises(ValueError, match="200 distinct images"):
        sampler.next_batch(201)
    assert sampler.state_dict()["epoch"] == 0  # a refused call changes nothing
    assert len(sampler.next_batch(200)) == 200


def test_local_slices_split_the_global_batch():
    batch = np.arange(12) * 3
    slices = [local_slice(batch, r, 4) for r in range(4)]
    assert np.array_equal(np.concatenate(slices), batch)
    assert all(len(s) == 3 for s in slices)
    with pytest.raises(ValueError, match="divisible"):
        local_slice(batch, 0, 5)
