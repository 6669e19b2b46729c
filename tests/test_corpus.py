"""Corpus readers against tiny corpora written here, quirks of the real layouts included."""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.corpus import Utterance, read_corpus, read_flickr8k, read_jsonl, read_spokencoco


def wav(path: Path, seconds: float = 0.3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="PCM_16")


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff")


def write_flickr(root: Path) -> None:
    """Three images in splits (a, b, c), one outside any split (d); quirks listed in the assertions."""
    text, audio, images = root / "Flickr8k_text", root / "flickr_audio", root / "Flicker8k_Dataset"
    text.mkdir(parents=True)
    (text / "Flickr_8k.trainImages.txt").write_text("1000_aa.jpg\n1001_bb.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("1002_cc.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("")
    tokens = []
    for image in ("1000_aa", "1001_bb", "1002_cc", "1003_dd"):
        touch(images / f"{image}.jpg")
        tokens += [f"{image}.jpg#{n}\tA dog runs on the grass number {n} ." for n in range(5)]
    tokens.append("this line is broken")
    (text / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    capt, spk = [], []
    for image in ("1000_aa", "1001_bb", "1002_cc", "1003_dd"):
        for n in range(5):
            if image == "1002_cc" and n == 4:
                continue  # a caption without audio
            name = f"{image}_{n}.wav"
            capt.append(f"{name} {image}.jpg #{n}")
            spk.append(f"{name} {n % 2 + 1}")
            if name != "1001_bb_3.wav":  # listed but missing on disk
                wav(audio / "wavs" / name)
    capt.append("1000_aa_0.wav 1000_aa.jpg #0")  # duplicate id
    capt.append("garbage")  # malformed
    (audio / "wav2capt.txt").write_text("\n".join(capt) + "\n")
    (audio / "wav2spk.txt").write_text("\n".join(spk) + "\n")


def test_flickr8k_layout_and_quirks(tmp_path):
    write_flickr(tmp_path)
    corpus = read_corpus(tmp_path)
    assert corpus.kind == "flickr8k"
    # 1000_aa and 1001_bb (train, 5 each) + 1002_cc (dev, 4 spoken); 1003_dd is in no split list
    assert len(corpus.utterances) == 14
    assert corpus.split_counts() == {"train": 10, "dev": 4, "test": 0}
    u = next(u for u in corpus.utterances if u.utt_id == "1001_bb_2")
    assert u.image_id == "1001_bb" and u.caption_id == "1001_bb#2" and u.speaker == "1"
    assert u.caption == "A dog runs on the grass number 2 ."
    assert u.image_path == str((tmp_path / "Flicker8k_Dataset" / "1001_bb.jpg").resolve())
    assert u.audio_path.endswith("flickr_audio/wavs/1001_bb_2.wav")
    r = corpus.report
    assert r.count("utterance of an image in no split list (left out)") == 5
    assert r.problems["utterance of an image in no split list (left out)"].examples[0] == "1003_dd_0.wav -> 1003_dd.jpg"
    assert r.count("caption without audio") == 1
    assert r.count("duplicate utterance id (first kept)") == 1
    assert r.count("malformed wav2capt line") == 1
    assert r.count("malformed caption line") == 1
    assert r.count("missing audio file") == 1
    assert "1001_bb_3.wav" in r.problems["missing audio file"].examples[0]
    assert "missing audio file: 1" in corpus.describe()


def test_flickr8k_quirks_of_real_copies(tmp_path):
    """Layouts and lines real copies have: the images one folder deeper (Flickr8k_Dataset/Flicker8k_Dataset),
    an upper-case .WAV, a caption id given twice with other texts, an empty caption, a wav that wav2capt.txt
    does not name, and a split-list image that lost its lines (its split falls short of the list: said)."""
    write_flickr(tmp_path)
    (tmp_path / "Flickr8k_Dataset").mkdir()
    (tmp_path / "Flicker8k_Dataset").rename(tmp_path / "Flickr8k_Dataset" / "Flicker8k_Dataset")
    audio, text = tmp_path / "flickr_audio", tmp_path / "Flickr8k_text"
    (audio / "wavs" / "1000_aa_1.wav").rename(audio / "wavs" / "1000_aa_1.WAV")
    capt = (audio / "wav2capt.txt").read_text().replace("1000_aa_1.wav", "1000_aa_1.WAV")
    (audio / "wav2capt.txt").write_text("\n".join(line for line in capt.splitlines()
                                                  if not line.startswith("1001_bb")) + "\n")
    wav(audio / "wavs" / "9999_zz_0.wav")
    with open(text / "Flickr8k.token.txt", "a") as f:
        f.write("1000_aa.jpg#2\tA cat sleeps .\n1000_aa.jpg#0\tA dog runs on the grass number 0 .\n"
                "1002_cc.jpg#3\t \n")
    corpus = read_corpus(tmp_path)
    r = corpus.report
    assert r.count("missing image file") == 0             # found one folder deeper
    assert corpus.utterances[0].image_path.startswith(str(tmp_path / "Flickr8k_Dataset" / "Flicker8k_Dataset"))
    assert "1000_aa_1" in {u.utt_id for u in corpus.utterances} and r.count("malformed wav2capt line") == 1
    assert r.count("caption id twice with other texts (first kept)") == 1          # not the same text again
    assert next(u for u in corpus.utterances if u.caption_id == "1000_aa#2").caption.endswith("number 2 .")
    assert r.count("empty caption text") == 1
    assert r.problems["image in a split list without utterances (no wav2capt line with a caption)"].examples \
        == ["1001_bb.jpg (train)"]
    unlisted = r.problems["wav file that wav2capt.txt does not name (not read)"]   # 1001_bb_3 is not on disk
    assert unlisted.count == 5 and unlisted.examples == [str(audio / "wavs" / f"1001_bb_{n}.wav") for n in range(3)]


def test_flickr8k_accepts_the_audio_folder_itself(tmp_path):
    write_flickr(tmp_path)
    assert len(read_corpus(tmp_path / "flickr_audio").utterances) == 14


def test_flickr8k_without_any_audio_is_an_error_that_says_why(tmp_path):
    write_flickr(tmp_path)
    for f in (tmp_path / "flickr_audio" / "wavs").glob("*.wav"):
        f.unlink()
    with pytest.raises(ValueError, match="no usable utterances.*missing audio file"):
        read_flickr8k(tmp_path)


def test_flickr8k_missing_split_file_names_it(tmp_path):
    write_flickr(tmp_path)
    (tmp_path / "Flickr8k_text" / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Flickr_8k.devImages.txt"):
        read_corpus(tmp_path)


def spokencoco_item(image: str, wavs: list[str]) -> dict:
    return {"image": image, "captions": [
        {"text": f"a cat sitting {i}", "wav": w, "speaker": f"spk{i}", "uttid": Path(w).stem}
        for i, w in enumerate(wavs)]}


def test_spokencoco_karpathy_splits_and_problems(tmp_path):
    for split, image in (("train", "train2014/COCO_1.jpg"), ("val", "val2014/COCO_2.jpg"),
                         ("test", "val2014/COCO_3.jpg")):
        wavs = [f"wavs/{split}/0/{split}-u{i}.wav" for i in range(2)]
        for w in wavs:
            wav(tmp_path / w)
        touch(tmp_path / "images" / image)
        data = {"data": [spokencoco_item(image, wavs)]}
        if split == "train":
            data["data"][0]["captions"].append({"text": "no audio here"})
            data["data"].append({"captions": []})
        (tmp_path / f"SpokenCOCO_{split}_karpathy.json").write_text(json.dumps(data))
    # the non-Karpathy files are ignored when the Karpathy ones exist
    (tmp_path / "SpokenCOCO_train.json").write_text("{not json")
    corpus = read_corpus(tmp_path)
    assert corpus.kind == "spokencoco"
    assert corpus.split_counts() == {"train": 2, "dev": 2, "test": 2}
    u = corpus.utterances[2]
    assert (u.utt_id, u.image_id, u.caption_id, u.speaker) == ("val-u0", "COCO_2", "COCO_2#0", "spk0")
    assert u.image_path == str(tmp_path.resolve() / "images" / "val2014" / "COCO_2.jpg")
    assert corpus.report.count("caption without audio") == 1
    assert corpus.report.count("malformed entry") == 1
    assert corpus.report.count("missing image file") == 0


def test_spokencoco_single_file_and_bad_json(tmp_path):
    wav(tmp_path / "wavs" / "a.wav")
    (tmp_path / "SpokenCOCO_val.json").write_text(json.dumps({"data": [spokencoco_item("val2014/x.jpg",
                                                                                       ["wavs/a.wav"])]}))
    corpus = read_spokencoco(tmp_path / "SpokenCOCO_val.json")
    assert [u.split for u in corpus.utterances] == ["dev"]
    assert corpus.root == str(tmp_path / "SpokenCOCO_val.json")   # what was read: cache messages' --data
    assert corpus.report.count("missing image file") == 1
    (tmp_path / "SpokenCOCO_val.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="SpokenCOCO_val.json: not valid JSON"):
        read_corpus(tmp_path / "SpokenCOCO_val.json")


def test_spokencoco_image_folder_is_found_past_a_missing_first_image_and_names_are_required(tmp_path):
    """The images lie beside SpokenCOCO/ (COCO's own folders): found though the first listed image is missing,
    which is then the one reported; a JSON file whose name gives no split is refused, not read as train."""
    coco = tmp_path / "SpokenCOCO"
    items = []
    for i in range(4):
        wav(coco / "wavs" / f"u{i}.wav")
        if i:
            touch(tmp_path / "val2014" / f"COCO_{i}.jpg")
        items.append(spokencoco_item(f"val2014/COCO_{i}.jpg", [f"wavs/u{i}.wav"]))
    (coco / "SpokenCOCO_val.json").write_text(json.dumps({"data": items}))
    corpus = read_corpus(coco / "SpokenCOCO_val.json")
    assert corpus.report.problems["missing image file"].examples == [str(tmp_path / "val2014" / "COCO_0.jpg")]
    (coco / "SpokenCOCO_val.json").rename(coco / "karpathy_val.json")
    with pytest.raises(ValueError, match="karpathy_val.json: the split of a SpokenCOCO file is read from its name"):
        read_spokencoco(coco / "karpathy_val.json")


def test_jsonl_optional_fields_as_people_write_them(tmp_path):
    """"Train " is train, an "id" of 0 is the id "0", a null speaker is unknown."""
    row = {"audio": "a.wav", "image": "a.jpg", "caption": "a dog", "split": "Train ", "id": 0, "speaker": None}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    corpus = read_jsonl(tmp_path / "m.jsonl", check_files=False)
    assert [(u.utt_id, u.split, u.speaker, u.caption_id) for u in corpus.utterances] == [("0", "train", "unknown", "0")]
    assert not corpus.report.lines()


@pytest.mark.parametrize("rel", ["wavs/train/0/a.wav", "./wavs/a.wav", "wavs//a.wav", "wavs/./a.wav", "wavs/a/",
                                 "wavs/a/.", ".", "..", "../up/a.wav", "/abs/a.wav", "a\\b.wav", "wavs/.a.wav",
                                 "w a v/ü.wav", "wavs/../a.wav"])
@pytest.mark.parametrize("root", ["/data/SpokenCOCO", "/"])
def test_paths_in_a_corpus_are_joined_as_pathlib_joins_them(root, rel):
    """The readers join paths as strings (pathlib cost 6 of SpokenCOCO's 10 s), so a path in the metadata must
    give the string that pathlib gave, which records.jsonl, reports and failure lists name."""
    from pipeline.corpus import _under
    assert _under(root, rel) == str(Path(root) / rel)


def test_reading_a_corpus_leaves_the_garbage_collector_as_it_was(tmp_path):
    import gc
    wav(tmp_path / "wavs" / "a.wav")
    (tmp_path / "SpokenCOCO_val.json").write_text(json.dumps({"data": [spokencoco_item("x.jpg", ["wavs/a.wav"])]}))
    assert gc.isenabled()
    read_spokencoco(tmp_path)
    assert gc.isenabled()
    gc.disable()
    try:
        read_spokencoco(tmp_path)
        assert not gc.isenabled()
    finally:
        gc.enable()
    (tmp_path / "SpokenCOCO_val.json").write_text("[")
    with pytest.raises(ValueError):
        read_spokencoco(tmp_path)
    assert gc.isenabled()


def _tree_of_files(root: Path) -> list[str]:
    """Paths a corpus may name: present, missing, a symlink to a file, a dangling symlink, a folder with a
    file's name, files under a missing folder and under a file, in folders above and below LISTED_FROM."""
    from pipeline.corpus import LISTED_FROM
    many, few = root / "wavs", root / "few"
    many.mkdir()
    few.mkdir()
    names = [f"{i}.wav" for i in range(LISTED_FROM + 8)]
    for name in names[:-3]:
        (many / name).write_bytes(b"")
    (few / "here.wav").write_bytes(b"")
    (many / "link.wav").symlink_to(many / "0.wav")
    (many / "dangling.wav").symlink_to(many / "gone.wav")
    (many / "folder.wav").mkdir()
    (root / "file").write_bytes(b"")
    paths = [str(many / n) for n in names + ["link.wav", "dangling.wav", "folder.wav", "gone.wav"]]
    paths += [str(few / "here.wav"), str(few / "gone.wav"), str(root / "file")]
    paths += [str(root / "nowhere" / n) for n in names] + [str(root / "file" / n) for n in names]
    return paths + [str(many / ".." / "wavs" / "1.wav"), str(many) + "/", "relative.wav"]


def test_files_are_found_present_or_missing_as_isfile_finds_them(tmp_path):
    """The corpus check lists big folders instead of asking for each file (a round trip apiece on NFS or
    Lustre); it must say what os.path.isfile says of every path."""
    import os
    from pipeline.corpus import existing_files
    paths = _tree_of_files(tmp_path)
    assert existing_files(paths) == {p for p in paths if os.path.isfile(p)}


def test_a_folder_of_many_corpus_files_is_listed_not_stated_file_by_file(tmp_path, monkeypatch):
    import os
    from pipeline import corpus as corpus_module
    folder = f"{tmp_path / 'wavs'}/"
    paths = [p for p in _tree_of_files(tmp_path)
             if p.startswith(folder) and not any(s in p for s in ("..", "link", "dangling"))]
    asked = []
    isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: asked.append(p) or isfile(p))
    present = corpus_module.existing_files(paths)
    assert len(present) == corpus_module.LISTED_FROM + 5
    assert sorted(asked) == sorted(p for p in paths if p not in present)   # only the misses are asked about


def test_missing_files_of_a_corpus_are_reported_with_their_paths(tmp_path):
    from pipeline.corpus import LISTED_FROM
    lines = []
    for i in range(LISTED_FROM + 2):
        if i != 3:
            wav(tmp_path / "wavs" / f"{i}.wav")
        lines.append({"audio": f"wavs/{i}.wav", "image": f"img/{i % 2}.jpg", "caption": "a dog", "split": "train"})
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.jpg").write_bytes(b"")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = read_jsonl(tmp_path / "m.jsonl").report
    text = "\n".join(report.lines())
    assert "missing audio file" in text and str(tmp_path / "wavs" / "3.wav") in text
    assert "missing image file" in text and str(tmp_path / "img" / "1.jpg") in text
    assert str(tmp_path / "img" / "0.jpg") not in text


def test_jsonl_manifest(tmp_path):
    wav(tmp_path / "a" / "one.wav")
    wav(tmp_path / "a" / "two.wav")
    touch(tmp_path / "img" / "pic.jpg")
    lines = [
        {"audio": "a/one.wav", "image": "img/pic.jpg", "caption": "a red ball", "split": "train", "speaker": "s1"},
        {"id": "u2", "audio": "a/two.wav", "image": "img/pic.jpg", "caption": "the ball", "split": "val",
         "caption_id": "c2", "image_id": "P"},
        {"audio": "a/one.wav", "image": "img/pic.jpg", "caption": "dup", "split": "train"},
        {"audio": "a/three.wav", "image": "img/pic.jpg", "split": "train"},
        {"audio": "a/two.wav", "image": "img/pic.jpg", "caption": "x", "split": "holdout", "id": "u3"},
        {"audio": "a/two.wav", "image": "img/pic.jpg", "caption": 123, "split": "train", "id": "u4"},
    ]
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    corpus = read_corpus(tmp_path)  # a folder holding one manifest is detected too
    assert corpus.kind == "jsonl"
    assert corpus.utterances == read_jsonl(manifest).utterances
    one, two = corpus.utterances
    assert one == Utterance("one", str(tmp_path / "a" / "one.wav"), "pic", str(tmp_path / "img" / "pic.jpg"),
                            "a red ball", "one", "s1", "train")
    assert (two.utt_id, two.image_id, two.caption_id, two.speaker, two.split) == ("u2", "P", "c2", "unknown", "dev")
    r = corpus.report
    assert r.count("duplicate utterance id (first kept)") == 1
    assert r.count("malformed line (not JSON)") == 1
    assert r.count("unknown split (use train, dev/val, test)") == 1
    assert sum(p.count for k, p in r.problems.items() if k.startswith("line without")) == 1
    assert r.count("audio, image, caption and split must be strings") == 1
    assert f"{manifest}:6 caption: 123" in "\n".join(r.lines())


def test_one_id_for_two_images_or_two_texts_is_refused(tmp_path):
    """Images and captions are embedded once per id: two files under one image id (a JSONL manifest's default
    id is the file's stem) would train the second file's utterances against the first one's embedding."""
    def manifest(rows):
        (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return read_jsonl(tmp_path / "m.jsonl", check_files=False)

    row = {"audio": "w/0.wav", "image": "img/a/1.jpg", "caption": "a red square", "split": "train"}
    same = manifest([row, {**row, "audio": "w/1.wav", "image": "img/./a/1.jpg"}])   # one file, spelled twice
    assert {u.image_id for u in same.utterances} == {"1"}
    touch(tmp_path / "img" / "a" / "1.jpg")
    (tmp_path / "link").symlink_to(tmp_path / "img")
    linked = manifest([row, {**row, "audio": "w/1.wav", "image": "link/a/1.jpg"}])   # and through a symlink
    assert {u.image_id for u in linked.utterances} == {"1"}
    with pytest.raises(ValueError) as err:
        manifest([row, {**row, "audio": "w/1.wav", "image": "img/b/1.jpg", "caption": "a blue square"}])
    message = str(err.value)
    assert "image id '1' names two files" in message and str(tmp_path / "img" / "b" / "1.jpg") in message
    assert "utterance 0" in message and "utterance 1" in message and '"image_id"' in message
    with pytest.raises(ValueError, match="caption id 'c' has two texts, 'a red square' \\(utterance 0\\) and "
                                         "'a blue square' \\(utterance 1\\)"):
        manifest([{**row, "caption_id": "c"},
                  {**row, "audio": "w/1.wav", "caption_id": "c", "caption": "a blue square"}])
    # two speakers of one caption: one text, one id, as JSONL corpora may say
    spoken_twice = manifest([{**row, "caption_id": "c"}, {**row, "audio": "w/1.wav", "caption_id": "c"}])
    assert [u.caption_id for u in spoken_twice.utterances] == ["c", "c"]


def test_unknown_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such corpus"):
        read_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a corpus clipspeech can read"):
        read_corpus(tmp_path / "empty")


def _latin1_line(path: Path, line: str) -> int:
    """Appends `line` in Latin-1 (an e-acute: byte 0xe9, not UTF-8) and returns its line number."""
    n = len(path.read_bytes().splitlines()) + 1
    with open(path, "ab") as f:
        f.write(line.encode("latin-1") + b"\n")
    return n


def test_a_text_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    write_flickr(tmp_path)
    tokens = tmp_path / "Flickr8k_text" / "Flickr8k.token.txt"
    line = _latin1_line(tokens, "1003_dd.jpg#5\tA dog in a caf\u00e9 .")
    with pytest.raises(ValueError, match=f"{tokens}: not UTF-8 text \\(byte 0xe9 on line {line}\\); convert it"):
        read_corpus(tmp_path)

    from pipeline.keywords import read_keywords
    keywords = tmp_path / "keywords.txt"
    keywords.write_text("dog\n")
    _latin1_line(keywords, "caf\u00e9")
    with pytest.raises(ValueError, match=f"{keywords}: not UTF-8 text \\(byte 0xe9 on line 2\\)"):
        read_keywords(keywords)

    from trainer.config import load_toml
    toml = tmp_path / "run.toml"
    toml.write_text("steps = 10\n")
    _latin1_line(toml, "# caf\u00e9")
    with pytest.raises(ValueError, match=f"{toml}: not UTF-8 text \\(byte 0xe9 on line 2\\)"):
        load_toml(toml)


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    """Windows editors start UTF-8 files with a BOM: the first line must still be read, not lost."""
    wav(tmp_path / "a.wav")
    line = {"audio": "a.wav", "image": "a.jpg", "caption": "a dog", "split": "train", "id": "a"}
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(line).encode() + b"\n")
    corpus = read_jsonl(tmp_path / "m.jsonl", check_files=False)
    assert [u.utt_id for u in corpus.utterances] == ["a"] and not corpus.report.lines()


def test_jsonl_lines_are_numbered_as_in_the_file(tmp_path):
    """The manifest is read whole now: a problem's line number is still the file's (blank lines count)."""
    wav(tmp_path / "one.wav")
    touch(tmp_path / "pic.jpg")
    good = json.dumps({"audio": "one.wav", "image": "pic.jpg", "caption": "a", "split": "train"})
    (tmp_path / "c.jsonl").write_text(f"{good}\n\nnot json\r\n")
    corpus = read_jsonl(tmp_path / "c.jsonl")
    assert len(corpus.utterances) == 1
    assert corpus.report.problems["malformed line (not JSON)"].examples == [f"{tmp_path / 'c.jsonl'}:3"]


def test_every_reader_pauses_the_garbage_collector(tmp_path, monkeypatch):
    """Its full passes over the utterances built so far cost seconds on SpokenCOCO (docs/benchmarks.md)."""
    import gc
    import pipeline.corpus as corpus_module
    enabled = []
    real = corpus_module._finish
    monkeypatch.setattr(corpus_module, "_finish", lambda *a: enabled.append(gc.isenabled()) or real(*a))
    write_flickr(tmp_path / "flickr")
    read_flickr8k(tmp_path / "flickr", check_files=False)
    wav(tmp_path / "coco" / "wavs" / "a.wav")
    item = spokencoco_item("x.jpg", ["wavs/a.wav"])
    (tmp_path / "coco" / "SpokenCOCO_val.json").write_text(json.dumps({"data": [item]}))
    read_spokencoco(tmp_path / "coco", check_files=False)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "image": "a.jpg", "caption": "a",
                                                  "split": "train"}) + "\n")
    read_jsonl(tmp_path / "m.jsonl", check_files=False)
    assert enabled == [False, False, False] and gc.isenabled()
