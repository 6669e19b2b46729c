"""The HTML report: self-contained, parseable, shows the metrics, and survives missing media and runs."""
import base64
import io
import json
import re
import wave
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from trainer.metrics import keyword_spotting, six_way_retrieval
from trainer.report import write_report

COLOURS = ["red", "green", "blue", "yellow"]


class Page(HTMLParser):
    """Collects tags with attributes, table rows as cell texts, and list items as texts."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.rows, self.items = [], [], []
        self._row = self._cell = self._item = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "li":
            self._item = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)
        elif tag == "li":
            self.items.append(self._item.strip())
            self._item = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._item is not None:
            self._item += data


def write_wav(path, seconds=0.2, rate=16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(np.arange(int(seconds * rate)) * 0.3) * 8000).astype("<i2").tobytes())


@pytest.fixture()
def evaluation(tmp_path):
    """4 images x 3 spoken captions; image 3's JPEG and utterance img0_1's WAV are missing on disk."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, 16)).astype(np.float32)
    image_ids = [f"img{i}" for i in range(4)]
    image_paths, audio_paths = {}, {}
    for i, colour in enumerate(COLOURS):
        image_paths[image_ids[i]] = str(tmp_path / f"{image_ids[i]}.jpg")
        if i != 3:
            Image.new("RGB", (200, 150), colour).save(image_paths[image_ids[i]])
    audio, audio_ids, audio_image_ids, audio_text = [], [], [], []
    for i, colour in enumerate(COLOURS):
        for c in range(3):
            utt = f"img{i}_{c}"
            audio.append(image[i] + 0.3 * rng.normal(size=16))
            audio_ids.append(utt)
            audio_image_ids.append(image_ids[i])
            audio_text.append(f"A {colour} square, number {c}!" if c else f"A dog on a {colour} field")
            audio_paths[utt] = str(tmp_path / f"{utt}.wav")
            if utt != "img0_1":
                write_wav(audio_paths[utt])
    audio = np.stack(audio).astype(np.float32)
    text = audio + 0.1 * rng.normal(size=audio.shape).astype(np.float32)
    keywords = ["dog", "red", "square"]
    emb = dict(audio=audio, audio_ids=audio_ids, audio_image_ids=audio_image_ids, audio_text=audio_text,
               image=image, image_ids=image_ids, text=text, text_ids=[f"{u}#t" for u in audio_ids],
               text_image_ids=audio_image_ids, keyword=rng.normal(size=(3, 16)).astype(np.float32),
               keywords=keywords)
    results = {"split": "test", "counts": {"utterances": 12, "images": 4},
               "retrieval": six_way_retrieval(audio, audio_image_ids, emb["text_ids"], image, image_ids,
                                              text, emb["text_ids"], audio_image_ids),
               "keyword_spotting": keyword_spotting(audio, emb["keyword"], audio_text, keywords)}
    return results, emb, audio_paths, image_paths


def test_report_is_self_contained_and_shows_the_numbers(tmp_path, evaluation):
    results, emb, audio_paths, image_paths = evaluation
    out = write_report(tmp_path / "out" / "report.html", results, emb, audio_paths, image_paths,
                       n_queries=12)
    text = out.read_text(encoding="utf-8")
    page = Page(text)

    rows = {row[0]: row[1:] for row in page.rows if row}
    for pair, label in [("audio_to_image", "audio → image"), ("text_to_audio", "text → audio")]:
        r = results["retrieval"][pair]
        expected = [f"{r[k]:.1f}" for k in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")]
        assert rows[label][:5] == expected
    assert rows["audio → image"][5:] == ["25.0", "100.0", "100.0"]   # chance: 1, 5, 10 of 4 images
    chance = 100 * (4 + 3 + 8) / (3 * 12)   # dog, red and square occur in 4, 3 and 8 of 12 transcripts
    assert rows["mAP"] == [f"{results['keyword_spotting']['mAP']:.1f}", f"{chance:.1f}"]
    assert rows["EER"][1] == "50.0"

    srcs = [a["src"] for tag, a in page.tags if tag in ("img", "audio") and "src" in a]
    assert all(s.startswith("data:") for s in srcs)
    audios = [a["src"] for tag, a in page.tags if tag == "audio"]
    assert len(audios) == 11                      # 12 queries, one WAV missing
    assert all(base64.b64decode(s.split(",", 1)[1])[:4] == b"RIFF" for s in audios)
    thumbs = [s for tag, a in page.tags if tag == "img" and (s := a["src"]).startswith("data:image/jpeg")]
    assert thumbs and all(max(Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).size) <= 96
                          for s in thumbs)
    # Audio is close to its own image: every query finds it at #1, outlined as correct.
    correct = [a for tag, a in page.tags if tag == "figure" and a.get("class") == "correct"]
    assert len(correct) == 12 and text.count("correct image at rank 1") == 12

    assert image_paths["img3"] in text and audio_paths["img0_1"] in text      # placeholders name paths
    assert "No run directory" in text
    assert not re.search(r"https?://", text)
    assert not [a for _, a in page.tags for k in ("src", "href") if k in a and not a[k].startswith("data:")]


