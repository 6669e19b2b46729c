"""The cache's self-description: the manifest `cache.json`, `records.jsonl` and `failures.jsonl`.

Every write that replaces a file goes through a temporary file and `os.replace`, so a killed stage never
leaves a half-written manifest behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shlex
import shutil
import stat
import tempfile
from typing import Any, Iterable, Iterator

MANIFEST = "cache.json"
RECORDS = "records.jsonl"
FAILURES = "failures.jsonl"
# The stage that writes records.jsonl, named in the error a reader gets when it is missing.
RECORDS_STAGE = "extract-audio"
FAILURE_KEYS = ("stage", "id", "reason")  # required; "path" is optional (keyword prompts have none)
_LOCK = ".cache.json.lock"
# The stores (folders of parts) in a cache, and what the stages write beside their parts
AUDIO_STORE = "audio"                # extract-audio: features per utterance
IMAGE_STORE = "images"               # embed-images: CLIP image embedding per image id
TEXT_STORE = "texts"                 # ... written caption embedding per caption id
KEYWORD_STORE = "keywords"           # ... keyword prompt embedding per keyword
SPEAKER_CMVN = "speaker_cmvn.json"   # AUDIO_STORE/: per-speaker statistics (features normalised by speaker)


class CacheMismatchError(ValueError):
    """A stage asked for settings other than those the cache was made with."""


def fsync_path(path) -> None:
    """fsync a file or a folder by path (a folder, so that a rename in it reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask can only be read by setting it


def _streamed(path: pathlib.Path) -> bool:
    """True for a path that must be written into rather than replaced: a pipe, a terminal or another device
    (`--json /dev/stdout`, `--json >(jq .)`), or a file a shell opened for this process (/dev/fd/N,
    /proc/self/fd/N), which a rename would take from under it."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISDIR(mode):
        return False
    return not stat.S_ISREG(mode) or str(path).startswith(("/dev/", "/proc/"))


@contextlib.contextmanager
def atomic_target(path) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path` to write; on success it is fsynced and renamed to `path`
    (`os.replace`), on an exception deleted. Readers see the old file or the new one, never half of one.
    A symlink is followed (the file it names is replaced; the link stays); a pipe or device gets the bytes
    written into it once they are complete."""
    path = pathlib.Path(path)
    if _streamed(path):
        with tempfile.TemporaryDirectory(prefix="clipspeech-") as folder:
            tmp = pathlib.Path(folder) / path.name
            yield tmp
            try:
                with open(tmp, "rb") as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except OSError as e:
                raise OSError(e.errno, f"{path}: {e.strerror}") from None
        return
    if path.is_symlink():
        path = pathlib.Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; a plain open() would honour the umask
        yield pathlib.Path(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync, then `os.replace`."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)


def read_utf8(path) -> str:
    """A text file the user gives (corpus lists, keywords, configs): its text, or a ValueError naming the
    file, the line of the first byte that is not UTF-8 and the fix (a bare UnicodeDecodeError names none)."""
    data = pathlib.Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")   # a byte-order mark (Windows editors write one) is not text
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); convert it, "
                         f"e.g. `iconv -f latin1 -t utf-8 {path} > fixed && mv fixed {path}`") from None


def atomic_write_text(path, text: str) -> None:
    """Write utf-8 `text` to `path` atomically (temporary file + fsync + `os.replace`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj: Any, what: str, indent: int | None = None) -> str:
    """`obj` as JSON text (keys sorted); ValueError naming `what` when it holds something JSON cannot hold."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, sort_keys=True, indent=indent)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must hold only JSON values (str, int, float, bool, None, list, dict): "
                         f"{err}") from None


def atomic_write_json(path, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, to_json(obj, str(path), indent=2) + "\n")


def read_manifest(cache_dir) -> dict:
    """The manifest of `cache_dir` as a dict; {} when the cache has none yet."""
    path = pathlib.Path(cache_dir) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore it or delete the cache folder "
                         f"{path.parent} and run the stages again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(manifest).__name__}; delete it "
                         "and run the stages again")
    return manifest


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def settings_diff(cached: dict, requested: dict, prefix: str = "", holder: str = "cache") -> list[str]:
    """One line per differing setting, nested keys joined by dots; `holder` names what holds `cached`.

    e.g. ["features.n_mels: cache has 80, requested 40", "features.lifter: cache has 22, requested (absent)"].
    Both sides are compared as JSON sees them, so a tuple equals the list that the manifest read back.
    """
    cached = json.loads(to_json(cached, "cached settings"))
    requested = json.loads(to_json(requested, "requested settings"))
    return _diff(cached, requested, prefix, holder)


