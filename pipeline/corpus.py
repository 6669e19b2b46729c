"""Readers for spoken-caption corpora: Flickr8k Audio Captions, SpokenCOCO and JSONL manifests.

Each reader yields one `Utterance` per spoken caption and a `CorpusReport` that counts what was wrong
(missing files, duplicate ids, malformed lines, captions without audio) with example paths.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from cache.manifest import read_utf8

SPLITS = ("train", "dev", "test")
SPLIT_ALIASES = {"train": "train", "dev": "dev", "val": "dev", "valid": "dev", "validation": "dev",
                 "test": "test", "restval": "train"}
EXAMPLES_KEPT = 3


@dataclass(frozen=True)
class Utterance:
    """One spoken caption of one image. Paths are absolute."""
    utt_id: str
    audio_path: str
    image_id: str
    image_path: str
    caption: str
    caption_id: str
    speaker: str
    split: str

    def to_dict(self) -> dict:
        # shallow: every field is a str (dataclasses.asdict deep-copies, 10x slower over 600k utterances)
        return {name: getattr(self, name) for name in _UTTERANCE_FIELDS}


_UTTERANCE_FIELDS = tuple(f.name for f in dataclasses.fields(Utterance))


@dataclass
class Problem:
    count: int = 0
    examples: list = field(default_factory=list)


@dataclass
class CorpusReport:
    """What a reader found wrong, with counts and a few example paths or lines each."""
    kind: str
    root: str
    problems: "OrderedDict[str, Problem]" = field(default_factory=OrderedDict)

    def add(self, what: str, example: str) -> None:
        p = self.problems.setdefault(what, Problem())
        p.count += 1
        if len(p.examples) < EXAMPLES_KEPT:
            p.examples.append(example)

    def count(self, what: str) -> int:
        return self.problems[what].count if what in self.problems else 0

    def lines(self) -> list[str]:
        return [f"{what}: {p.count} (e.g. {', '.join(p.examples)})" for what, p in self.problems.items()]


@dataclass
class Corpus:
    kind: str            # "flickr8k" | "spokencoco" | "jsonl"
    root: str
    utterances: list[Utterance]
    report: CorpusReport

    def split_counts(self) -> dict[str, int]:
        counts = Counter(u.split for u in self.utterances)
        return {s: counts.get(s, 0) for s in SPLITS}

    def describe(self) -> str:
        n_images = len({u.image_id for u in self.utterances})
        splits = ", ".join(f"{s} {n}" for s, n in self.split_counts().items())
        head = f"{self.kind} corpus at {self.root}: {len(self.utterances)} utterances of {n_images} images ({splits})"
        return "\n".join([head] + [f"  {line}" for line in self.report.lines()])


# ----------------------------------------------------------------------------------------------------
# Detection


def read_corpus(path: str | os.PathLike, check_files: bool = True) -> Corpus:
    """Detects the corpus kind at `path` and reads it.

    A `.jsonl` file is a manifest; a `.json` file or a folder with `SpokenCOCO_*.json` is SpokenCOCO; a folder
    with `flickr_audio/wav2capt.txt` (or the `flickr_audio` folder itself) is Flickr8k.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file or folder; --data takes a Flickr8k folder, a "
                                "SpokenCOCO folder or JSON file, or a .jsonl manifest")
    if path.is_file():
        if path.suffix == ".jsonl":
            return read_jsonl(path, check_files)
        if path.suffix == ".json":
            return read_spokencoco(path, check_files=check_files)
    else:
        if (path / "flickr_audio" / "wav2capt.txt").is_file():
            return read_flickr8k(path, check_files)
        if path.name == "flickr_audio" and (path / "wav2capt.txt").is_file():
            return read_flickr8k(path.parent, check_files)
        if sorted(path.glob("SpokenCOCO_*.json")):
            return read_spokencoco(path, check_files=check_files)
        manifests = sorted(path.glob("*.jsonl"))
        if len(manifests) == 1:
            return read_jsonl(manifests[0], check_files)
    raise ValueError(f"{path}: not a corpus clipspeech can read. Expected a Flickr8k folder (with "
                     "flickr_audio/wav2capt.txt, Flickr8k_text/ and Flicker8k_Dataset/), a SpokenCOCO folder or "
                     "SpokenCOCO_*.json file, or a .jsonl manifest (one utterance per line)")