def test_keyword_chance_and_count_when_a_keyword_never_occurs(tmp_path, evaluation):
    """Micro AP runs over the whole utterance x keyword matrix, a keyword that never occurs included (all
    negatives): its chance is the matrix's mean, unlike mAP's over the keywords that occur; the heading says
    how many of the keywords are scored."""
    results, emb, audio_paths, image_paths = evaluation
    rng = np.random.default_rng(1)
    emb = {**emb, "keywords": emb["keywords"] + ["zebra"],
           "keyword": np.concatenate([emb["keyword"], rng.normal(size=(1, 16)).astype(np.float32)])}
    results = {**results, "counts": {**results["counts"], "keywords": 4},
               "keyword_spotting": keyword_spotting(emb["audio"], emb["keyword"], emb["audio_text"],
                                                    emb["keywords"])}
    page = Page(write_report(tmp_path / "r.html", results, emb, audio_paths, image_paths).read_text())
    rows = {row[0]: row[1:] for row in page.rows if row}
    assert rows["mAP"][1] == f"{100 * (4 + 3 + 8) / (3 * 12):.1f}"
    assert rows["micro AP"][1] == f"{100 * (4 + 3 + 8) / (4 * 12):.1f}"
    assert any("keyword spotting (3 of 4 keywords occur)" in row[0] for row in page.rows if row)


def test_keyword_rankings_are_marked_right_or_wrong(tmp_path, evaluation):
    results, emb, audio_paths, image_paths = evaluation
    text = write_report(tmp_path / "r.html", results, emb, audio_paths, image_paths).read_text()
    items = Page(text).items
    assert len(items) == 3 * 10                   # top 10 of 12 utterances for each of 3 keywords
    for word, block in zip(emb["keywords"], (items[:10], items[10:20], items[20:])):
        for item in block:
            mark, transcript = item[0], item[1:]
            relevant = word in re.findall(r"\w+", transcript.lower())
            assert mark == ("✓" if relevant else "✗"), (word, item)
    ap = results["keyword_spotting"]["per_keyword"]["square"]["AP"]
    assert f"square · AP {ap:.1f}" in text.replace("&middot;", "·")


def test_training_curves_from_run_dir(tmp_path, evaluation):
    results, emb, audio_paths, image_paths = evaluation
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "loss": 3.0 / (s + 1), "lr": 1e-3, "temperature": 14.0})
             for s in range(20)]
    lines += [json.dumps({"step": 10, "dev/audio_to_image/R@10": 40.0, "dev/keyword_mAP": 20.0}),
              json.dumps({"step": 20, "dev/audio_to_image/R@10": 55.0, "dev/keyword_mAP": 25.0}),
              '{"step": 21, "loss": 0.']                                   # a half-written last line
    (run / "metrics.jsonl").write_text("\n".join(lines))
    text = write_report(tmp_path / "r.html", results, emb, audio_paths, image_paths, run_dir=run).read_text()
    plots = [a for tag, a in Page(text).tags if tag == "img" and a.get("class") == "plot"]
    assert len(plots) == 2 and all(a["src"].startswith("data:image/png;base64,") for a in plots)
    assert "1 unreadable lines skipped" in text

    empty = tmp_path / "empty-run"
    empty.mkdir()
    text = write_report(tmp_path / "r.html", results, emb, audio_paths, image_paths,
                        run_dir=empty).read_text()
    assert str(empty / "metrics.jsonl") in text and "does not exist" in text


def test_one_curve_panel_per_direction_with_its_three_recalls():
    from trainer.report import _panels
    pts = [(100.0, 1.0)]
    series = {f"dev/{d}_R@{k}": pts for d in ("audio_to_image", "image_to_audio") for k in (1, 5, 10)}
    panels = _panels({**series, "dev/keyword_mAP": pts})
    assert list(panels) == ["dev/audio_to_image R@K", "dev/image_to_audio R@K", "dev/keyword_mAP"]
    assert set(panels["dev/audio_to_image R@K"]) == {"R@1", "R@5", "R@10"}
    assert panels["dev/keyword_mAP"] == {"dev/keyword_mAP": pts}


def test_same_seed_same_page_and_escaped_text(tmp_path, evaluation):
    results, emb, audio_paths, image_paths = evaluation
    emb["audio_text"] = [t.replace("square", "<b>square</b> & co") for t in emb["audio_text"]]
    a = write_report(tmp_path / "a.html", results, emb, audio_paths, image_paths, seed=3).read_text()
    b = write_report(tmp_path / "b.html", results, emb, audio_paths, image_paths, seed=3).read_text()
    assert a == b
    assert "<b>" not in a and "&lt;b&gt;" in a


def test_missing_arrays_are_named(tmp_path, evaluation):
    results, emb, audio_paths, image_paths = evaluation
    del emb["audio_text"]
    with pytest.raises(ValueError, match="audio_text"):
        write_report(tmp_path / "r.html", results, emb, audio_paths, image_paths)
