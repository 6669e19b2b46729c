"""The images-as-classes loss against open_clip's ClipLoss and hand computations; chance level,
temperature clamp, float32 under autocast."""
import math

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss
from torch.nn import functional as F

from trainer.loss import ImagesAsClassesLoss


def _embeddings(batch, dim=512, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) for _ in range(n)]


def _with_scale(loss_fn, log_scale):
    with torch.no_grad():
        loss_fn.logit_scale.fill_(log_scale)
    return loss_fn


@pytest.mark.parametrize("batch", [2, 7, 64])
@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(37.0)])
def test_symmetric_loss_equals_open_clip(batch, log_scale):
    audio, image, _ = _embeddings(batch, seed=batch)
    ours = _with_scale(ImagesAsClassesLoss(), log_scale)(audio, image)
    a, i = F.normalize(audio, dim=-1), F.normalize(image, dim=-1)
    scale = torch.tensor(log_scale).exp()
    # open_clip's (image, text) pair is our (image, audio): logits_per_text is audio -> image
    reference = ClipLoss()(i, a, scale)
    logits_per_image, logits_per_text = ClipLoss().get_logits(i, a, scale)
    labels = torch.arange(batch)
    torch.testing.assert_close(ours["loss"], reference, atol=1e-6, rtol=1e-6)
    tight = {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(ours["audio_image"], F.cross_entropy(logits_per_text, labels), **tight)
    torch.testing.assert_close(ours["image_audio"], F.cross_entropy(logits_per_image, labels), **tight)


def test_one_way_loss_is_audio_to_image_only():
    audio, image, _ = _embeddings(16)
    out = ImagesAsClassesLoss(symmetric=False)(audio, image)
    assert set(out) == {"loss", "audio_image"}
    symmetric = ImagesAsClassesLoss()(audio, image)
    torch.testing.assert_close(out["loss"], symmetric["audio_image"])
    assert not torch.allclose(out["loss"], symmetric["loss"])


def test_random_embeddings_start_near_chance_level():
    batch = 64
    audio, image, _ = _embeddings(batch)
    # t = 1: cosines of random 512-d vectors are ~0, so every class is equally likely
    flat = _with_scale(ImagesAsClassesLoss(), 0.0)(audio, image)["loss"]
    assert abs(flat.item() - math.log(batch)) < 0.02
    # initial t = 1/0.07: logits have variance ~ t^2 / 512 = 0.4, the loss ~ ln B + 0.2
    first = ImagesAsClassesLoss()(audio, image)["loss"]
    assert math.log(batch) < first.item() < math.log(batch) + 0.4


def test_temperature_is_initialised_and_clamped():
    loss_fn = ImagesAsClassesLoss()
    assert loss_fn.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    _with_scale(loss_fn, 10.0).clamp_()
    assert loss_fn.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-6)
    _with_scale(loss_fn, -3.0).clamp_()
    assert loss_fn.logit_scale.item() == 0.0
    # the temperature learns: a well-aligned batch pushes it up
    audio, _, _ = _embeddings(8)
    loss_fn = ImagesAsClassesLoss()
    loss_fn(audio, audio + 0.01)["loss"].backward()
    assert loss_fn.logit_scale.grad < 0


def _hand_ce(rows, cols, scale):
    """Mean over i of -log softmax_j(scale * cos(rows_i, cols_j))[i], in float64 loops."""
    rows = [r / np.linalg.norm(r) for r in rows.double().numpy()]
    cols = [c / np.linalg.norm(c) for c in cols.double().numpy()]
    total = 0.0
    for i, r in enumerate(rows):
        logits = [scale * float(np.dot(r, c)) for c in cols]
        total += math.log(sum(math.exp(z) for z in logits)) - logits[i]
    return total / len(rows)


@pytest.mark.parametrize("symmetric", [True, False])
def test_text_targets_equal_hand_computation(symmetric):
    audio, image, text = _embeddings(9, dim=32, seed=3)
    scale = 1 / 0.07
    a_t, t_a = _hand_ce(audio, text, scale), _hand_ce(text, audio, scale)
    a_i, i_a = _hand_ce(audio, image, scale), _hand_ce(image, audio, scale)
    text_loss = (a_t + t_a) / 2 if symmetric else a_t
    image_loss = (a_i + i_a) / 2 if symmetric else a_i

    out = ImagesAsClassesLoss(targets="text", symmetric=symmetric)(audio, image, text)
    assert out["loss"].item() == pytest.approx(text_loss, abs=1e-5)
    assert out["audio_text"].item() == pytest.approx(a_t, abs=1e-5)

    both = ImagesAsClassesLoss(targets="image+text", symmetric=symmetric)(audio, image, text)
    assert both["loss"].item() == pytest.approx((text_loss + image_loss) / 2, abs=1e-5)
    assert both["audio_image"].item() == pytest.approx(a_i, abs=1e-5)
    if symmetric:
        assert both["text_audio"].item() == pytest.approx(t_a, abs=1e-5)

    with pytest.raises(ValueError, match="text="):
        ImagesAsClassesLoss(targets="text")(audio, image)


def test_float32_result_under_bf16_autocast():
    audio, image, _ = [x.bfloat16() for x in _embeddings(32)]
    audio.requires_grad_(True)
    loss_fn = ImagesAsClassesLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(audio, image)
    assert out["loss"].dtype == torch.float32
    reference = ImagesAsClassesLoss()(audio.detach().float(), image.float())
    # logits from a bf16 matmul would move the loss by ~4e-4 here
    torch.testing.assert_close(out["loss"], reference["loss"], atol=1e-6, rtol=1e-6)
    out["loss"].backward()
    assert audio.grad.dtype == torch.bfloat16 and torch.isfinite(audio.grad.float()).all()
