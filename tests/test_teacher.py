"""Tests of the demo's small CLIP teacher: fitting, the local-dir round trip, R@K, atomic saving."""
import itertools
import json
import math
from dataclasses import replace

import numpy as np
import open_clip
import pytest
import torch
from open_clip.loss import ClipLoss
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw

from pipeline.demo import teacher
from pipeline.demo.teacher import (CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, TeacherConfig, fit_teacher,
                                   retrieval_recall, save_teacher, train_teacher)
from pipeline.embed import load_teacher as load_for_embedding


def load_teacher(folder):
    """A saved teacher as embed-images loads it (--model local-dir:FOLDER): (model, preprocess, tokenizer)."""
    model, preprocess, tokenizer, _ = load_for_embedding(f"local-dir:{folder}", None)
    return model, preprocess, tokenizer


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
# Small and fast: 32 px (not the default 64, so the saved size is visibly the configured one).
CFG = TeacherConfig(steps=40, batch_size=32, lr=2e-3, warmup=3, image_size=32, max_shift=2, seed=3, threads=1)


def draw_scene(path, colour, shape, background, size=72):
    """A shape of one colour on a flat background, drawn slightly off-centre so shifts matter."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 4, size * 4 // 5, size * 17 // 20)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        corners = [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])]
        draw.polygon(corners, fill=COLOURS[colour])
    image.save(path)


def captions_of(colour, shape, background):
    return [f"a {colour} {shape} on {background}", f"the {shape} is {colour} on a {background} background",
            f"{colour} {shape} with a {background} background", f"a picture of a {colour} {shape}",
            f"a {shape} coloured {colour} in front of {background}"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """36 train scenes (captions + attribute texts) and 12 test scenes (captions), all combinations drawn."""
    folder = tmp_path_factory.mktemp("scenes")
    train, test = [], []
    combos = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))  # 36
    rng = np.random.default_rng(0)
    for n, (colour, shape, background) in enumerate(combos + [combos[i] for i in rng.permutation(36)[:12]]):
        path = str(folder / f"scene{n:03d}.png")
        draw_scene(path, colour, shape, background)
        captions = captions_of(colour, shape, background)
        if n < len(combos):
            train.append((path, captions + [f"a {colour} {shape}", f"this is a photo of a {colour}",
                                            f"this is a photo of a {shape}", f"a {background} background"]))
        else:
            test.append((path, captions))
    return train, test


@pytest.fixture(scope="module")
def fitted(corpus, tmp_path_factory):
    train, test = corpus
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    metrics = fit_teacher(train, test, out, CFG)
    return out, metrics


SHORT = replace(CFG, steps=4, warmup=0)


@pytest.fixture(scope="module")
def short(corpus):
    """A few steps on 8 scenes, in memory: (model, per-step losses); enough to move weights and BN stats."""
    return train_teacher(corpus[0][:8], SHORT)


def test_saved_folder_has_open_clip_layout_and_metrics(fitted):
    out, metrics = fitted
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_cfg"]["embed_dim"] == 128
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert config["model_cfg"]["text_cfg"]["context_length"] == 32
    assert config["preprocess_cfg"]["size"] == 32
    assert json.loads((out / METRICS_FILE).read_text()) == metrics
    assert metrics["train_images"] == 36 and metrics["test_images"] == 12 and metrics["steps"] == CFG.steps
    for direction in ("image_to_text", "text_to_image"):
        r = metrics[direction]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100


def test_local_dir_reload_matches_the_in_memory_model(short, corpus, tmp_path):
    """A trained model saved with save_teacher loads back through open_clip's own local-dir path with the
    same outputs, tokenizer and preprocessing."""
    model, _ = short
    out = save_teacher(model, tmp_path / "teacher", {})
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    loaded.eval()

    test = corpus[1]
    captions = [c for _, texts in test for c in texts]
    tokens = tokenizer(captions)
    assert tokens.shape == (len(captions), 32)
    assert torch.equal(tokens, open_clip.get_tokenizer(teacher.DEFAULT_MODEL)(captions))
    images = torch.stack([preprocess(Image.open(path)) for path, _ in test])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-6, rtol=0)
        assert loaded.logit_scale.item() == pytest.approx(model.logit_scale.item(), abs=1e-6)

    # embed-images' loader (--model local-dir:) gives the same model
    model2, _, tokenizer2 = load_teacher(out)
    assert not model2.training
    assert torch.equal(tokenizer2(captions), tokens)
    with torch.no_grad():
        torch.testing.assert_close(model2.encode_image(images), model.encode_image(images), atol=1e-6, rtol=0)


def test_fit_is_deterministic_given_the_seed(short, corpus):
    model, losses = short
    again, losses_again = train_teacher(corpus[0][:8], SHORT)
    assert losses == losses_again
    state, state_again = model.state_dict(), again.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    other, _ = train_teacher(corpus[0][:8], replace(SHORT, seed=SHORT.seed + 1))
    assert not torch.equal(other.visual.conv1.weight, model.visual.conv1.weight)


@pytest.mark.parametrize("name", sorted(teacher.MODEL_CFGS))
def test_round_trip_of_an_untrained_model(tmp_path, name):
    """save_teacher alone (no training, no determinism involved): reload gives identical outputs."""
    model = teacher.build_model(TeacherConfig(model=name, image_size=32, seed=5)).eval()
    out = save_teacher(model, tmp_path / "t", {"note": "untrained"}, name)
    assert json.loads((out / CONFIG_FILE).read_text())["model_cfg"]["vision_cfg"]["image_size"] == 32
    loaded, preprocess, tokenizer = load_teacher(out)
    images = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(["a red circle on blue", "a green square", "grey"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=1e-6, rtol=0)


def test_preprocess_from_folder_resizes_to_the_configured_size(fitted):
    _, preprocess, _ = load_teacher(fitted[0])
    for size in [(100, 70), (20, 33)]:
        assert preprocess(Image.new("RGB", size, (10, 200, 30))).shape == (3, 32, 32)


def test_training_lowers_the_clip_loss(fitted, corpus):
    """open_clip's ClipLoss on a fixed batch (all train scenes unshifted, each with its first caption),
    before training (same seed, so the same initial weights) and after (the saved teacher)."""
    model, _, _ = load_teacher(fitted[0])
    train = corpus[0]
    initial = teacher.build_model(CFG).eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    images = torch.stack([preprocess(Image.open(path).convert("RGB")) for path, _ in train])
    tokens = open_clip.get_tokenizer(teacher.DEFAULT_MODEL)([texts[0] for _, texts in train])
    with torch.no_grad():
        before, after = (ClipLoss()(m.encode_image(images, normalize=True),
                                    m.encode_text(tokens, normalize=True), m.logit_scale.exp()).item()
                         for m in (initial, model))
    assert before == pytest.approx(math.log(len(train)), abs=0.5)  # random init: near chance
    assert after < 0.4 * before


def brute_force_recall(scores, text_image, k):
    """Loops over queries: image->text hit if any of the image's texts is in the top k, text->image hit if
    the text's own image is."""
    n_images, n_texts = scores.shape
    i2t = t2i = 0
    for i in range(n_images):
        ranked = sorted(range(n_texts), key=lambda t: -scores[i, t])[:k]
        i2t += any(text_image[t] == i for t in ranked)
    for t in range(n_texts):
        ranked = sorted(range(n_images), key=lambda i: -scores[i, t])[:k]
        t2i += text_image[t] in ranked
    return 100.0 * i2t / n_images, 100.0 * t2i / n_texts