def _diff(cached: Any, requested: Any, prefix: str, holder: str = "cache") -> list[str]:
    if isinstance(cached, dict) and isinstance(requested, dict):
        lines = []
        for key in sorted(set(cached) | set(requested)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in requested:
                lines.append(f"{name}: {holder} has {_show(cached[key])}, requested (absent)")
            elif key not in cached:
                lines.append(f"{name}: {holder} has (absent), requested {_show(requested[key])}")
            else:
                lines.extend(_diff(cached[key], requested[key], name, holder))
        return lines
    # bool is an int in Python: True must not silently equal 1.
    if cached == requested and type(cached) is type(requested) or _same_number(cached, requested):
        return []
    return [f"{prefix or '(value)'}: {holder} has {_show(cached)}, requested {_show(requested)}"]


def _same_number(a: Any, b: Any) -> bool:
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and a == b)


_HELD_LOCKS: set[int] = set()   # descriptors of the locks (file_lock, shard_lock) this process holds


def _drop_held_locks() -> None:
    """In a forked child (a stage's worker): its copies of the held locks' descriptors are pointed at
    /dev/null. A flock belongs to every copy, so a worker outliving a killed main process (kill -9) would
    otherwise hold the lock, and every rerun would be refused as busy until someone found and killed it."""
    if _HELD_LOCKS:
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            for fd in _HELD_LOCKS:
                os.dup2(null, fd)   # not close: the child's file object still owns the number
        finally:
            os.close(null)
        _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_held_locks)


@contextlib.contextmanager
def file_lock(path, wait: bool = True) -> Iterator[None]:
    """An exclusive lock (flock) on the file `path`, created if needed; the kernel drops it when its holder
    dies, so a killed stage never leaves a lock behind. wait=False: BlockingIOError where another holds it."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        _HELD_LOCKS.add(lock.fileno())
        try:
            yield
        finally:
            _HELD_LOCKS.discard(lock.fileno())
            fcntl.flock(lock, fcntl.LOCK_UN)


class StageBusyError(ValueError):
    """Another process runs the same stage on the same shard of a cache."""


@contextlib.contextmanager
def shard_lock(cache_dir, stage: str, shard: tuple[int, int]) -> Iterator[None]:
    """Held while a stage works on its shard of a cache: a second process on the same shard (a requeued
    array job whose first run is still alive, a command started twice) would delete the parts the first is
    writing as leftovers of a killed run. flock: the kernel drops it when its holder dies."""
    i, n = shard
    path = pathlib.Path(cache_dir) / f".{stage}-shard-{i}-of-{n}.lock"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(path, wait=False))
        except BlockingIOError:
            raise StageBusyError(f"another {stage} is running --shard {i}/{n} on {cache_dir} (it holds {path}); "
                                 "wait for it to finish or stop it, then run this again") from None
        yield


def _manifest_lock(cache_dir: pathlib.Path):
    # Stages of one cache may run at once (shards, audio next to images): the read-modify-write of the
    # manifest must not lose a section that another process added meanwhile.
    return file_lock(cache_dir / _LOCK)


def claim_section(cache_dir, section: str, settings: dict, fix: str = "") -> None:
    """Record `settings` under `section` of the manifest, or check that they equal what is there.

    Absent section: written (atomically, under a lock). Equal: nothing happens. Different:
    CacheMismatchError naming the cache folder, the section, every differing setting and `fix`.
    """
    cache_dir = pathlib.Path(cache_dir)
    settings = json.loads(to_json(settings, f"settings of section {section!r}"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(cache_dir):
        manifest = read_manifest(cache_dir)
        if section not in manifest:
            manifest[section] = settings
            atomic_write_json(cache_dir / MANIFEST, manifest)
            return
        diffs = _diff(manifest[section], settings, section)
    if diffs:
        lines = "\n  ".join(diffs)
        hint = f"\nFix: {fix}" if fix else ""
        raise CacheMismatchError(f"cache {cache_dir} was made with other {section!r} settings than "
                                 f"requested:\n  {lines}{hint}")


def replace_section(cache_dir, section: str, settings: dict) -> None:
    """Overwrite `section` of the manifest (atomically, under the lock): for a recorded fact that may change
    without making the cache another one, such as where the corpus lies."""
    cache_dir = pathlib.Path(cache_dir)
    settings = json.loads(to_json(settings, f"settings of section {section!r}"))
    with _manifest_lock(cache_dir):
        manifest = read_manifest(cache_dir)
        manifest[section] = settings
        atomic_write_json(cache_dir / MANIFEST, manifest)


def records_text(records: list[dict]) -> str:
    """records.jsonl's text for `records` (one JSON object each, e.g. an Utterance as a dict)."""
    return "".join(to_json(r, f"record {i} for {RECORDS}") + "\n" for i, r in enumerate(records))


def write_records(cache_dir, records: list[dict]) -> None:
    """Write `records` to records.jsonl atomically."""
    atomic_write_text(pathlib.Path(cache_dir) / RECORDS, records_text(records))


def _read_jsonl(path: pathlib.Path, tolerate_torn_tail: bool) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            # An appender killed mid-write leaves its last line without a newline: not an error.
            if tolerate_torn_tail and number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path} line {number} is not valid JSON ({err}); delete the file and run "
                             "the stage that writes it again") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} must be a JSON object; delete the file and run the "
                             "stage that writes it again")
        rows.append(row)
    return rows