def _gc_paused(reader):
    """Runs a corpus reader with the cyclic garbage collector paused: building 600,000 utterances sets off
    its full passes over everything built so far (2 of SpokenCOCO's 5 s of reading); readers make no cycles."""
    @functools.wraps(reader)
    def read(*args, **kwargs):
        if not gc.isenabled():
            return reader(*args, **kwargs)
        gc.disable()
        try:
            return reader(*args, **kwargs)
        finally:
            gc.enable()
    return read


def _under(root: str, rel: str) -> str:
    """str(Path(root) / rel) for an absolute, resolved `root`: a plain string join for the usual relative path,
    pathlib's parsing (8x slower: 6 of SpokenCOCO's 10 s of reading) only where it would change the string."""
    if rel and rel[0] != "/" and not rel.startswith("./") and rel != "." and "//" not in rel \
            and "/./" not in rel and not rel.endswith(("/", "/.")):
        return f"{root}/{rel}" if root != "/" else f"/{rel}"
    return str(Path(root) / rel)


LISTED_FROM = 32   # a folder that holds this many of the files asked about is listed rather than stat'ed


def existing_files(paths: list[str]) -> set[str]:
    """The paths among `paths` that name regular files (symlinks followed), as os.path.isfile says of each.
    A folder that holds LISTED_FROM or more of them is listed once (os.scandir: the entries' types come with
    the listing on local and network file systems alike, so only symlinks are stat'ed), and only the names
    not listed are stat'ed (which keeps isfile's answer on a case-insensitive file system); the other paths are
    stat'ed one by one. On NFS or Lustre a stat is a round trip to a server, and every extract-audio job (each
    of N --shard jobs too) checks SpokenCOCO's 616,435 utterances before it starts."""
    by_folder: dict[str, list[str]] = {}
    for path in paths:
        by_folder.setdefault(path.rpartition("/")[0], []).append(path)
    present = set()
    for folder, members in by_folder.items():
        listed: set[str] = set()
        if len(members) >= LISTED_FROM and folder:
            try:
                with os.scandir(folder) as entries:
                    listed = {entry.name for entry in entries if entry.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                continue   # none of its files is there
            except OSError:   # e.g. a folder one may enter but not list: its files are stat'ed
                pass
        present.update(path for path in members
                       if path.rpartition("/")[2] in listed or os.path.isfile(path))
    return present


def _finish(kind: str, root: Path, utterances: list[Utterance], report: CorpusReport,
            check_files: bool) -> Corpus:
    """Reports missing files and refuses a corpus in which no utterance has its audio, or in which one image
    id names two files or one caption id two texts."""
    image_of = _one_per_id(root, utterances)
    if check_files:
        images = list(image_of.values())
        present = existing_files([u.audio_path for u in utterances] + images)
        usable = 0
        seen_images: set[str] = set()
        for u in utterances:
            if u.audio_path in present:
                usable += 1
            else:
                report.add("missing audio file", u.audio_path)
            if u.image_id not in seen_images:
                seen_images.add(u.image_id)
                if u.image_path not in present:
                    report.add("missing image file", u.image_path)
    else:
        usable = len(utterances)
    if usable == 0:
        why = "; ".join(report.lines()) or "it lists no utterances"
        raise ValueError(f"{root}: no usable utterances in this {kind} corpus: {why}")
    return Corpus(kind, str(root), utterances, report)


def _same_file(a: str, b: str) -> bool:
    """Two spellings of one file: a/./b and a/b, or a path through a symlink and the real one."""
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:   # one is missing: the missing-file report names it
        return False


def _one_per_id(root: Path, utterances: list[Utterance]) -> dict[str, str]:
    """{image id: image path}; ValueError where an image id names two files or a caption id has two texts:
    the stages embed each id once, so the other file's (or text's) utterances would be trained against the
    first one's embedding."""
    image_of: dict[str, str] = {}
    caption_of: dict[str, str] = {}
    for u in utterances:
        if image_of.setdefault(u.image_id, u.image_path) != u.image_path \
                and not _same_file(image_of[u.image_id], u.image_path):
            raise _two_under_one_id(root, utterances, u, "image", "image_path", "names two files", "file",
                                    "the file name without its extension")
        if caption_of.setdefault(u.caption_id, u.caption) != u.caption:
            raise _two_under_one_id(root, utterances, u, "caption", "caption", "has two texts", "text",
                                    "the utterance id", " or the same text")
    return image_of


def _two_under_one_id(root: Path, utterances: list[Utterance], u: Utterance, what: str, value: str, says: str,
                      item: str, default: str, other_fix: str = "") -> ValueError:
    """The error for utterance `u`, whose `what` id names another `value` than the id's first utterance's."""
    key = getattr(u, f"{what}_id")
    first = next(v for v in utterances if getattr(v, f"{what}_id") == key)
    show = repr if what == "caption" else str
    return ValueError(
        f"{root}: {what} id {key!r} {says}, {show(getattr(first, value))} (utterance {first.utt_id}) and "
        f"{show(getattr(u, value))} (utterance {u.utt_id}); each {what} is embedded once, by its id, so give each "
        f"{item} an id of its own (in a JSONL manifest a \"{what}_id\" field; the default is {default}){other_fix}")


def _split_name(raw: str, where: str) -> str:
    split = SPLIT_ALIASES.get(str(raw).strip().lower())
    if split is None:
        raise ValueError(f"{where}: unknown split {raw!r}; use one of train, dev (or val), test")
    return split


# ----------------------------------------------------------------------------------------------------
# Flickr8k Audio Caption Corpus + Flickr8k text + images (REFERENCE.md §5)

FLICKR_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Flickr8k_Dataset/Flicker8k_Dataset", "Images")
FLICKR_SPLIT_FILES = (("train", "Flickr_8k.trainImages.txt"), ("dev", "Flickr_8k.devImages.txt"),
                      ("test", "Flickr_8k.testImages.txt"))


FOLDER_SAMPLE = 50   # images looked for in each candidate folder


def _folder_holding(candidates: list[Path], names: list[str]) -> Path:
    """The first candidate folder that holds one of the first FOLDER_SAMPLE `names` (not only the first: one
    missing image must not send all the others to a folder where none is); else the first folder there is,
    else the first candidate (the missing-file report then names the paths)."""
    sample = names[:FOLDER_SAMPLE]
    for folder in candidates:
        if folder.is_dir() and any(os.path.isfile(os.path.join(folder, name)) for name in sample):
            return folder
    return next((folder for folder in candidates if folder.is_dir()), candidates[0])


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the Flickr8k layout needs it (see REFERENCE.md §5 / README)")
    lines = read_utf8(path).split("\n")
    if lines[-1] == "":    # the file's last newline ends a line; it does not start one
        lines.pop()
    return [line.rstrip("\r") for line in lines]


@_gc_paused
def read_flickr8k(root: str | os.PathLike, check_files: bool = True) -> Corpus:
    """Reads flickr_audio/{wavs,wav2capt.txt,wav2spk.txt}, Flickr8k_text/ and Flicker8k_Dataset/ under `root`."""
    root = Path(root).expanduser().resolve()
    report = CorpusReport("flickr8k", str(root))
    audio_dir, text_dir = root / "flickr_audio", root / "Flickr8k_text"
    split_of: dict[str, str] = {}
    for split, name in FLICKR_SPLIT_FILES:
        for line in _lines(text_dir / name):
            image = line.strip()
            if not image:
                continue
            if image in split_of and split_of[image] != split:
                report.add("image in two split lists (first kept)", f"{image} ({split_of[image]}, {split})")
                continue
            split_of.setdefault(image, split)
    image_dir = _folder_holding([root / d for d in FLICKR_IMAGE_DIRS], list(split_of))

    captions: dict[tuple[str, int], str] = {}
    token_file = text_dir / "Flickr8k.token.txt"
    for i, line in enumerate(_lines(token_file), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"(\S+?)#(\d+)\t(.*)", line)
        if m is None:
            report.add("malformed caption line", f"{token_file}:{i}")
            continue
        key, text = (m.group(1), int(m.group(2))), m.group(3).strip()
        if not text:
            report.add("empty caption text", f"{token_file}:{i}")
            continue
        if captions.setdefault(key, text) != text:
            report.add("caption id twice with other texts (first kept)", f"{token_file}:{i} {key[0]}#{key[1]}")

    speakers: dict[str, str] = {}
    spk_file = audio_dir / "wav2spk.txt"
    has_speakers = spk_file.is_file()
    if has_speakers:
        for i, line in enumerate(_lines(spk_file), 1):
            parts = line.split()
            if len(parts) == 2:
                speakers[parts[0]] = parts[1]
            elif parts:
                report.add("malformed speaker line", f"{spk_file}:{i}")
    else:
        report.add("no speaker list (speaker 'unknown')", str(spk_file))

    utterances: list[Utterance] = []
    seen: set[str] = set()
    spoken: set[tuple[str, int]] = set()
    capt_file = audio_dir / "wav2capt.txt"
    # plain strings: a pathlib join per utterance costs seconds over SpokenCOCO-sized lists
    wav_dir, image_dir_str = str(audio_dir / "wavs") + os.sep, str(image_dir) + os.sep
    for i, line in enumerate(_lines(capt_file), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or not re.fullmatch(r"#\d+", parts[2]) or not parts[0].lower().endswith(".wav"):
            report.add("malformed wav2capt line", f"{capt_file}:{i}")
            continue
        wav, image, n = parts[0], parts[1], int(parts[2][1:])
        utt_id = wav[: -len(".wav")]
        if utt_id in seen:
            report.add("duplicate utterance id (first kept)", f"{capt_file}:{i} {wav}")
            continue
        seen.add(utt_id)
        spoken.add((image, n))
        if image not in split_of:
            report.add("utterance of an image in no split list (left out)", f"{wav} -> {image}")
            continue
        caption = captions.get((image, n))
        if caption is None:
            report.add("no caption text for utterance (left out)", f"{wav} -> {image}#{n}")
            continue
        if wav not in speakers and has_speakers:
            report.add("utterance without speaker ('unknown')", wav)
        image_id = image.rsplit(".", 1)[0]
        utterances.append(Utterance(
            utt_id=utt_id, audio_path=wav_dir + wav, image_id=image_id,
            image_path=image_dir_str + image, caption=caption, caption_id=f"{image_id}#{n}",
            speaker=speakers.get(wav, "unknown"), split=split_of[image]))

    for (image, n) in captions:
        if image in split_of and (image, n) not in spoken:
            report.add("caption without audio", f"{image}#{n}")
    used = {u.image_path for u in utterances}
    for image, split in split_of.items():   # a split that falls short of its list says so
        if image_dir_str + image not in used:
            report.add("image in a split list without utterances (no wav2capt line with a caption)",
                       f"{image} ({split})")
    if check_files:
        _unlisted_wavs(audio_dir / "wavs", seen, report)
    return _finish("flickr8k", root, utterances, report, check_files)


def _unlisted_wavs(folder: Path, listed: set[str], report: CorpusReport) -> None:
    """Reports the wavs in `folder` that wav2capt.txt does not name (they are not read)."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.name.lower().endswith(".wav"))
    except OSError:
        return
    for name in names:
        if name[:-len(".wav")] not in listed:
            report.add("wav file that wav2capt.txt does not name (not read)", str(folder / name))


# ----------------------------------------------------------------------------------------------------
# SpokenCOCO (REFERENCE.md §5)


def _spokencoco_files(root: Path) -> list[tuple[Path, str]]:
    """The Karpathy-split files when present (they have a test split), else the original train/val files."""
    karpathy = [(root / f"SpokenCOCO_{s}_karpathy.json", s) for s in ("train", "val", "test")]
    karpathy = [(p, s) for p, s in karpathy if p.is_file()]
    if karpathy:
        return karpathy
    plain = [(root / f"SpokenCOCO_{s}.json", s) for s in ("train", "val")]
    plain = [(p, s) for p, s in plain if p.is_file()]
    if not plain:
        raise FileNotFoundError(f"{root}: no SpokenCOCO_{{train,val,test}}_karpathy.json or "
                                "SpokenCOCO_{train,val}.json here")
    return plain


def _split_from_filename(path: Path) -> str:
    m = re.fullmatch(r"SpokenCOCO_(\w+?)(?:_karpathy)?\.json", path.name)
    if m is None:
        raise ValueError(f"{path}: the split of a SpokenCOCO file is read from its name, "
                         "SpokenCOCO_{train,val,test}[_karpathy].json; rename it, or list its utterances in a "
                         "JSONL manifest (one line each, with a \"split\")")
    return _split_name(m.group(1), str(path))


@_gc_paused
def read_spokencoco(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                    check_files: bool = True) -> Corpus:
    """Reads SpokenCOCO JSON: a folder (Karpathy-split files preferred) or one JSON file.

    Audio paths ("wavs/...") are relative to the JSON's folder; image paths ("train2014/...") are resolved
    under `image_root`, else the first of ROOT, ROOT/images, ROOT/.. that holds the first image.
    """
    path = Path(path).expanduser().resolve()
    root = path.parent if path.is_file() else path
    files = [path] if path.is_file() else [p for p, _ in _spokencoco_files(root)]
    report = CorpusReport("spokencoco", str(path))

    entries: list[tuple[dict, str, str]] = []
    for file in files:
        split = _split_from_filename(file)
        try:
            data = json.loads(read_utf8(file))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e}); re-download the SpokenCOCO metadata") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ValueError(f"{file}: expected {{\"data\": [{{\"image\": ..., \"captions\": [...]}}]}}")
        entries.extend((item, split, f"{file}:data[{i}]") for i, item in enumerate(data["data"]))

    if image_root is None:
        images = [e[0]["image"] for e in entries[:FOLDER_SAMPLE]
                  if isinstance(e[0], dict) and isinstance(e[0].get("image"), str)]
        image_root = _folder_holding([root, root / "images", root.parent], images)
    image_root = Path(image_root).expanduser().resolve()

    utterances: list[Utterance] = []
    seen: set[str] = set()
    audio_root = str(root)
    for item, split, where in entries:
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) \
                or not isinstance(item.get("captions"), list):
            report.add("malformed entry", where)
            continue
        image_id, image_path = Path(item["image"]).stem, _under(str(image_root), item["image"])
        for n, cap in enumerate(item["captions"]):
            if not isinstance(cap, dict) or not cap.get("wav"):
                report.add("caption without audio", f"{where}.captions[{n}]")
                continue
            if not isinstance(cap.get("text"), str):
                report.add("malformed caption", f"{where}.captions[{n}]")
                continue
            utt_id = str(cap.get("uttid") or Path(cap["wav"]).stem)
            if utt_id in seen:
                report.add("duplicate utterance id (first kept)", f"{where}.captions[{n}] {utt_id}")
                continue
            seen.add(utt_id)
            utterances.append(Utterance(
                utt_id=utt_id, audio_path=_under(audio_root, cap["wav"]), image_id=image_id,
                image_path=image_path, caption=cap["text"].strip(),
                caption_id=f"{image_id}#{n}", speaker=str(cap.get("speaker", "unknown")), split=split))
    # the corpus is what was read: one file of a folder is another corpus than the folder's files together
    return _finish("spokencoco", path, utterances, report, check_files)


# ----------------------------------------------------------------------------------------------------
# Generic JSONL manifest

JSONL_FIELDS = "audio, image, caption, split (required); id, image_id, caption_id, speaker (optional)"


def _given(row: dict, key: str) -> str | None:
    """An optional field as a string: 0 is an id; null and "" are not given."""
    value = row.get(key)
    return None if value is None or str(value).strip() == "" else str(value).strip()


@_gc_paused
def read_jsonl(path: str | os.PathLike, check_files: bool = True) -> Corpus:
    """Reads a manifest with one JSON object per line; relative paths are relative to the manifest's folder.

    Fields: "audio", "image", "caption", "split" (train/dev/val/test) are required; "id" (default: the audio
    file's stem), "image_id" (default: the image file's stem), "caption_id" (default: the utterance id) and
    "speaker" (default "unknown") are optional.
    """
    path = Path(path).expanduser().resolve()
    root = path.parent
    report = CorpusReport("jsonl", str(path))
    utterances: list[Utterance] = []
    seen: set[str] = set()
    for i, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            report.add("malformed line (not JSON)", where)
            continue
        if not isinstance(row, dict) or not all(row.get(k) for k in ("audio", "image", "caption", "split")):
            report.add(f"line without one of audio, image, caption, split ({JSONL_FIELDS})", where)
            continue
        wrong = [k for k in ("audio", "image", "caption", "split") if not isinstance(row[k], str)]
        if wrong:
            report.add("audio, image, caption and split must be strings", f"{where} {wrong[0]}: {row[wrong[0]]!r}")
            continue
        if row["split"].strip().lower() not in SPLIT_ALIASES:
            report.add("unknown split (use train, dev/val, test)", f"{where} {row['split']!r}")
            continue
        audio, image = _under(str(root), row["audio"]), _under(str(root), row["image"])
        utt_id = _given(row, "id") or Path(audio).stem
        if utt_id in seen:
            report.add("duplicate utterance id (first kept)", f"{where} {utt_id}")
            continue
        seen.add(utt_id)
        utterances.append(Utterance(
            utt_id=utt_id, audio_path=audio, image_id=_given(row, "image_id") or Path(image).stem,
            image_path=image, caption=row["caption"].strip(),
            caption_id=_given(row, "caption_id") or utt_id, speaker=_given(row, "speaker") or "unknown",
            split=_split_name(row["split"], where)))
    return _finish("jsonl", path, utterances, report, check_files)