def test_recall_by_hand():
    # 3 images; image 0 has texts 0, 1; image 1 has texts 2, 3, 4; image 2 has text 5. Scores = dot products
    # of one-hot image rows with hand-set text columns.
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.0, 0.0, 0.2],
                           [0.1, 0.2, 0.3, 0.7, 0.1, 0.6],
                           [0.0, 0.3, 0.5, 0.2, 0.4, 0.1]])
    text_image = torch.tensor([0, 0, 1, 1, 1, 2])
    recall = retrieval_recall(torch.eye(3), scores.T.contiguous(), text_image, ks=(1, 2))
    # image->text top1: img0 -> t0 (hit), img1 -> t3 (hit), img2 -> t2 (miss); top2: img2 -> t2, t4 (miss)
    assert recall["image_to_text"] == pytest.approx({"R@1": 200 / 3, "R@2": 200 / 3})
    # text->image top1: t0->0 hit, t1->2 miss, t2->0 miss, t3->1 hit, t4->2 miss, t5->1 miss
    # top2: t1 -> 2, 1 miss; t2 -> 0, 2 miss; t4 -> 2, 1 hit; t5 -> 1, 0 miss
    assert recall["text_to_image"] == pytest.approx({"R@1": 200 / 6, "R@2": 300 / 6})


def test_recall_agrees_with_brute_force():
    gen = torch.Generator().manual_seed(0)
    image_emb, text_emb = torch.randn(9, 4, generator=gen), torch.randn(23, 4, generator=gen)
    text_image = torch.cat([torch.arange(9), torch.randint(0, 9, (14,), generator=gen)])
    scores = (image_emb @ text_emb.T).numpy()
    for k in (1, 3, 5, 10):
        got = retrieval_recall(image_emb, text_emb, text_image, ks=(k,))
        i2t, t2i = brute_force_recall(scores, text_image.tolist(), k)
        assert got["image_to_text"][f"R@{k}"] == pytest.approx(i2t)
        assert got["text_to_image"][f"R@{k}"] == pytest.approx(t2i)


def test_missing_or_broken_image_fails_naming_the_file_and_leaves_no_folder(corpus, tmp_path):
    train, test = corpus
    missing = str(tmp_path / "nowhere" / "gone.png")
    out = tmp_path / "teacher"
    quick = replace(CFG, steps=2, warmup=0)
    for pairs in ([train[:5] + [(missing, ["red"])], test], [train[:5], test + [(missing, ["red"])]]):
        with pytest.raises(FileNotFoundError, match="gone.png"):
            fit_teacher(*pairs, out, quick)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match="broken.png"):  # a test image: fails after training
        fit_teacher(train[:5], test + [(str(broken), ["red"])], out, quick)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png"]  # no out_dir, no temporary folder


def test_failed_save_keeps_the_previous_teacher(tmp_path, monkeypatch):
    model = teacher.build_model(TeacherConfig(image_size=32)).eval()
    out = save_teacher(model, tmp_path / "teacher", {"run": 1})

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(teacher, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_teacher(model, out, {"run": 2})
    assert json.loads((out / METRICS_FILE).read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher"]


def test_refuses_to_replace_a_folder_that_is_not_a_teacher(corpus, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a teacher folder"):
        fit_teacher(*corpus, tmp_path / "data", CFG)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad", [
    dict(model="ViT-B-32"), dict(image_size=48), dict(model="clipspeech-demo-vit", image_size=36),
    dict(shared_text_share=1.5), dict(steps=0), dict(batch_size=1), dict(max_shift=32), dict(warmup=300),
    dict(lr=0.0), dict(weight_decay=-0.1), dict(threads=0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TeacherConfig(**bad)
