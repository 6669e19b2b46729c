"""The embed-images stage against open_clip itself: cached image, caption and keyword-prompt embeddings equal
encode_image/encode_text of open_clip's own preprocessing and tokenizer; bad images, the decode-on-device
path, refusal to mix teachers, resume and shards."""
import hashlib
import json
import logging
import threading
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from cache.manifest import IMAGE_STORE, KEYWORD_STORE, TEXT_STORE, CacheMismatchError, read_failures, read_manifest
from cache.reader import StoreReader
from cache.store import PartWriter, completed_parts
from cli import main
from corpora import write_tiny_flickr
import pipeline.images
from pipeline.embed import EmbedConfig, embed_images
from pipeline.images import ImageFiles, _decoded_ahead, decode_on_device, open_rgb

FP16_ATOL = 1e-3    # unit vectors stored as float16: elements <= 1 round by at most 2**-11
# Flickr-like shapes, smaller: landscape, portrait, odd sizes; draft mode decodes them at 1/2 or 1/4 for 64 px
SHAPES = [(200, 150), (150, 200), (257, 193), (200, 150), (320, 240), (200, 150)]


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A textured RGB picture: smooth random colour regions plus fine waves (JPEG has real work to do)."""
    coarse = (rng.random((max(2, height // 16), max(2, width // 16), 3)) * 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).astype(np.int16)
    yy, xx = np.mgrid[0:height, 0:width]
    pixels += (40 * np.sin(xx / 3.0 + rng.random() * 6) * np.cos(yy / 5.0)).astype(np.int16)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_corpus(root, shapes=SHAPES, seed=0):
    """write_tiny_flickr with one textured JPEG of each shape instead of its plain squares."""
    write_tiny_flickr(root, images=len(shapes), seed=seed)
    rng = np.random.default_rng(seed)
    paths = sorted((root / "Flicker8k_Dataset").glob("*.jpg"))
    for path, (w, h) in zip(paths, shapes):
        photo(rng, w, h).save(path, quality=90)
    return root


def demo_teacher(folder, seed=0) -> str:
    """The demo's teacher code (64 px, squash resize), saved as its "local-dir:" folder, unfitted. Its ViT
    tower: a random ResNet tower (the demo's default) maps every image to nearly the same embedding, so
    equality checks could not tell images apart."""
    from pipeline.demo.teacher import TeacherConfig, build_model, save_teacher
    vit = "clipspeech-demo-vit"
    save_teacher(build_model(TeacherConfig(model=vit, seed=seed)), folder, {}, vit)
    return f"local-dir:{folder}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: a second torch thread only adds waiting (about 5x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return demo_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


def run(corpus, cache, model, **options):
    options = {"workers": 0, "progress": False, **options}
    return embed_images(EmbedConfig(data=corpus, cache=cache, model=model, **options))


def stored(cache, store):
    with StoreReader(cache / store) as reader:
        array, _, ids = reader.load_all()
        return dict(zip(ids, array)), reader


def corpus_items(corpus):
    """({image id: path}, {caption id: text}) read straight from the Flickr8k files."""
    images = {p.stem: p for p in (corpus / "Flicker8k_Dataset").iterdir()}
    captions = {}
    for line in (corpus / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        key, text = line.split("\t")
        image, n = key.split("#")
        captions[f"{image[:-4]}#{n}"] = text
    return images, captions


def reference(model_name, paths=(), texts=(), preprocess=None, seed=None):
    """open_clip's own embeddings, normalised: encode_image(preprocess(PIL image)), encode_text(tokenizer).
    `paths`: image files or PIL images."""
    if seed is not None:
        torch.manual_seed(seed)
    model, _, own_preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()
    preprocess = preprocess or own_preprocess
    with torch.no_grad():
        pictures = [p if isinstance(p, Image.Image) else Image.open(p) for p in paths]
        images = model.encode_image(torch.stack([preprocess(p) for p in pictures])) if paths else None
        text = model.encode_text(open_clip.get_tokenizer(model_name)(list(texts))) if texts else None
    norm = lambda x: None if x is None else torch.nn.functional.normalize(x, dim=-1).numpy()  # noqa: E731
    return norm(images), norm(text)


def assert_near_own(got, want, fraction):
    """Each row of `got` is closer to its own row of `want` than `fraction` of the distance from that row to
    the nearest other row: close, in units of how far apart the images' embeddings are."""
    off = np.linalg.norm(got.astype(np.float64) - want, axis=-1)
    gaps = np.linalg.norm(want[:, None] - want[None], axis=-1) + np.eye(len(want)) * 1e9
    assert (off < fraction * gaps.min(axis=1)).all(), (off, gaps.min(axis=1))
    return off


# ----------------------------------------------------------------------------------------------------
# Equality with open_clip


@pytest.mark.parametrize("fmt, workers, sizes", [("hdf5", 0, {}), ("wds", 2, {"batch_size": 4, "part_size": 6})])
def test_demo_teacher_embeddings_equal_open_clip(corpus, teacher, tmp_path, fmt, workers, sizes):
    # wds: captions tokenized in 2 processes, parts of 6 in batches of 4 and 2 (a part ends mid-batch-run)
    cache = tmp_path / "cache"
    summary = run(corpus, cache, teacher, fmt=fmt, workers=workers, draft=False, **sizes)
    images, captions = corpus_items(corpus)
    words = (corpus / "keywords.txt").read_text().split()

    cached, reader = stored(cache, IMAGE_STORE)
    assert sorted(cached) == sorted(images)   # each image once, though it has 5 captions
    assert reader.dtype == np.float16 and reader.fmt == fmt
    ids = sorted(images)
    want_images, want_texts = reference(teacher, [images[i] for i in ids],
                                        [captions[c] for c in sorted(captions)] + [f"this is a photo of a {w}"
                                                                                   for w in words])
    np.testing.assert_allclose(np.stack([cached[i] for i in ids]), want_images, atol=FP16_ATOL)
    gaps = np.linalg.norm(want_images[:, None] - want_images[None], axis=-1)
    assert gaps[~np.eye(len(ids), dtype=bool)].min() > 20 * FP16_ATOL   # the tolerance tells images apart

    texts, _ = stored(cache, TEXT_STORE)
    assert sorted(texts) == sorted(captions)
    np.testing.assert_allclose(np.stack([texts[c] for c in sorted(captions)]), want_texts[:len(captions)],
                               atol=FP16_ATOL)
    keywords, reader = stored(cache, KEYWORD_STORE)
    assert list(keywords) == words and reader.meta(words[0])["prompt"] == f"this is a photo of a {words[0]}"
    np.testing.assert_allclose(np.stack([keywords[w] for w in words]), want_texts[len(captions):],
                               atol=FP16_ATOL)

    clip = read_manifest(cache)["clip"]
    weights = teacher.removeprefix("local-dir:") + "/open_clip_model.safetensors"
    assert clip["weights_sha256"] == hashlib.sha256(open(weights, "rb").read()).hexdigest()
    assert clip["open_clip"] == open_clip.__version__ and clip["embed_dim"] == 128
    assert clip["preprocess"]["resize_mode"] == "squash" and clip["preprocess"]["size"] == [64, 64]
    assert (clip["precision"], clip["dtype"], clip["image_decode"]) == ("fp32", "float16", "pil")
    assert clip["format"] == fmt
    assert reader.attrs["clip"] == clip
    assert summary.images_embedded == len(images) and all(summary.indexed.values())
    assert summary.captions_embedded == len(captions) and f"captions: {len(captions)} embedded now" in \
        "\n".join(summary.lines())
    assert read_failures(cache) == []


def test_random_standard_config_float32_custom_prompt(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus", shapes=[(300, 225), (225, 300), (240, 240)])
    (tmp_path / "words.txt").write_text("dog\nred ball\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.embed"):
        run(corpus, tmp_path / "cache", "ViT-S-32-alt", dtype="float32", keywords=tmp_path / "words.txt",
            prompt="a photo of a {}.")
    assert "RANDOM weights" in caplog.text
    clip = read_manifest(tmp_path / "cache")["clip"]
    assert (clip["model"], clip["pretrained"], clip["random_init_seed"]) == ("ViT-S-32-alt", None, 0)
    assert clip["preprocess"]["resize_mode"] == "shortest" and clip["dtype"] == "float32"

    images, captions = corpus_items(corpus)
    ids = sorted(images)
    texts = [captions[ids[0] + "#0"], "a photo of a dog.", "a photo of a red ball."]
    want_images, want_texts = reference("ViT-S-32-alt", [images[i] for i in ids], texts, seed=0)
    cached, reader = stored(tmp_path / "cache", IMAGE_STORE)
    assert reader.dtype == np.float32
    np.testing.assert_allclose(np.stack([cached[i] for i in ids]), want_images, atol=1e-5)
    texts, _ = stored(tmp_path / "cache", TEXT_STORE)
    np.testing.assert_allclose(texts[ids[0] + "#0"], want_texts[0], atol=1e-5)
    keywords, _ = stored(tmp_path / "cache", KEYWORD_STORE)
    assert list(keywords) == ["dog", "red ball"]
    np.testing.assert_allclose(np.stack(list(keywords.values())), want_texts[1:], atol=1e-5)


def test_an_unknown_model_name_is_refused_with_the_close_names(tmp_path, caplog):
    corpus = write_corpus(tmp_path / "corpus", shapes=[(300, 225)])
    with caplog.at_level(logging.WARNING, logger="pipeline.embed"), \
            pytest.raises(ValueError, match=r"'ViT-B-33' is not an open_clip model name; did you mean ViT-B-32"):
        run(corpus, tmp_path / "cache", "ViT-B-33")
    assert "RANDOM weights" not in caplog.text and not (tmp_path / "cache").exists()


def test_draft_mode_decodes_small_and_stays_close(corpus, teacher, tmp_path):
    images, _ = corpus_items(corpus)
    path = next(p for p in images.values() if Image.open(p).size == (200, 150))
    assert open_rgb(path, 64).size == (100, 75)       # decoded at 1/2 scale: both sides stay >= 64
    assert open_rgb(path, 120).size == (200, 150)     # 1/2 would go below the target: full size

    run(corpus, tmp_path / "cache", teacher)   # draft is the default
    cached, _ = stored(tmp_path / "cache", IMAGE_STORE)
    ids = sorted(images)
    want, _ = reference(teacher, [images[i] for i in ids])
    # Not equal (the DCT-scaled decode differs from a full decode + resize), but each image stays far
    # closer to its own full-decode embedding than any two images are to each other.
    off = assert_near_own(np.stack([cached[i] for i in ids]), want, 0.2)
    assert off.max() > FP16_ATOL


# ----------------------------------------------------------------------------------------------------
# Bad input, decoding on the device


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """Six images: truncated JPEG, text file, missing file, CMYK JPEG, greyscale JPEG, PNG with alpha."""
    root = write_corpus(tmp_path_factory.mktemp("bad"), shapes=SHAPES[:6], seed=3)
    paths = sorted((root / "Flicker8k_Dataset").glob("*.jpg"))
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:len(data) // 2])
    paths[1].write_text("not an image\n")
    paths[2].unlink()
    Image.open(paths[3]).convert("CMYK").save(paths[3], "JPEG", quality=95)
    Image.open(paths[4]).convert("L").save(paths[4], "JPEG", quality=95)
    rgba = np.asarray(Image.open(paths[5]).convert("RGBA")).copy()
    rgba[:, : rgba.shape[1] // 2, 3] = 0          # left half fully transparent...
    rgba[:, : rgba.shape[1] // 2, :3] = 0         # ...over black that a viewer would not show
    Image.fromarray(rgba).save(paths[5], "PNG")   # a PNG under a .jpg name: PIL goes by the content
    return root, paths


@pytest.mark.parametrize("gpu_decode", [False, True])
def test_bad_images_are_recorded_or_converted(bad_corpus, teacher, tmp_path, gpu_decode):
    root, paths = bad_corpus
    summary = run(root, tmp_path / "cache", teacher, draft=False, gpu_decode=gpu_decode, part_size=4)
    failures = {f["id"]: f for f in read_failures(tmp_path / "cache")}
    assert sorted(failures) == [p.stem for p in paths[:3]] and summary.images_failed == 3
    assert all(failures[p.stem]["stage"] == "images" and failures[p.stem]["path"] == str(p)
               for p in paths[:3])
    assert failures[paths[1].stem]["reason"].startswith("not an image")
    assert failures[paths[2].stem]["reason"] == "missing file"
    assert "truncated" in failures[paths[0].stem]["reason"]

    cached, _ = stored(tmp_path / "cache", IMAGE_STORE)
    assert sorted(cached) == [p.stem for p in paths[3:]]
    rgba = np.asarray(Image.open(paths[5])).astype(np.float64)
    over_white = rgba[..., :3] * rgba[..., 3:] / 255 + 255 * (1 - rgba[..., 3:] / 255)
    pictures = [Image.open(paths[3]), Image.open(paths[4]),
                Image.fromarray(over_white.round().astype(np.uint8))]
    want, _ = reference(teacher, pictures)
    got = np.stack([cached[p.stem] for p in paths[3:]])
    if gpu_decode:   # torchvision's resize on tensors, not PIL's
        assert_near_own(got, want, 0.2)
    else:
        np.testing.assert_allclose(got, want, atol=FP16_ATOL)
    black, _ = reference(teacher, [Image.open(paths[5]).convert("RGB")])   # what convert("RGB") would show
    assert np.linalg.norm(got[2] - black[0]) > 5 * np.linalg.norm(got[2] - want[2])


def test_image_failures_name_the_files_where_the_corpus_lies_now(teacher, tmp_path):
    root = write_corpus(tmp_path / "corpus", shapes=SHAPES[:2], seed=3)
    bad = sorted((root / "Flicker8k_Dataset").glob("*.jpg"))[0]
    bad.write_text("not an image\n")
    run(root, tmp_path / "cache", teacher)
    moved = root.rename(tmp_path / "moved")
    run(moved, tmp_path / "cache", teacher)
    assert [f["path"] for f in read_failures(tmp_path / "cache")] == [str(moved / "Flicker8k_Dataset" / bad.name)]


def test_fixed_images_are_embedded_by_retry_failed(teacher, tmp_path):
    root = write_corpus(tmp_path / "corpus", shapes=SHAPES[:6], seed=3)
    paths = sorted((root / "Flicker8k_Dataset").glob("*.jpg"))
    kept = paths[4].read_bytes()
    paths[4].write_text("not an image\n")
    cache = tmp_path / "cache"
    run(root, cache, teacher, draft=False, part_size=4)
    assert [f["id"] for f in read_failures(cache)] == [paths[4].stem]
    paths[4].write_bytes(kept)
    summary = run(root, cache, teacher, draft=False, part_size=4)
    assert summary.images_embedded == 0 and len(read_failures(cache)) == 1   # resumed: nothing retried
    summary = run(root, cache, teacher, draft=False, part_size=4, retry_failed=True)
    assert summary.parts_retried == 1 and summary.images_embedded == 2 and read_failures(cache) == []
    assert "1 embedded again for their failures" in summary.lines()[0]
    cached, _ = stored(cache, IMAGE_STORE)
    want, _ = reference(teacher, [Image.open(p) for p in paths])
    np.testing.assert_allclose(np.stack([cached[p.stem] for p in paths]), want, atol=FP16_ATOL)


@pytest.mark.parametrize("raw", [False, True])
def test_an_empty_file_or_a_folder_is_named_as_such(tmp_path, raw):
    from pipeline.images import ImageFiles
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    files = ImageFiles([str(tmp_path / "empty.jpg"), str(tmp_path / "folder.jpg"), str(tmp_path / "gone.jpg")],
                       lambda img: img, raw=raw)
    assert [files[i][1] for i in range(3)] == ["empty file (0 bytes)", "a folder, not a file", "missing file"]


def test_decode_on_device_matches_pil_preprocessing(bad_corpus, corpus, tmp_path):
    _, bad = bad_corpus
    images, _ = corpus_items(corpus)
    broken = tmp_path / "broken.jpg"   # a sound header with a broken Huffman table: only decoding tells
    data = bytearray(next(iter(images.values())).read_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 25] = b"\xff" * 20
    broken.write_bytes(bytes(data))
    paths = [str(p) for p in sorted(images.values())] + [str(broken)] + [str(p) for p in bad[3:]]
    shortest = image_transform_v2(PreprocessCfg(size=96), is_train=False)   # resize + centre crop
    squash = image_transform_v2(PreprocessCfg(size=64, resize_mode="squash"), is_train=False)
    for preprocess in (shortest, squash):
        files = ImageFiles(paths, preprocess, raw=True)
        packed, reasons = files.collate([files[i] for i in range(len(paths))])
        items = packed.unpack()   # one buffer from a worker, views of it here
        assert sum(x.dim() == 1 for x in items) == len(images) + 2   # JPEG bytes; CMYK and PNG decoded by PIL
        good = [p for p, reason in zip(paths, reasons) if not reason]
        assert len(items) == len(good) and packed.data.numel() == sum(x.numel() for x in items if x.dim() == 1)
        for x, path in zip(items, good):
            assert bytes(x.numpy()) == Path(path).read_bytes() if x.dim() == 1 else x.shape[0] == 3
        x = decode_on_device(items, reasons, preprocess, "cpu")
        assert [bool(r) for r in reasons] == [p == str(broken) for p in paths]
        want = torch.stack([preprocess(open_rgb(p)) for p in paths if p != str(broken)])
        assert x.shape == want.shape
        diff = (x - want).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.1   # normalised units; two images differ by ~1

        # the PIL path sends uint8 from its workers, and the same float arithmetic as preprocess follows
        files = ImageFiles([p for p in paths if p != str(broken)], preprocess)
        pixels, reasons = files.collate([files[i] for i in range(len(files))])
        assert pixels.dtype == torch.uint8 and not any(reasons)
        assert torch.equal(files.model_input(pixels, "cpu"), want)
    longest = image_transform_v2(PreprocessCfg(size=64, resize_mode="longest"), is_train=False)
    with pytest.raises(ValueError, match="--gpu-decode"):
        decode_on_device(items, reasons, longest, "cpu")


def test_a_bad_jpeg_costs_a_few_decoder_calls_not_one_per_image(corpus, tmp_path, monkeypatch):
    images, _ = corpus_items(corpus)
    good = sorted(images.values())
    broken = tmp_path / "broken.jpg"   # a sound header with a broken Huffman table: the decoder refuses it
    data = bytearray(good[0].read_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 25] = b"\xff" * 20
    broken.write_bytes(bytes(data))
    paths = [str(good[i % len(good)]) for i in range(31)]
    paths.insert(20, str(broken))
    preprocess = image_transform_v2(PreprocessCfg(size=32), is_train=False)
    files = ImageFiles(paths, preprocess, raw=True)
    packed, reasons = files.collate([files[i] for i in range(len(paths))])
    calls = []
    decode = pipeline.images._decode_jpegs
    monkeypatch.setattr(pipeline.images, "_decode_jpegs", lambda data, device: calls.append(len(data)) or
                        decode(data, device))
    x = decode_on_device(packed.unpack(), reasons, preprocess, "cpu")
    assert [bool(r) for r in reasons] == [p == str(broken) for p in paths]
    diff = (x - torch.stack([preprocess(open_rgb(p)) for p in paths if p != str(broken)])).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1   # every good image, in order, as PIL would give it
    assert calls[0] == 32 and len(calls) <= 2 * 5 + 1   # halving: about 2 log2(32) calls, not 32


def test_decoding_ahead_keeps_order_passes_errors_and_stops(corpus):
    images, _ = corpus_items(corpus)
    paths = [str(p) for p in sorted(images.values())]
    preprocess = image_transform_v2(PreprocessCfg(size=32), is_train=False)
    files = ImageFiles(paths, preprocess, raw=True)
    batches = [files.collate([files[i] for i in range(k, min(k + 2, len(paths)))]) for k in range(0, len(paths), 2)]
    want = [decode_on_device(packed.unpack(), list(reasons), preprocess, "cpu") for packed, reasons in batches]
    got = list(_decoded_ahead(batches, preprocess, "cpu", ahead=1))
    assert len(got) == len(want) and all(torch.equal(x, w) for (x, _), w in zip(got, want))

    def running() -> bool:
        return any(t.name == "clipspeech-decode" for t in threading.enumerate())

    def failing():   # a loader whose second batch breaks (a worker's exception, say)
        yield batches[0]
        raise OSError("disk gone")
    ahead = _decoded_ahead(failing(), preprocess, "cpu")
    assert torch.equal(next(ahead)[0], want[0])
    with pytest.raises(OSError, match="disk gone"):
        next(ahead)
    assert not running()

    ahead = _decoded_ahead(batches * 50, preprocess, "cpu", ahead=1)   # the caller stops early
    next(ahead)
    ahead.close()
    assert not running()


# ----------------------------------------------------------------------------------------------------
# The cache: one teacher, resume, shards, the command


def test_refuses_to_mix_teachers_or_settings(corpus, teacher, tmp_path):
    cache = tmp_path / "cache"
    run(corpus, cache, teacher, part_size=100)
    other = demo_teacher(tmp_path / "other", seed=1)
    with pytest.raises(CacheMismatchError) as err:
        run(corpus, cache, other, part_size=100)
    assert "clip.weights_sha256" in str(err.value) and "another CLIP teacher" in str(err.value)
    with pytest.raises(CacheMismatchError) as err:
        run(corpus, cache, teacher, part_size=100, dtype="float32")
    assert "clip.dtype: cache has \"float16\", requested \"float32\"" in str(err.value)
    assert "same teacher, other settings" in str(err.value) and "--dtype" in str(err.value)
    assert read_manifest(cache)["clip"]["dtype"] == "float16"
    # one shard before extract-audio (hdf5), the next after it wrote WebDataset audio: the format is the cause
    from pipeline.extract import ExtractConfig, extract_audio
    extract_audio(ExtractConfig(data=corpus, cache=cache, workers=1, fmt="wds", progress=False))
    with pytest.raises(CacheMismatchError) as err:
        run(corpus, cache, teacher, part_size=100)
    assert "clip.format: cache has \"hdf5\", requested \"wds\"" in str(err.value)
    assert "in the format of the cache's audio" in str(err.value) and "--dtype" not in str(err.value)


def test_refuses_a_corpus_other_than_the_one_of_the_cached_audio(corpus, teacher, tmp_path):
    """Embeddings of another corpus's images would leave train with no usable utterance and no reason."""
    from pipeline.extract import ExtractConfig, extract_audio
    other = write_tiny_flickr(tmp_path / "other", images=4)
    cache = tmp_path / "cache"
    extract_audio(ExtractConfig(data=other, cache=cache, workers=1, progress=False))
    with pytest.raises(CacheMismatchError) as err:
        run(corpus, cache, teacher)
    assert f"--data {corpus} is not the corpus whose audio is in {cache}" in str(err.value)
    assert f"20 utterances of flickr8k corpus {other}" in str(err.value)
    assert "clip" not in read_manifest(cache) and not (cache / IMAGE_STORE).exists()
    run(other, cache, teacher)              # the right corpus goes through


def test_extract_audio_after_embed_images_refuses_another_corpus(corpus, teacher, tmp_path):
    """embed-images may run first: the corpus it embedded is recorded, so that extract-audio refuses the audio
    of another corpus with the same image ids (the trainer joins the two by id and would pair them)."""
    from pipeline.extract import ExtractConfig, extract_audio
    other = write_tiny_flickr(tmp_path / "other", images=4, seed=3)    # image ids 1000_0000.. as corpus's
    cache = tmp_path / "cache"
    run(corpus, cache, teacher)
    assert read_manifest(cache)["corpus"]["root"] == str(corpus)
    with pytest.raises(CacheMismatchError) as err:
        extract_audio(ExtractConfig(data=other, cache=cache, workers=1, progress=False))
    message = str(err.value)
    assert "corpus.root" in message and f"pass the corpus this cache is of as --data ({corpus})" in message
    assert "audio" not in read_manifest(cache) and not (cache / "records.jsonl").exists()
    extract_audio(ExtractConfig(data=corpus, cache=cache, workers=1, progress=False))   # its own corpus goes
    assert (cache / "records.jsonl").is_file()


def test_extract_audio_after_embed_images_says_when_the_captions_changed_between(corpus, teacher, tmp_path):
    """embed-images first, then the captions corrected, then extract-audio: the caption embeddings are of the
    old texts, which extract-audio can tell from the records digest embed-images left in cache.json."""
    import shutil
    from pipeline.extract import ExtractConfig, extract_audio
    copy, cache = tmp_path / "corpus", tmp_path / "cache"
    shutil.copytree(corpus, copy)
    run(copy, cache, teacher)
    tokens = copy / "Flickr8k_text" / "Flickr8k.token.txt"
    tokens.write_text(tokens.read_text().replace(" .", " !", 1))
    summary = extract_audio(ExtractConfig(data=copy, cache=cache, workers=1, progress=False))
    assert any("the corpus changed since embed-images ran on it" in line for line in summary.lines())
    again = extract_audio(ExtractConfig(data=copy, cache=cache, workers=1, progress=False))
    assert not any("changed since" in line for line in again.lines())


def test_the_records_digest_spares_reading_records_jsonl(corpus, teacher, tmp_path, monkeypatch):
    """The same corpus as extract-audio's: cache.json's records digest vouches for records.jsonl, which is not
    read (2 s on SpokenCOCO, each shard job)."""
    from pipeline.extract import ExtractConfig, extract_audio
    cache = tmp_path / "cache"
    extract_audio(ExtractConfig(data=corpus, cache=cache, workers=1, progress=False))
    monkeypatch.setattr("pipeline.embed.read_records", lambda cache: pytest.fail("records.jsonl was read"))
    run(corpus, cache, teacher)


def test_refuses_a_manifest_of_the_same_utterances_with_other_caption_ids(teacher, tmp_path):
    """A JSONL manifest of the cached wavs whose caption ids are not extract-audio's: the trainer would find
    no caption embedding for any utterance; refused, naming records.jsonl, before anything is embedded."""
    import json
    from pipeline.corpus import read_corpus
    from pipeline.extract import ExtractConfig, extract_audio
    flickr = write_tiny_flickr(tmp_path / "flickr", images=2)
    cache = tmp_path / "cache"
    extract_audio(ExtractConfig(data=flickr, cache=cache, workers=1, progress=False))
    lines = [{"audio": u.audio_path, "image": u.image_path, "caption": u.caption, "split": u.split,
              "id": u.utt_id, "image_id": u.image_id, "caption_id": f"c{i}"}
             for i, u in enumerate(read_corpus(flickr).utterances)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(CacheMismatchError, match="records.jsonl gives it image") as err:
        run(manifest, cache, teacher)
    assert "'c0'" in str(err.value) and f"({flickr})" in str(err.value)
    assert "clip" not in read_manifest(cache) and not (cache / IMAGE_STORE).exists()


def test_a_second_process_on_the_same_shard_is_refused(corpus, teacher, tmp_path):
    from cache.manifest import StageBusyError, shard_lock
    cache = tmp_path / "cache"
    cache.mkdir()
    with shard_lock(cache, "embed-images", (0, 1)):
        with pytest.raises(StageBusyError, match="another embed-images is running --shard 0/1"):
            run(corpus, cache, teacher)
        assert not (cache / IMAGE_STORE).exists()
    assert run(corpus, cache, teacher).images_embedded


def test_a_sigterm_mid_stage_leaves_no_part_half_written(corpus, teacher, tmp_path, monkeypatch):
    """A scheduler's SIGTERM arrives while a part is open: the stage stops (Stopped, which the command turns
    into its message and exit status 143), the open part is dropped and a rerun gives the clean run's store."""
    import os
    import signal
    from pipeline import embed as embed_module
    from pipeline.stopping import Stopped, stop_on_signals
    calls = []
    add_rows = embed_module._PartStream.add_rows

    def add_rows_then_signal(self, *args):
        calls.append(1)
        add_rows(self, *args)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(embed_module._PartStream, "add_rows", add_rows_then_signal)
    cache = tmp_path / "cache"
    with stop_on_signals(), pytest.raises(Stopped):
        run(corpus, cache, teacher, part_size=3, batch_size=2, draft=False)
    assert not list(cache.rglob("*.tmp-*")) and completed_parts(cache / IMAGE_STORE)
    monkeypatch.setattr(embed_module._PartStream, "add_rows", add_rows)
    run(corpus, cache, teacher, part_size=3, batch_size=2, draft=False)
    clean = tmp_path / "clean"
    run(corpus, clean, teacher, part_size=3, batch_size=2, draft=False)
    got, _ = stored(cache, IMAGE_STORE)
    want, _ = stored(clean, IMAGE_STORE)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)


def test_resume_after_a_crash_and_shards(corpus, teacher, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run(corpus, whole, teacher, part_size=2)
    want, _ = stored(whole, IMAGE_STORE)

    # shards: 1/2 writes part 1 of 3 and cannot index; 0/2 writes parts 0 and 2, the keywords, and indexes
    sharded = tmp_path / "sharded"
    summary = run(corpus, sharded, teacher, part_size=2, shard=(1, 2))
    assert sorted(completed_parts(sharded / IMAGE_STORE)) == [1] and not summary.indexed[IMAGE_STORE]
    assert not (sharded / KEYWORD_STORE).exists()
    summary = run(corpus, sharded, teacher, part_size=2, shard=(0, 2))
    assert sorted(completed_parts(sharded / IMAGE_STORE)) == [0, 1, 2] and all(summary.indexed.values())
    got, _ = stored(sharded, IMAGE_STORE)
    assert got.keys() == want.keys() and all(np.abs(got[k] - want[k]).max() <= FP16_ATOL for k in want)

    # a rerun skips every complete part and rewrites nothing; another prompt rewrites the keywords only
    stamps = {p: p.stat().st_mtime_ns for p in sharded.rglob("part-*")}
    summary = run(corpus, sharded, teacher, part_size=2)
    assert summary.images_embedded == 0 and summary.captions_embedded == 0 and summary.parts_skipped == 3 + 15
    assert {p: p.stat().st_mtime_ns for p in sharded.rglob("part-*")} == stamps
    run(corpus, sharded, teacher, part_size=2, prompt="a {} thing")
    assert {p: p.stat().st_mtime_ns for p in sharded.rglob("part-*") if KEYWORD_STORE not in str(p)} == \
        {p: t for p, t in stamps.items() if KEYWORD_STORE not in str(p)}
    _, reader = stored(sharded, KEYWORD_STORE)
    assert reader.meta("red")["prompt"] == "a red thing" and reader.attrs["prompt"] == "a {} thing"
    with pytest.raises(ValueError, match="--prompt"):
        EmbedConfig(data=corpus, cache=sharded, model=teacher, prompt="a {word}")
    with pytest.raises(ValueError, match="--shard 2/2: expected I/N with 0 <= I < N"):
        EmbedConfig(data=corpus, cache=sharded, model=teacher, shard=(2, 2))

    # a crash in the middle of part 1 leaves part 0 complete and nothing of part 1
    crashed = tmp_path / "crashed"
    add_rows = PartWriter.add_rows

    def add_then_crash(self, keys, *args, **kwargs):
        if self.path.name.startswith("part-00001") and self.path.parent.name == IMAGE_STORE:
            raise RuntimeError("simulated crash")
        return add_rows(self, keys, *args, **kwargs)
    monkeypatch.setattr(PartWriter, "add_rows", add_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(corpus, crashed, teacher, part_size=2)
    monkeypatch.undo()
    assert sorted(p.name for p in (crashed / IMAGE_STORE).glob("part-*")) == ["part-00000.h5"]  # no temp
    # a kill -9 would have left its temporary file: the rerun removes it and finishes the job
    (crashed / IMAGE_STORE / "part-00001.h5.tmp-99999").write_bytes(b"half a part")
    summary = run(corpus, crashed, teacher, part_size=2)
    assert summary.images_embedded == 4 and summary.parts_skipped == 1
    assert not list(crashed.rglob("*.tmp-*"))
    got, _ = stored(crashed, IMAGE_STORE)
    assert got.keys() == want.keys() and all(np.abs(got[k] - want[k]).max() <= FP16_ATOL for k in want)


def test_command_line(corpus, teacher, tmp_path):
    args = ["embed-images", "--data", str(corpus), "--cache", str(tmp_path / "cache"), "--workers", "0"]
    result = CliRunner().invoke(main, args + ["--model", teacher, "--shard", "0/1", "--no-draft"])
    assert result.exit_code == 0, result.output
    assert "images: 6 embedded now" in result.output and "images indexed" in result.output
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["clip"]["image_decode"] == "pil"
    result = CliRunner().invoke(main, args + ["--model", f"local-dir:{tmp_path}/nowhere"])
    assert result.exit_code == 1 and "open_clip_config.json not found" in result.output
    result = CliRunner().invoke(main, args + ["--model", "ViT-S-32-alt", "--pretrained",
                                              "missing/weights.pt"])
    assert result.exit_code == 1 and "missing/weights.pt: no such checkpoint file" in result.output
    for device, message in [("gpu", "--device 'gpu': use cpu, cuda or cuda:N"),
                            *([] if torch.cuda.is_available() else [("cuda", "torch sees no CUDA device")])]:
        result = CliRunner().invoke(main, args + ["--model", teacher, "--device", device])
        assert result.exit_code == 1 and message in result.output, result.output
    # a missing keyword file is named before any image is embedded (the images could take hours)
    fresh = ["embed-images", "--data", str(corpus), "--cache", str(tmp_path / "fresh"), "--workers", "0"]
    result = CliRunner().invoke(main, fresh + ["--model", teacher, "--keywords", str(tmp_path / "words.txt")])
    assert result.exit_code == 1 and "words.txt: keyword file not found" in result.output
    assert not list((tmp_path / "fresh").rglob("part-*"))
    # ... and nothing is recorded, so the corrected rerun may pick other settings; every shard checks it
    assert not (tmp_path / "fresh" / "cache.json").exists()
    result = CliRunner().invoke(main, fresh + ["--model", teacher, "--shard", "1/2", "--keywords",
                                               str(tmp_path / "words.txt")])
    assert result.exit_code == 1 and "words.txt: keyword file not found" in result.output
