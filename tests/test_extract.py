"""The extract-audio stage end to end on a tiny Flickr8k-layout corpus: both store formats read back by
independent readers, resume after kill -9, shards, bad files and options, and speaker-level CMVN."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from cache.index import build_index
from cache.manifest import AUDIO_STORE, SPEAKER_CMVN, claim_section, read_failures, read_manifest, read_records
from cache.reader import StoreReader
from cache.store import PartWriter, completed_parts, plan_parts, unescape_key
from cli import main
from corpora import speechlike, write_tiny_flickr
from pipeline.audio import load_audio
from pipeline.extract import ExtractConfig, TooManyFailures, extract_audio
from pipeline.features import compute
from pipeline.recipes import get_recipe
from trainer.data import load_split

REPO = Path(__file__).resolve().parents[1]
PART = 2          # utterances per part: many parts, so a kill lands between them
IMAGES = 12       # x 5 captions = 60 utterances, 30 parts


def run(corpus: Path, cache: Path, **options):
    return extract_audio(ExtractConfig(data=corpus, cache=cache, workers=2, part_size=PART, progress=False,
                                       **options))


def load(cache: Path):
    with StoreReader(cache / AUDIO_STORE) as reader:
        return reader.load_all()


def cli(*args: str):
    """The command in this process; exit code and everything it printed."""
    result = CliRunner().invoke(main, ["extract-audio", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    return result.exit_code, result.output


def assert_same_cache(a: Path, b: Path) -> None:
    feats_a, offsets_a, ids_a = load(a)
    feats_b, offsets_b, ids_b = load(b)
    assert ids_a == ids_b
    assert np.array_equal(offsets_a, offsets_b)
    assert feats_a.dtype == feats_b.dtype and feats_a.tobytes() == feats_b.tobytes()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_tiny_flickr(tmp_path_factory.mktemp("corpus"), images=IMAGES)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, corpus):
    """Uninterrupted runs, one per format, made on first use; the tests only read them."""
    made = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            made[fmt] = tmp_path_factory.mktemp(f"clean_{fmt}")
            summary = run(corpus, made[fmt], fmt=fmt)
            assert summary.written == 5 * IMAGES and summary.indexed == 5 * IMAGES
        return made[fmt]
    return get


# ---- round trip ----

@pytest.mark.parametrize("fmt", ["hdf5", "wds"])
def test_round_trip_read_by_our_reader_and_the_format_s_own(corpus, caches, fmt):
    cache = caches(fmt)
    records = read_records(cache)
    recipe = get_recipe("mfcc-seed")
    feats, offsets, ids = load(cache)
    assert ids == [r["utt_id"] for r in records] and len(ids) == 5 * IMAGES  # corpus order, all of them
    for i, r in enumerate(records):
        stored = feats[offsets[i]:offsets[i + 1]]
        reference = compute(recipe, load_audio(r["audio_path"])).numpy()  # one utterance, no batching
        assert stored.dtype == np.float16 and stored.shape == reference.shape == (len(stored), 39)
        np.testing.assert_allclose(stored.astype(np.float32), reference, rtol=2e-3, atol=2e-3)

    # the format's own reader, knowing nothing of clipspeech
    parts = [str(p) for p in completed_parts(cache / AUDIO_STORE).values()]
    assert len(parts) == len(plan_parts(5 * IMAGES, PART))
    seen = {}
    if fmt == "wds":
        import webdataset
        for sample in webdataset.WebDataset(parts, shardshuffle=False).decode():
            seen[unescape_key(sample["__key__"])] = (sample["npy"], sample["json"])
    else:
        for path in parts:
            with h5py.File(path, "r") as f:
                part_ids = [b.decode() for b in f["ids"][:]]
                rows, metas = f["offsets"][:], [json.loads(m) for m in f["meta"][:]]
                for k, key in enumerate(part_ids):
                    seen[key] = (f["features"][rows[k]:rows[k + 1]], metas[k])
    assert list(seen) == ids
    for i, r in enumerate(records):
        array, meta = seen[r["utt_id"]]
        assert np.array_equal(array, feats[offsets[i]:offsets[i + 1]])
        assert meta["speaker"] == r["speaker"] and meta["caption_id"] == r["caption_id"]

    # the cache says what it holds: corpus, splits, feature settings
    manifest = read_manifest(cache)
    assert manifest["corpus"]["kind"] == "flickr8k" and manifest["corpus"]["utterances"] == 5 * IMAGES
    assert manifest["corpus"]["splits"] == {"train": 30, "dev": 15, "test": 15}
    assert manifest["audio"] == {"format": fmt, "features": recipe.to_dict(), "part_size": PART}
    assert read_failures(cache) == []


def test_batched_device_path_matches_the_per_worker_path(tmp_path, corpus, caches):
    # one utterance per batch, where the workers batch a part's two: the float maths differs slightly
    summary = run(corpus, tmp_path, batch_device="cpu", batch_size=1)
    assert summary.written == 5 * IMAGES and summary.indexed == 5 * IMAGES
    feats, offsets, ids = load(tmp_path)
    clean_feats, clean_offsets, clean_ids = load(caches("hdf5"))
    assert ids == clean_ids and np.array_equal(offsets, clean_offsets)
    np.testing.assert_allclose(feats.astype(np.float32), clean_feats.astype(np.float32), rtol=2e-3, atol=2e-3)


# ---- settings and bad options ----

def test_appending_with_other_settings_is_refused_naming_them(corpus, caches):
    cache = caches("hdf5")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (cache / AUDIO_STORE).iterdir())
    base = ["--data", str(corpus), "--cache", str(cache), "--part-size", str(PART)]
    code, out = cli(*base, "--option", "n_mels=40")
    assert code == 1 and "audio.features.n_mels: cache has 80, requested 40" in out
    assert "Fix:" in out and "Traceback" not in out
    code, out = cli(*base, "--format", "wds", "--features", "fbank")
    assert code == 1 and 'audio.format: cache has "hdf5", requested "wds"' in out
    assert 'audio.features.name: cache has "mfcc-seed", requested "fbank"' in out
    code, out = cli("--data", str(corpus), "--cache", str(cache), "--part-size", "3")
    assert code == 1 and "audio.part_size: cache has 2, requested 3" in out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (cache / AUDIO_STORE).iterdir()) == before


def test_bad_options_fail_before_any_work_with_a_clear_message(tmp_path, corpus):
    cache = tmp_path / "cache"
    cases = [
        (["--data", str(corpus), "--features", "mfcc-nope"], "unknown feature recipe 'mfcc-nope'"),
        (["--data", str(corpus), "--option", "n_mel=40"], "unknown option(s) n_mel for recipe 'mfcc-seed'"),
        (["--data", str(corpus), "--option", "n_mfcc=99"], "n_mfcc=99 is invalid"),
        (["--data", str(tmp_path / "nowhere")], "no such corpus file or folder"),
        (["--data", str(tmp_path)], "not a corpus clipspeech can read"),
        (["--data", str(corpus), "--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
        (["--data", str(corpus), "--shard", "4/4"], "--shard 4/4: expected I/N with 0 <= I < N"),
        (["--data", str(corpus), "--shard", "1-4"], "'1-4' is not I/N, e.g. 0/4"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--data", str(corpus), "--device", "cuda"], "torch sees no CUDA device here"))
    for args, message in cases:
        code, out = cli(*args, "--cache", str(cache))
        assert code != 0 and message in out and "Traceback" not in out, out
        assert not (cache / AUDIO_STORE).exists()
    (tmp_path / "file").write_text("x")
    code, out = cli("--data", str(corpus), "--cache", str(tmp_path / "file"))
    assert code != 0 and "file" in out and "Traceback" not in out


# ---- crash safety and shards ----

def test_rerun_after_kill_9_finishes_and_equals_an_uninterrupted_run(tmp_path, corpus, caches):
    cache, store = tmp_path / "cache", tmp_path / "cache" / AUDIO_STORE
    n_parts = len(plan_parts(5 * IMAGES, PART))
    # one worker, so the run lasts long enough to be caught half way
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "extract-audio", "--data", str(corpus),
                             "--cache", str(cache), "--part-size", str(PART), "--workers", "1"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            # killed while a part is being written, after at least one was completed
            if 1 <= len(completed_parts(store)) < n_parts and list(store.glob("part-*.h5.tmp-*")):
                break
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed half way"
    done = completed_parts(store)
    assert 1 <= len(done) < n_parts and not (store / "index.h5").exists()
    if not list(store.glob("part-*.h5.tmp-*")):  # the part in flight was renamed just before the kill
        (store / f"part-{min(set(range(n_parts)) - set(done)):05d}.h5.tmp-99999").write_bytes(b"torn")

    summary = run(corpus, cache)
    assert summary.parts_skipped == len(done) and summary.parts_done == n_parts - len(done)
    assert summary.indexed == 5 * IMAGES
    assert not [p.name for p in store.rglob("*.tmp-*")]
    assert_same_cache(cache, caches("hdf5"))


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie that no init reaps in a container has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the workers' parent-death signal is Linux's")
def test_kill_9_of_the_main_process_alone_takes_its_workers_and_lock_with_it(tmp_path, corpus, caches):
    """The OOM killer takes the biggest process, the main one, not the group: its worker must not live on,
    waiting forever for work and holding the shard lock, so that every rerun is refused as busy."""
    cache, store = tmp_path / "cache", tmp_path / "cache" / AUDIO_STORE
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "extract-audio", "--data", str(corpus),
                             "--cache", str(cache), "--part-size", str(PART), "--workers", "1"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline, workers = time.monotonic() + 120, []
    try:
        while proc.poll() is None and time.monotonic() < deadline and not completed_parts(store):
            time.sleep(0.002)
        workers = [int(pid) for pid in children.read_text().split()] if proc.poll() is None else []
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert workers, "the run ended before it could be killed half way"
        deadline = time.monotonic() + 20
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "a worker outlived the killed main process"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    summary = run(corpus, cache)        # not refused as busy
    assert summary.indexed == 5 * IMAGES
    assert_same_cache(cache, caches("hdf5"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_scheduler_s_sigterm_stops_between_parts_and_the_rerun_resumes(tmp_path, corpus, caches, sig):
    """SIGTERM to the whole process group (Slurm's notice): the workers finish the parts in hand, the queued
    ones are cancelled, nothing half-written is left, the command says so and exits 143; a rerun resumes."""
    cache, store = tmp_path / "cache", tmp_path / "cache" / AUDIO_STORE
    n_parts = len(plan_parts(5 * IMAGES, PART))
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "extract-audio", "--data", str(corpus),
                             "--cache", str(cache), "--part-size", str(PART), "--workers", "1"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if 1 <= len(completed_parts(store)) < n_parts - 4:
            break
        time.sleep(0.002)
    os.killpg(proc.pid, sig)                 # SIGINT: Ctrl-C, which the terminal sends to the group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"extract-audio: {signal.Signals(sig).name} received: stopped; the parts it completed are kept" in err
    assert "Traceback" not in err
    done = completed_parts(store)
    assert 1 <= len(done) < n_parts and not (store / "index.h5").exists()
    assert not [p.name for p in store.rglob("*.tmp-*")]          # the part in hand was finished, not left
    summary = run(corpus, cache)
    assert summary.parts_skipped == len(done) and summary.indexed == 5 * IMAGES
    assert_same_cache(cache, caches("hdf5"))


def test_shards_write_one_cache_that_equals_a_single_run(tmp_path, corpus, caches):
    cache = tmp_path / "cache"
    first = run(corpus, cache, shard=(0, 2))
    n_parts = len(plan_parts(5 * IMAGES, PART))
    assert first.indexed is None and first.missing_parts == list(range(1, n_parts, 2))
    assert not (cache / AUDIO_STORE / "index.h5").exists()
    assert any("index: not built yet" in line and "--index-only" in line for line in first.lines())

    code, out = cli("--data", str(corpus), "--cache", str(cache), "--part-size", str(PART), "--index-only")
    assert code == 1 and f"{n_parts // 2} of {n_parts} parts are missing" in out and "part-00001.h5" in out
    assert "Traceback" not in out

    second = run(corpus, cache, shard=(1, 2))
    assert second.indexed == 5 * IMAGES and second.parts_done == n_parts // 2
    assert_same_cache(cache, caches("hdf5"))


def test_a_corpus_moved_between_runs_is_followed(tmp_path, corpus, caches):
    """A killed (here: half-sharded) run finishes on the corpus copied elsewhere, e.g. to local disk; the
    cache then names the files at the new place (the report links them). Another corpus is still refused."""
    cache, moved = tmp_path / "cache", tmp_path / "scratch" / "corpus"
    run(corpus, cache, shard=(0, 2))
    shutil.copytree(corpus, moved)
    second = run(moved, cache, shard=(1, 2))
    assert second.indexed == 5 * IMAGES
    assert f"corpus moved from {corpus} to {moved} (the same {5 * IMAGES} utterances)" in "\n".join(second.lines())
    assert_same_cache(cache, caches("hdf5"))
    assert json.loads((cache / "cache.json").read_text())["corpus"]["root"] == str(moved)
    records = read_records(cache)
    assert len(records) == 5 * IMAGES and all(r["audio_path"].startswith(str(moved)) for r in records)
    assert all(Path(r["image_path"]).is_file() for r in records)

    other = write_tiny_flickr(tmp_path / "other", images=IMAGES - 1)
    code, out = cli("--data", str(other), "--cache", str(cache), "--part-size", str(PART))
    assert code == 1 and f'corpus.root: cache has "{moved}", requested "{other}"' in out
    assert "corpus.ids_sha1" in out and "Traceback" not in out
    assert json.loads((cache / "cache.json").read_text())["corpus"]["root"] == str(moved)
    # the moved corpus itself with another feature setting: the setting is what differs, not the corpus
    code, out = cli("--data", str(corpus), "--cache", str(cache), "--part-size", str(PART + 1))
    assert code == 1 and f"audio.part_size: cache has {PART}, requested {PART + 1}" in out
    assert "corpus.root" not in out and "pass the settings it was made with" in out


def test_failures_name_the_files_where_the_corpus_lies_now(tmp_path):
    """A failure recorded before the corpus moved names the file at its new place, where it can be fixed."""
    first = write_tiny_flickr(tmp_path / "first", images=1)
    bad = sorted((first / "flickr_audio" / "wavs").glob("*.wav"))[0]
    bad.write_bytes(b"not a sound file" * 40)
    cache = tmp_path / "cache"
    run(first, cache)
    moved = tmp_path / "moved"
    first.rename(moved)
    run(moved, cache)
    assert [f["path"] for f in read_failures(cache)] == [str(moved / "flickr_audio" / "wavs" / bad.name)]


def test_records_follow_a_corpus_split_or_captioned_anew(tmp_path, corpus):
    """The same utterances, split anew (dev and test lists swapped, another size) or with corrected captions:
    the features stay, and records.jsonl, which train and evaluate take the splits and captions from, follows
    the corpus instead of keeping the old ones; the note says what changed and what embed-images must redo."""
    from pipeline.corpus import read_corpus
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    cache = tmp_path / "cache"
    run(copy, cache)
    (cache / "texts").mkdir()                            # as if embed-images had run
    text = copy / "Flickr8k_text"
    dev, test = (text / "Flickr_8k.devImages.txt").read_text().split(), \
        (text / "Flickr_8k.testImages.txt").read_text().split()
    (text / "Flickr_8k.devImages.txt").write_text("\n".join(test + dev[:1]) + "\n")
    (text / "Flickr_8k.testImages.txt").write_text("\n".join(dev[1:]) + "\n")
    tokens = text / "Flickr8k.token.txt"
    first = tokens.read_text().splitlines()[0]
    tokens.write_text(tokens.read_text().replace(first, first + " corrected", 1))
    summary = run(copy, cache)
    assert summary.parts_done == 0
    said = "\n".join(summary.lines())
    assert "records.jsonl follows the corpus, whose utterances changed: caption (1), split (" in said
    assert f"the caption embeddings in {cache / 'texts'} are of the old texts" in said
    want = read_corpus(copy)
    assert read_records(cache) == [u.to_dict() for u in want.utterances]
    assert json.loads((cache / "cache.json").read_text())["corpus"]["splits"] == want.split_counts()
    assert "follows the corpus" not in "\n".join(run(copy, cache).lines())    # once


def test_records_say_when_an_image_file_changed_under_its_id(tmp_path):
    """A JSONL manifest that points an image id at another file: the image embeddings are of the old file."""
    from pipeline.corpus import read_corpus
    flickr = write_tiny_flickr(tmp_path / "flickr", images=2)
    rows = [{"audio": u.audio_path, "image": u.image_path, "caption": u.caption, "split": u.split,
             "id": u.utt_id, "image_id": u.image_id} for u in read_corpus(flickr).utterances]
    manifest, cache = tmp_path / "m.jsonl", tmp_path / "cache"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(manifest, cache)
    (cache / "images").mkdir()                            # as if embed-images had run
    moved = tmp_path / "better.jpg"
    shutil.copy(rows[0]["image"], moved)
    manifest.write_text("".join(json.dumps({**r, "image": str(moved)} if r["image_id"] == rows[0]["image_id"]
                                           else r) + "\n" for r in rows))
    said = "\n".join(run(manifest, cache).lines())
    assert "image_path (5)" in said and f"the image embeddings in {cache / 'images'} are of the old image files" in said


# ---- bad input files ----

def spoil(corpus: Path) -> dict[str, str]:
    """Replaces some utterances' audio by bad files; returns {utterance id: expected reason}."""
    wavs = corpus / "flickr_audio" / "wavs"
    ids = sorted(p.stem for p in wavs.glob("*.wav"))
    rng = np.random.default_rng(3)
    nan = speechlike(rng, 0.5)
    nan[1000:1010] = np.nan

    def pcm(samples):
        return lambda p: sf.write(p, samples, 16000, subtype="PCM_16")
    writers = {
        "unreadable": lambda p: p.write_bytes(b"this is not a sound file" * 40),
        "empty file (0 bytes)": lambda p: p.write_bytes(b""),
        "empty (0 samples)": pcm(np.zeros(0, np.float32)),
        "contains NaN or Inf samples": lambda p: sf.write(p, nan, 16000, subtype="FLOAT"),
        "too short for one frame": pcm(0.3 * rng.standard_normal(100)),
        "silent (all samples zero)": pcm(np.zeros(8000, np.float32)),
        "missing file": lambda p: p.unlink(),
        "a folder, not a file": lambda p: (p.unlink(), p.mkdir()),
    }
    expected = {}
    for utt_id, (reason, write) in zip(ids[1::3], writers.items()):
        write(wavs / f"{utt_id}.wav")
        expected[utt_id] = reason
    return expected


@pytest.mark.parametrize("fmt", ["hdf5", "wds"])
def test_fixed_files_are_picked_up_by_retry_failed(tmp_path, fmt):
    """The error says: fix those files and run again with --retry-failed. A plain rerun keeps the parts (and
    their failures); --retry-failed computes the parts with failures again, and the cache then equals one made
    from good files throughout, failures.jsonl emptied."""
    good = write_tiny_flickr(tmp_path / "good", images=4)
    corpus = tmp_path / "corpus"
    shutil.copytree(good, corpus)
    expected = spoil(corpus)
    base = ["--data", str(corpus), "--part-size", "4", "--workers", "2", "--format", fmt]
    cache = tmp_path / "cache"
    code, out = cli(*base, "--cache", str(cache), "--max-failures", "0")
    assert code == 1 and "run again with --retry-failed" in out
    for utt_id in expected:   # the files fixed
        if (corpus / "flickr_audio" / "wavs" / f"{utt_id}.wav").is_dir():
            (corpus / "flickr_audio" / "wavs" / f"{utt_id}.wav").rmdir()
        shutil.copy(good / "flickr_audio" / "wavs" / f"{utt_id}.wav", corpus / "flickr_audio" / "wavs")
    code, out = cli(*base, "--cache", str(cache), "--max-failures", "0")
    assert code == 1 and "this run wrote 0 parts" in out          # a plain rerun resumes, no more
    done_before = {k: p.stat().st_mtime_ns for k, p in completed_parts(cache / AUDIO_STORE).items()}
    code, out = cli(*base, "--cache", str(cache), "--max-failures", "0", "--retry-failed")
    assert code == 0, out
    failed_parts = {k for k in done_before if any(u in expected for u in plan_ids(good, k))}
    assert f"({len(failed_parts)} computed again for their failures)" in out and "none failed" in out
    assert read_failures(cache) == []
    after = {k: p.stat().st_mtime_ns for k, p in completed_parts(cache / AUDIO_STORE).items()}
    assert {k for k in after if after[k] != done_before[k]} == failed_parts   # the other parts were kept
    clean = tmp_path / "clean"
    cli("--data", str(good), "--part-size", "4", "--workers", "2", "--format", fmt, "--cache", str(clean))
    assert_same_cache(cache, clean)


def plan_ids(corpus: Path, part: int, size: int = 4) -> list[str]:
    from pipeline.corpus import read_corpus
    return [u.utt_id for u in read_corpus(corpus).utterances][part * size:(part + 1) * size]


@pytest.mark.parametrize("cut", ["lines", "torn"])
def test_a_records_file_cut_short_is_named_and_written_anew(tmp_path, corpus, caches, cut):
    """records.jsonl holds what train and evaluate score: one cut short (a full disk, an edit) must not
    quietly leave utterances out; extract-audio writes it again."""
    cache = tmp_path / "cache"
    shutil.copytree(caches("hdf5"), cache)
    path = cache / "records.jsonl"
    whole = path.read_bytes()
    path.write_bytes(b"".join(whole.splitlines(keepends=True)[:10]) if cut == "lines" else whole[:-30])
    with pytest.raises(ValueError, match="cut short|not valid JSON"):
        read_records(cache)      # what train, evaluate and embed-images read
    summary = run(corpus, cache)
    assert f"{path} was cut short or cannot be read: written anew" in summary.lines() and path.read_bytes() == whole
    assert len(read_records(cache)) == 5 * IMAGES


def test_a_second_process_on_the_same_shard_is_refused_not_let_delete_the_first_one_s_parts(tmp_path, corpus):
    """A requeued array job whose first run still writes (or a command started twice) would remove the parts
    in progress as a killed run's leftovers: while one holds a shard of a cache, another is refused."""
    from cache.manifest import StageBusyError, shard_lock
    cache = tmp_path / "cache"
    cache.mkdir()
    with shard_lock(cache, "extract-audio", (0, 2)):
        with pytest.raises(StageBusyError, match=r"another extract-audio is running --shard 0/2 on"):
            run(corpus, cache, shard=(0, 2))
        assert not (cache / AUDIO_STORE).exists() or not completed_parts(cache / AUDIO_STORE)
        summary = run(corpus, cache, shard=(1, 2))            # another shard goes on meanwhile
        assert summary.parts_done == summary.parts // 2
        code, out = cli("--data", str(corpus), "--cache", str(cache), "--part-size", str(PART), "--shard", "0/2")
        assert code == 1 and "another extract-audio is running --shard 0/2" in out and "Traceback" not in out
    summary = run(corpus, cache, shard=(0, 2))                # once it is free
    assert summary.indexed == 5 * IMAGES


def test_a_forked_child_does_not_keep_the_shard_lock_of_a_dead_parent(tmp_path):
    """A flock belongs to every copy of its descriptor: a child that outlives the process holding the lock
    (a worker a moment after kill -9 of its main process) must not keep the shard busy."""
    from cache.manifest import shard_lock
    script = (f"import os, sys, time; sys.path.insert(0, {str(REPO)!r}); from cache.manifest import shard_lock\n"
              f"with shard_lock({str(tmp_path)!r}, 'extract-audio', (0, 1)):\n"
              "    child = os.fork()\n"
              "    if child == 0:\n"
              "        null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)\n"
              "        time.sleep(60); os._exit(0)\n"
              "    print(child, flush=True); os._exit(0)\n")   # dies holding the lock, as after kill -9
    child = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               check=True).stdout)
    try:
        assert _alive(child)
        with shard_lock(tmp_path, "extract-audio", (0, 1)):   # not StageBusyError
            pass
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("rate", [8000, 22050])
def test_a_recipe_at_another_sample_rate_gets_the_audio_resampled_to_it(tmp_path, rate):
    """--option sample_rate=R: the frames are R's (10 ms shift at R Hz), so the audio must be decoded at R:
    features as compute() gives for the wave resampled to R, the same number of frames as at 16 kHz."""
    corpus = write_tiny_flickr(tmp_path / "corpus", images=1)
    cache16, cache_r = tmp_path / "c16", tmp_path / "cr"
    extract_audio(ExtractConfig(data=corpus, cache=cache16, workers=1, recipe="mfcc-kaldi", progress=False))
    summary = extract_audio(ExtractConfig(data=corpus, cache=cache_r, workers=1, recipe="mfcc-kaldi",
                                          recipe_options=(("sample_rate", rate),), progress=False))
    feats16, offsets16, ids = load(cache16)
    feats_r, offsets_r, ids_r = load(cache_r)
    assert ids_r == ids and summary.written == len(ids)
    assert np.abs(np.diff(offsets_r) - np.diff(offsets16)).max() <= 1
    recipe = get_recipe("mfcc-kaldi", sample_rate=rate)
    wav = corpus / "flickr_audio" / "wavs" / f"{ids[0]}.wav"
    want = compute(recipe, load_audio(wav, rate)).numpy().astype(np.float16)
    np.testing.assert_allclose(feats_r[offsets_r[0]:offsets_r[1]].astype(np.float32), want.astype(np.float32),
                               atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("batch_device", [None, "cpu"])
def test_the_summary_says_which_files_were_resampled(tmp_path, batch_device):
    """Telephone speech at 8 kHz in a 16 kHz corpus has nothing above 4 kHz: the run says how many files
    came at which rate, on the worker path and the batched one alike."""
    corpus = write_tiny_flickr(tmp_path / "corpus", images=1)
    wavs = sorted((corpus / "flickr_audio" / "wavs").glob("*.wav"))
    for path in wavs[:2]:
        wave, rate = sf.read(path, dtype="float32")
        sf.write(path, wave[::2], rate // 2, subtype="PCM_16")
    summary = extract_audio(ExtractConfig(data=corpus, cache=tmp_path / "cache", workers=1, progress=False,
                                          batch_device=batch_device))
    assert summary.resampled == {8000: 2}
    assert "resampled to 16000 Hz: 2 at 8000 Hz; below 16000 Hz the band above 4000 Hz is empty" in summary.lines()


def test_bad_files_are_recorded_and_the_rest_continues(tmp_path):
    corpus = write_tiny_flickr(tmp_path / "corpus", images=5)
    expected = spoil(corpus)
    every = [r.stem for r in sorted((corpus / "flickr_audio" / "wavs").glob("*.wav"))] + \
        [k for k, v in expected.items() if v == "missing file"]
    base = ["--data", str(corpus), "--part-size", "4", "--workers", "2"]

    code, out = cli(*base, "--cache", str(tmp_path / "strict"), "--max-failures", "0")
    assert code == 1 and "more than --max-failures 0" in out and "Traceback" not in out
    assert f"utterances: {25 - len(expected)} written, {len(expected)} failed" in out  # the summary

    code, out = cli(*base, "--cache", str(tmp_path / "lenient"), "--max-failures", "100")
    assert code == 0 and f"{len(expected)} failed (" in out
    for cache in (tmp_path / "strict", tmp_path / "lenient"):
        failures = read_failures(cache)
        assert {f["id"]: f["reason"].split(":")[0] for f in failures} == \
            {k: v.split(":")[0] for k, v in expected.items()}
        for f in failures:
            assert f["stage"] == "audio" and f["path"].endswith(f"{f['id']}.wav")
        _, _, ids = load(cache)
        assert sorted(ids) == sorted(set(every) - set(expected))  # nothing partial
        assert not list((cache / AUDIO_STORE).rglob("*.tmp-*"))
    with pytest.raises(TooManyFailures, match="more than --max-failures 3"):  # a rerun counts them again
        extract_audio(ExtractConfig(data=corpus, cache=tmp_path / "lenient", workers=1, part_size=4,
                                    max_failures=3, progress=False))


def test_a_stage_in_which_every_utterance_failed_is_an_error(tmp_path):
    """Under --max-failures (a count) but nothing usable: a wrong option, which exit 0 would hide."""
    corpus = write_tiny_flickr(tmp_path / "corpus", images=2)
    code, out = cli("--data", str(corpus), "--cache", str(tmp_path / "cache"), "--workers", "1",
                    "--option", "win=100000")
    assert code == 1 and "Traceback" not in out
    assert "all 10 utterances failed" in out and "--option" in out


# ---- speaker-level CMVN ----

def fake_clip_stores(cache: Path) -> None:
    """Image and caption 'embeddings' (random rows) so that trainer.data.load_split can run."""
    records = read_records(cache)
    rng = np.random.default_rng(0)
    for store, field in (("images", "image_id"), ("texts", "caption_id")):
        with PartWriter(cache / store, 0, "hdf5", dims=8, dtype="float32") as writer:
            for key in sorted({r[field] for r in records}):
                writer.add(key, rng.standard_normal((1, 8)))
        build_index(cache / store)
    claim_section(cache, "clip", {"model": "fake"})


def test_speaker_cmvn_is_computed_with_the_index_and_applied_by_the_trainer(tmp_path, corpus):
    cache = tmp_path / "cache"
    run(corpus, cache, recipe="mfcc-kaldi", recipe_options=(("normalisation", "speaker"),))
    stats = json.loads((cache / AUDIO_STORE / SPEAKER_CMVN).read_text())
    speaker_of = {r["utt_id"]: r["speaker"] for r in read_records(cache)}
    with StoreReader(cache / AUDIO_STORE) as reader:
        raw = {utt_id: array for utt_id, array in reader}
    assert sorted(stats["speakers"]) == ["0", "1", "2"]
    for speaker, s in stats["speakers"].items():
        pooled = np.concatenate([a.astype(np.float64) for k, a in raw.items() if speaker_of[k] == speaker])
        assert s["frames"] == len(pooled)
        np.testing.assert_allclose(s["mean"], pooled.mean(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s["std"], pooled.std(0), rtol=1e-5, atol=1e-4)
        assert np.abs(pooled.mean(0)).max() > 1  # raw Kaldi MFCCs: the statistics matter

    fake_clip_stores(cache)
    rows = {}
    for split in ("train", "dev", "test"):
        data = load_split(cache, split)
        for i, utt_id in enumerate(data.utt_ids):
            rows.setdefault(speaker_of[utt_id], []).append(data.features[data.offsets[i]:data.offsets[i + 1]])
            assert not np.array_equal(rows[speaker_of[utt_id]][-1].numpy(), raw[utt_id])
    with pytest.MonkeyPatch.context() as patch:   # CMVN applied chunk by chunk: the same numbers
        patch.setattr("trainer.data._LOAD_CHUNK_BYTES", 39 * 2 * 50)
        chunked = load_split(cache, "train")
    assert torch.equal(chunked.features, load_split(cache, "train").features)
    for speaker, frames in rows.items():
        x = torch.cat(frames).double()
        assert torch.allclose(x.mean(0), torch.zeros(39, dtype=torch.double), atol=1e-2)
        assert torch.allclose(x.std(0, correction=0), torch.ones(39, dtype=torch.double), atol=1e-2)

    # without its statistics the trainer refuses; --index-only writes them again, the same
    saved = (cache / AUDIO_STORE / SPEAKER_CMVN).read_text()
    (cache / AUDIO_STORE / SPEAKER_CMVN).unlink()
    with pytest.raises(FileNotFoundError, match="--index-only"):
        load_split(cache, "train")
    code, out = cli("--data", str(corpus), "--cache", str(cache), "--part-size", str(PART), "--features",
                    "mfcc-kaldi", "--option", "normalisation=speaker", "--index-only")
    assert code == 0 and "index: 60 utterances in 30 parts" in out
    assert (cache / AUDIO_STORE / SPEAKER_CMVN).read_text() == saved
    shutil.rmtree(cache)


def test_speaker_cmvn_is_computed_again_when_the_indexed_utterances_change(tmp_path):
    """A --retry-failed run stopped after its part was written but before the statistics: they still lack the
    fixed utterance's frames. The next run (or --index-only) sees that the index holds other utterances than
    the statistics were computed over, and computes them again."""
    good = write_tiny_flickr(tmp_path / "good", images=2)
    corpus = tmp_path / "corpus"
    shutil.copytree(good, corpus)
    wav = sorted((corpus / "flickr_audio" / "wavs").glob("*.wav"))[1]
    wav.write_bytes(b"not a sound file" * 40)
    cache, stats = tmp_path / "cache", tmp_path / "cache" / AUDIO_STORE / SPEAKER_CMVN
    base = ["--data", str(corpus), "--cache", str(cache), "--part-size", "4", "--workers", "1", "--features",
            "mfcc-kaldi", "--option", "normalisation=speaker"]
    assert cli(*base)[0] == 0
    without = stats.read_text()
    shutil.copy(good / "flickr_audio" / "wavs" / wav.name, wav)
    assert cli(*base, "--retry-failed")[0] == 0
    fixed = stats.read_text()
    assert json.loads(fixed)["speakers"] != json.loads(without)["speakers"]
    stats.write_text(without)                 # as if stopped between the part and the statistics
    code, out = cli(*base, "--index-only")
    assert code == 0, out
    assert stats.read_text() == fixed
    stats.write_text(without)
    assert cli(*base)[0] == 0 and stats.read_text() == fixed


def test_streamed_batches_get_the_same_speaker_cmvn_as_memory(tmp_path, corpus):
    """--data-mode stream normalises each batch by its speakers' statistics: the same rows as load_split."""
    from trainer.stream import ShardStream, shard_plan
    cache = tmp_path / "cache"
    run(corpus, cache, fmt="wds", recipe="mfcc-kaldi", recipe_options=(("normalisation", "speaker"),))
    fake_clip_stores(cache)
    memory = load_split(cache, "train")
    plan = shard_plan(cache, load_split(cache, "train", features=False))
    assert plan.speakers == memory.speakers and len(set(plan.speakers)) == 3
    stream = ShardStream(plan, [(0, 4)], seed=0, rank=0, world=1, workers=0, start_step=0, positions={},
                         generation=0, buffer=16, max_frames=10_000)
    seen = 0
    for _, item in zip(range(6), stream):
        for row, (position, n) in enumerate(zip(item["positions"].tolist(), item["lengths"].tolist())):
            want = memory.features[memory.offsets[position]:memory.offsets[position + 1]]
            assert n == len(want)
            torch.testing.assert_close(item["feats"][row, :n], want, rtol=0, atol=0)
            seen += 1
    assert seen == 24