def check_prompt(prompt: str) -> None:
    """A keyword-prompt template as embed-images fills it (and the keyword store records it): one '{}' where
    the keyword goes, '{{' for a literal brace; ValueError otherwise."""
    try:
        filled = prompt.format("KEYWORD")
    except (IndexError, KeyError, ValueError):
        filled = ""
    if "{}" not in prompt or "KEYWORD" not in filled:
        raise ValueError(f"--prompt {prompt!r}: a template with one '{{}}' where the keyword goes ('{{{{' for a "
                         "literal brace), as embed-images fills it, e.g. 'this is a photo of a {}'")


def stage_command(cache_dir, stage: str, manifest: dict | None = None) -> str:
    """The command line that runs `stage` on this cache, filled in with what cache.json knows (the corpus,
    the teacher), for messages that send the user there: one that can be copied."""
    manifest = read_manifest(cache_dir) if manifest is None else manifest
    root = manifest.get("corpus", {}).get("root")
    words = ["clipspeech", stage, "--data", shlex.quote(root) if root else "CORPUS",
             "--cache", shlex.quote(str(cache_dir))]
    if stage == "embed-images":
        clip = manifest.get("clip") or {}
        model = clip.get("model")
        words += ["--model", "local-dir:PATH" if model == "local-dir" else shlex.quote(model) if model else "NAME"]
        if not clip:
            words += ["--pretrained", "TAG|PATH|none"]
        elif model != "local-dir":   # a checkpoint file is recorded by its sha256 only
            tag = clip.get("pretrained")
            words += ["--pretrained", shlex.quote(tag) if tag else "PATH" if clip.get("weights_sha256") else "none"]
        # the settings its parts were made with, which a rerun must repeat
        precision, decode, dtype = clip.get("precision"), clip.get("image_decode"), clip.get("dtype")
        words += ["--device cuda"] * (precision == "bf16-autocast") + ["--gpu-decode"] * (decode == "torchvision") \
            + ["--no-draft"] * (decode == "pil") + ["--dtype float32"] * (dtype == "float32")
    return " ".join(words)


def read_records(cache_dir) -> list[dict]:
    """The records of records.jsonl in file (corpus) order."""
    path = pathlib.Path(cache_dir) / RECORDS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it is written by the {RECORDS_STAGE} stage; run "
                                f"`{stage_command(cache_dir, RECORDS_STAGE)}` first")
    records = _read_jsonl(path, tolerate_torn_tail=False)
    expected = read_manifest(cache_dir).get("corpus", {}).get("utterances")
    if expected is not None and len(records) != expected:
        raise ValueError(f"{path} holds {len(records)} utterances, but the corpus in cache.json has {expected}: "
                         f"the file was cut short or edited; run `{stage_command(cache_dir, RECORDS_STAGE)}` "
                         "again, which writes it anew (the features are kept)")
    return records


def records_complete(cache_dir, utterances: int) -> bool:
    """Whether records.jsonl is there with `utterances` whole lines (not cut short, not torn)."""
    path = pathlib.Path(cache_dir) / RECORDS
    if not path.is_file():
        return False
    return whole_lines(path.read_bytes(), utterances)


def whole_lines(data: bytes, lines: int) -> bool:
    """Whether `data` is `lines` whole lines, the last one ended too (not cut short, not torn)."""
    return data.count(b"\n") == lines and (not data or data.endswith(b"\n"))


def _failure_lines(failures: Iterable[dict], stage: str | None = None) -> list[str]:
    lines = []
    for failure in failures:
        missing = [k for k in FAILURE_KEYS if not isinstance(failure, dict) or k not in failure]
        if missing:
            raise ValueError(f"a failure record needs the keys {FAILURE_KEYS} (and optionally 'path'); "
                             f"{failure!r} lacks {missing}")
        if stage is not None and failure["stage"] != stage:
            raise ValueError(f"failure {failure!r} belongs to stage {failure['stage']!r}, not {stage!r}")
        lines.append(to_json({"path": None, **failure}, "failure record") + "\n")
    return lines


def record_stage_failures(cache_dir, stage: str, failures: Iterable[dict]) -> None:
    """Replace every failure of `stage` in failures.jsonl by `failures` (atomically), so a stage that
    re-reports its failures on a rerun does not list them twice. Other stages' lines are kept."""
    lines = _failure_lines(failures, stage)
    cache_dir = pathlib.Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(cache_dir):
        kept = [to_json(row, "failure record") + "\n" for row in read_failures(cache_dir)
                if row.get("stage") != stage]
        atomic_write_text(cache_dir / FAILURES, "".join(kept + lines))


def read_failures(cache_dir) -> list[dict]:
    """Every failure appended so far, oldest first; [] when there is no failures.jsonl."""
    path = pathlib.Path(cache_dir) / FAILURES
    if not path.is_file():
        return []
    return _read_jsonl(path, tolerate_torn_tail=True)
