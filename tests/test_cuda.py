"""The GPU paths, which the CPU suite cannot reach: extract-audio's batched features, embed-images (PIL
decoding and nvjpeg decoding, bf16 autocast, pinned copies), training (bf16 autocast, fused AdamW, CUDA RNG
state in checkpoints, pinned stream batches, --compile) and evaluate, each against the CPU result.

Skipped where torch sees no GPU. The GPU box runs them before any benchmark (`benchmarks/gpu_session.sh
smoke`). CLIPSPEECH_TEST_DEVICE=cpu runs them on the CPU, which checks the tests themselves."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.manifest import IMAGE_STORE, TEXT_STORE, read_manifest
from cache.reader import StoreReader
from trainer.checkpoint import load_checkpoint
from trainer.train import train

from runs import logged_losses, tiny_config

DEVICE = os.environ.get("CLIPSPEECH_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA GPU (CLIPSPEECH_TEST_DEVICE=cpu runs these "
                                                       "on the CPU)")
BF16 = DEVICE is not None and DEVICE.startswith("cuda")


def _config(cache, out, **changes):
    """The tiny trainer set-up of test_train.py, on DEVICE."""
    return tiny_config(cache, out, device=DEVICE, **changes)


def _stored(cache: Path, store: str) -> tuple[list[str], np.ndarray]:
    with StoreReader(cache / store) as reader:
        array, _, ids = reader.load_all()
    order = np.argsort(ids)
    return [ids[i] for i in order], array[order].astype(np.float32)


def _assert_near_own(got: np.ndarray, want: np.ndarray, cosine: float, nearest: bool = False) -> None:
    """Rows are unit vectors: each row of `got` has cosine >= `cosine` with its own row of `want` and, with
    `nearest`, no row of another value of `want` is nearer (bf16 moves an embedding, not to another item's;
    rows of one value, such as two captions of one text, count as its own)."""
    sims = got @ want.T
    assert np.diag(sims).min() >= cosine, f"cosine with its own row down to {np.diag(sims).min():.4f}"
    if nearest:
        own = (want @ want.T) > 1 - 1e-4
        assert own[np.arange(len(got)), sims.argmax(axis=1)].all()


# ----------------------------------------------------------------------------------------------------
# The stages that write the cache


def test_extract_audio_on_the_device_matches_the_cpu_workers(tiny_corpus, tiny_cache, tmp_path):
    from pipeline.extract import ExtractConfig, extract_audio
    summary = extract_audio(ExtractConfig(data=tiny_corpus, cache=tmp_path / "cache", workers=1, part_size=16,
                                          batch_device=DEVICE, batch_size=32, progress=False))
    assert summary.failed == 0 and summary.indexed == 120
    with StoreReader(tiny_cache / "audio") as cpu, StoreReader(tmp_path / "cache" / "audio") as dev:
        want, want_offsets, want_ids = cpu.load_all()
        got, got_offsets, got_ids = dev.load_all()
    assert got_ids == want_ids and np.array_equal(got_offsets, want_offsets)
    # float16 features of unit scale: GPU FFTs and matmuls round differently, nothing more
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("gpu_decode", [False, True])
def test_embed_images_on_the_device_matches_the_cpu_embeddings(gpu_decode, tiny_corpus, tiny_teacher,
                                                               tiny_cache, tmp_path):
    from pipeline.embed import EmbedConfig, embed_images
    from pipeline.extract import ExtractConfig, extract_audio
    cache = tmp_path / "cache"   # embed-images needs the audio store's records: the CPU workers' are fine
    extract_audio(ExtractConfig(data=tiny_corpus, cache=cache, workers=1, part_size=16, progress=False))
    summary = embed_images(EmbedConfig(data=tiny_corpus, cache=cache, model=tiny_teacher, device=DEVICE,
                                       workers=2, batch_size=16, gpu_decode=gpu_decode, progress=False))
    assert summary.images_failed == 0 and summary.images_embedded == 24
    clip = read_manifest(cache)["clip"]
    assert clip["precision"] == ("bf16-autocast" if BF16 else "fp32")
    assert clip["image_decode"] == ("torchvision" if gpu_decode else "pil-draft")
    for store in (IMAGE_STORE, TEXT_STORE):
        want_ids, want = _stored(tiny_cache, store)   # the CPU's, equal to open_clip's (test_embed.py)
        got_ids, got = _stored(cache, store)
        assert got_ids == want_ids
        if store == TEXT_STORE:   # the tiny corpus' captions: median cosine of two others 0.95, so strict
            _assert_near_own(got, want, 0.999, nearest=True)
        else:   # its images: median cosine of two -0.08 (the largest 0.995); nvjpeg and tensor resizing
            _assert_near_own(got, want, 0.97 if gpu_decode else 0.995)   # moved them to 0.987 on the CPU


@pytest.mark.skipif(not BF16, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("kind", ["image", "text"])
def test_a_graphed_tower_gives_the_eager_embeddings(kind, tiny_teacher):
    from pipeline.embed import load_teacher
    from pipeline.towers import image_tower, text_tower
    teacher = load_teacher(tiny_teacher, None, DEVICE)
    words = "a dog runs on the beach with a red ball in its mouth".split()
    size = teacher.preprocess(Image.new("RGB", (64, 64))).shape

    def make(**kw):
        if kind == "image":
            return image_tower(teacher.model, teacher.preprocess, DEVICE, batch_size=8, **kw)
        return text_tower(teacher.model, teacher.tokenizer, DEVICE, batch_size=8, **kw)

    def batch(n):
        if kind == "image":
            return torch.randn(n, *size, device=DEVICE)
        rng = np.random.default_rng(n)
        return teacher.tokenizer([" ".join(rng.permutation(words)[:5 + i]) for i in range(n)]).to(DEVICE)

    graphed, eager = make(), make(cuda_graph=False)
    assert graphed.graphed is not None and eager.graphed is None
    torch.manual_seed(0)
    with torch.inference_mode():
        # a full batch, a short one (rows 3.. of the graph's input still hold the first batch), a full one
        for n in (8, 3, 8):
            x = batch(n)
            got = graphed(x).cpu().numpy()   # before the next call overwrites it
            _assert_near_own(got, eager(x).cpu().numpy(), 0.9999, nearest=True)
        assert graphed(batch(9)).shape[0] == 9   # past capacity: eagerly


@pytest.mark.skipif(not BF16, reason="CUDA graphs need a CUDA device")
def test_a_tower_that_cannot_be_graphed_runs_eagerly_with_a_warning(caplog):
    from torchvision import transforms
    from pipeline.towers import image_tower

    class Syncing(torch.nn.Module):   # reads a value back to the host in its forward: not recordable
        def encode_image(self, x):
            return x.flatten(1)[:, :4] * float(x.abs().max() > -1)

    tower = image_tower(Syncing(), transforms.Compose([transforms.Resize(4), transforms.ToTensor()]), DEVICE, 4)
    assert tower.graphed is None
    assert "image tower could not be recorded as a CUDA graph" in caplog.text
    x = torch.randn(4, 3, 4, 4, device=DEVICE)
    with torch.inference_mode():
        np.testing.assert_allclose(tower(x).cpu().numpy(),
                                   torch.nn.functional.normalize(x.flatten(1)[:, :4], dim=-1).cpu().numpy(),
                                   rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Training and evaluation


@pytest.fixture(scope="module")
def learned(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_learned") / "run"
    train(_config(tiny_cache, out, steps=60, eval_every=30, save_every=30))
    return out


def test_training_on_the_device_learns(learned):
    losses = logged_losses(learned)
    chance = math.log(8)
    assert abs(losses[1] - chance) < 0.1 * chance
    late = np.mean([losses[s] for s in range(51, 61)])
    assert late < 0.6 * chance, f"mean loss of steps 51-60 {late:.2f} vs ln 8 = {chance:.2f}"
    state = load_checkpoint(learned / "last.pt")
    assert state["step"] == 60 and state["config"]["device"] == DEVICE
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_run_stopped_and_resumed_on_the_device_logs_the_same_losses(mode, tiny_cache, tiny_wds_cache,
                                                                      tmp_path):
    """Dropout and SpecAugment draw from the device's RNG: the checkpoint must restore it. GPU kernels may
    sum in another order from run to run, hence a tolerance far below what another dropout mask moves."""
    cache = tiny_cache if mode == "memory" else tiny_wds_cache
    common = dict(steps=9, dropout=0.1, spec_augment=True, data_mode=mode, workers=2,
                  batch_size=8 if mode == "memory" else 4)
    train(_config(cache, tmp_path / "whole", **common))
    train(_config(cache, tmp_path / "parts", stop_after=3, **common))
    train(_config(cache, tmp_path / "parts", resume=True, **common))
    whole, parts = logged_losses(tmp_path / "whole"), logged_losses(tmp_path / "parts")
    assert sorted(whole) == sorted(parts) == list(range(1, 10))
    np.testing.assert_allclose([parts[s] for s in whole], [whole[s] for s in whole], rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_on_the_device_logs_the_losses_of_eager(mode, tiny_cache, tmp_path):
    """reduce-overhead: CUDA graphs replayed step after step, whose outputs live in reused memory."""
    common = dict(steps=3, dropout=0.0, spec_augment=False, max_frames=128)
    train(_config(tiny_cache, tmp_path / "compiled", compile=True, compile_mode=mode, **common))
    train(_config(tiny_cache, tmp_path / "eager", **common))
    compiled, eager = logged_losses(tmp_path / "compiled"), logged_losses(tmp_path / "eager")
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    np.testing.assert_allclose([compiled[s] for s in eager], [eager[s] for s in eager],
                               rtol=2e-2 if BF16 else 1e-5)


def test_evaluate_on_the_device_matches_the_cpu(learned, tiny_cache):
    from trainer.evaluate import EvalConfig, evaluate
    results, arrays, _ = evaluate(EvalConfig(cache=tiny_cache, checkpoint=learned / "best.pt", device=DEVICE))
    cpu_results, cpu_arrays, _ = evaluate(EvalConfig(cache=tiny_cache, checkpoint=learned / "best.pt"))
    assert results["counts"] == cpu_results["counts"] and list(arrays["audio_ids"]) == list(cpu_arrays["audio_ids"])
    _assert_near_own(arrays["audio"], cpu_arrays["audio"], 0.99)
    for pair, recalls in cpu_results["retrieval"].items():   # 30 utterances: a rank swap moves R@10 by 3.3
        assert abs(results["retrieval"][pair]["R@10"] - recalls["R@10"]) <= 7, pair
