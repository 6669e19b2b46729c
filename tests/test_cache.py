"""Feature-cache stores (both formats) read back by our reader, webdataset and h5py; manifest and records."""
import contextlib
import io
import json
import multiprocessing
import os
import pathlib
import pickle
import re
import stat
import subprocess
import sys
import tarfile

import h5py
import numpy as np
import pytest

from cache.index import build_index
from cache.manifest import (MANIFEST, CacheMismatchError, atomic_write_text, claim_section, read_failures,
                            read_manifest, read_records, record_stage_failures, settings_diff, write_records)
from cache.reader import StoreReader
from cache.store import (FORMATS, PartWriter, completed_parts, escape_key, part_path, remove_leftovers,
                         unescape_key)
from cache.tar import TarMembers, npy_header

DIMS = 7
TRICKY = ["1000_aa.wav", "a/b/c.d", "100%", "%2E", "café.ünïcode/日本", "..", "__x__", "a b"]


def make_items(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays of varied lengths; the tricky keys first, then plain ones."""
    rng = np.random.default_rng(seed)
    keys = TRICKY + [f"utt{i:03d}.wav" for i in range(22)]
    return {k: (rng.standard_normal((int(rng.integers(1, 60)), DIMS)) * 3).astype(np.float32) for k in keys}


def write_store(store, fmt, items, n_parts=3, dtype="float16", empty_part=True):
    """Items split over `n_parts` parts (round robin), plus an empty part; returns the keys in index order."""
    keys = list(items)
    order = []
    for part in range(n_parts):
        with PartWriter(store, part, fmt, DIMS, dtype=dtype, attrs={"recipe": {"name": "t", "n": 13}}) as w:
            for key in keys[part::n_parts]:
                w.add(key, items[key], meta={"len": len(items[key])} if key.startswith("utt") else None)
                order.append(key)
    if empty_part:
        PartWriter(store, n_parts, fmt, DIMS, dtype=dtype, attrs={"recipe": {"name": "t", "n": 13}}).commit()
    return order


def test_escape_key_is_reversible_and_has_no_dots_or_slashes():
    for key in TRICKY + ["%252E", "%%2F."]:
        escaped = escape_key(key)
        assert "." not in escaped and "/" not in escaped
        assert unescape_key(escaped) == key
    assert escape_key("a.b/c%") == "a%2Eb%2Fc%25"
    with pytest.raises(ValueError):
        escape_key("")


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt):
    store = tmp_path / "audio"
    items = make_items()
    order = write_store(store, fmt, items)
    assert sorted(completed_parts(store)) == [0, 1, 2, 3]
    assert build_index(store) == len(items)

    reader = StoreReader(store)
    expected = {k: v.astype(np.float16) for k, v in items.items()}
    assert (reader.fmt, reader.dims, reader.dtype) == (fmt, DIMS, np.float16)
    assert reader.attrs == {"recipe": {"name": "t", "n": 13}}
    assert reader.ids == order and len(reader) == len(items)
    assert reader.lengths.tolist() == [len(items[k]) for k in order]
    assert all(k in reader for k in items) and "missing" not in reader
    for key in items:
        got = reader.get(key)
        assert got.dtype == np.float16 and np.array_equal(got, expected[key]), key
        assert reader.meta(key) == ({"len": len(items[key])} if key.startswith("utt") else {})
    assert [k for k, _ in reader] == order
    assert all(np.array_equal(a, expected[k]) for k, a in reader)
    batches = list(reader.iter_batches(4))
    assert [len(b) for b in batches] == [4] * 7 + [2]
    assert [k for b in batches for k, _ in b] == order

    features, offsets, ids = reader.load_all()
    assert ids == order and offsets.tolist() == np.cumsum([0] + [len(items[k]) for k in order]).tolist()
    assert np.array_equal(features, np.concatenate([expected[k] for k in order]))
    keys = [order[5], order[0], "café.ünïcode/日本", order[5]]  # any order, across parts, repeats
    features, offsets, ids = reader.load_all(keys)
    assert ids == keys and len(offsets) == 5
    for i, key in enumerate(keys):
        assert np.array_equal(features[offsets[i]:offsets[i + 1]], expected[key])
    with pytest.raises(KeyError, match="nope.*audio"):
        reader.get("nope")
    reader.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_iter_rows_reads_any_rows_in_spans_and_gives_own_copies(tmp_path, fmt, monkeypatch):
    store = tmp_path / "audio"
    items = make_items()
    order = write_store(store, fmt, items)
    build_index(store)
    reads = []
    monkeypatch.setattr("cache.reader._SPAN_BYTES", 4000)   # a few of these small items per span
    reader = StoreReader(store)
    read_items = reader._read_items
    monkeypatch.setattr(reader, "_read_items", lambda part, rows: reads.append(len(rows)) or read_items(part, rows))
    rows = list(range(len(order))) + [12, 3, 3, 29, 0, 11]   # index order, then scattered rows and repeats
    arrays = list(reader.iter_rows(np.array(rows)))
    assert len(arrays) == len(rows)
    for row, array in zip(rows, arrays):
        assert np.array_equal(array, items[order[row]].astype(np.float16)), order[row]
        assert array.flags.owndata and array.flags.writeable   # does not keep a whole span alive
    assert sum(reads) == len(rows) and max(reads) > 1   # neighbours shared reads ...
    assert len(reads) > 3 + 6                           # ... of at most _SPAN_BYTES, not a part at once
    assert list(reader.iter_rows(np.zeros(0, np.int64))) == []
    # rows far apart in one part are two small reads, not one read of everything between them
    monkeypatch.setattr("cache.reader._GAP_BYTES", 0)
    spans = []
    monkeypatch.setattr(reader, "_read_items", lambda part, rows: spans.append(rows.tolist())
                        or read_items(part, rows))
    assert [len(a) for a in reader.iter_rows(np.array([0, 9]))] == [len(items[order[0]]), len(items[order[9]])]
    assert spans == [[0], [9]]   # rows 0-9: write_store's first part


def test_webdataset_reads_every_sample_of_wds_parts(tmp_path):
    import webdataset  # here, not at the top: it imports torch, which spawned workers would pay for

    store = tmp_path / "audio"
    items = make_items(1)
    write_store(store, "wds", items)
    urls = [str(p) for p in completed_parts(store).values()]
    seen = {}
    for sample in webdataset.WebDataset(urls, shardshuffle=False).decode():
        assert unescape_key(sample["__key__"]) == sample["json"]["id"]
        assert sample["json"]["frames"] == len(sample["npy"])
        seen[sample["json"]["id"]] = sample["npy"]
    assert set(seen) == set(items)
    for key, array in seen.items():
        assert array.dtype == np.float16 and np.array_equal(array, items[key].astype(np.float16))
    assert json.loads((store / "store.json").read_text())["format"] == "wds"


def test_wds_index_offsets_point_at_each_items_bytes_and_meta(tmp_path):
    """A wds store's index is read from the parts' tar blocks directly, and by tarfile for parts with PAX
    records (non-ASCII keys): both ways agree, and each offset points at the item's own bytes."""
    from cache import index

    store = tmp_path / "audio"
    items = make_items(3)
    write_store(store, "wds", items)
    parts, by_blocks = completed_parts(store), 0
    for path in parts.values():
        ids, cols = index._scan_tar(path, DIMS, np.dtype(np.float16))
        want_ids, want = index._scan_tar_tarfile(path, DIMS, np.dtype(np.float16))
        assert ids == want_ids and cols.keys() == want.keys()
        assert all(np.array_equal(cols[k], want[k]) for k in want)
        with contextlib.suppress(index._LeftToTarfile):
            index._scan_tar_blocks(path, DIMS, np.dtype(np.float16))
            by_blocks += 1
        raw = path.read_bytes()
        for key, frames, data, meta, size in zip(ids, cols["lengths"], cols["data_offset"], cols["json_offset"],
                                                 cols["json_size"]):
            assert raw[data:data + frames * DIMS * 2] == items[key].astype(np.float16).tobytes()
            assert json.loads(raw[meta:meta + size])["id"] == key
    assert 0 < by_blocks < len(parts)   # both ways were taken


@pytest.mark.parametrize("damage", ["cut", "header checksum", "npy shape", "empty"])
def test_a_damaged_wds_part_is_named_and_no_index_is_written(tmp_path, damage):
    store = tmp_path / "audio"
    write_store(store, "wds", {f"utt{i}": np.ones((5, DIMS), np.float32) for i in range(4)}, n_parts=1,
                empty_part=False)
    path = part_path(store, 0, "wds")
    raw = bytearray(path.read_bytes())
    if damage == "cut":
        raw = raw[:len(raw) // 2 + 100]
    elif damage == "header checksum":
        raw[2] ^= 1   # in the first member's name
    elif damage == "npy shape":   # the header claims a frame more than the member holds
        raw = raw.replace(b"'shape': (5, 7)", b"'shape': (6, 7)", 1)
    else:
        raw = b""
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a valid part")):
        build_index(store)
    assert not (store / "index.json").exists()


@pytest.mark.parametrize("damage", ["cut", "not hdf5", "no features"])
def test_a_damaged_hdf5_part_or_index_is_named_with_the_fix(tmp_path, damage):
    """Before indexing, the stage's rerun names the part; after, the reader names the part or the index."""
    store = tmp_path / "audio"
    write_store(store, "hdf5", {f"utt{i}": np.ones((5, DIMS), np.float32) for i in range(4)}, n_parts=1,
                empty_part=False)
    path = part_path(store, 0, "hdf5")
    good = path.read_bytes()

    def damage_file(target):
        if damage == "cut":
            target.write_bytes(target.read_bytes()[:3000])
        elif damage == "not hdf5":
            target.write_text("junk")
        else:
            with h5py.File(target, "w") as f:
                f["other"] = np.zeros(3)

    damage_file(path)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a valid part (h5py cannot read it")) as e:
        build_index(store)
    assert "delete it and run the stage again" in str(e.value)
    assert not (store / "index.h5").exists()

    path.write_bytes(good)
    build_index(store)
    damage_file(path)                       # damaged after the index was written: found when read
    with StoreReader(store) as reader, pytest.raises(ValueError, match=re.escape(f"{path} cannot be read")):
        reader.load_all(["utt0"])
    damage_file(store / "index.h5")
    with pytest.raises(ValueError, match=re.escape(f"{store / 'index.h5'} cannot be read")):
        StoreReader(store)


def test_h5py_reads_hdf5_part(tmp_path):
    store = tmp_path / "audio"
    items = make_items(2)
    write_store(store, "hdf5", items, n_parts=1, empty_part=False)
    with h5py.File(part_path(store, 0, "hdf5"), "r") as f:
        features, offsets = f["features"][:], f["offsets"][:]
        ids = [b.decode("utf-8") for b in f["ids"][:]]
        assert f["ids"].dtype.kind == "S" and f["features"].chunks is not None
        assert json.loads(f.attrs["recipe"]) == {"name": "t", "n": 13}
    assert ids == list(items) and offsets.dtype == np.int64 and len(offsets) == len(ids) + 1
    for i, key in enumerate(ids):
        assert np.array_equal(features[offsets[i]:offsets[i + 1]], items[key].astype(np.float16))


@pytest.mark.parametrize("fmt", FORMATS)
def test_exception_inside_writer_leaves_nothing(tmp_path, fmt):
    store = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with PartWriter(store, 7, fmt, DIMS) as writer:
            writer.add("a", np.ones((3, DIMS)))
            raise RuntimeError("stage failed")
    assert completed_parts(store) == {}
    assert sorted(p.name for p in store.iterdir()) == ["store.json"]


def _killed_writer(store, fmt):
    writer = PartWriter(store, 3, fmt, DIMS)
    writer.add("a", np.ones((3, DIMS)))
    os._exit(1)  # killed mid-part: no commit, no abort


@pytest.mark.parametrize("fmt", FORMATS)
def test_leftover_temporary_is_not_a_part_and_is_removed(tmp_path, fmt):
    store = tmp_path / "s"
    PartWriter(store, 0, fmt, DIMS).commit()
    child = multiprocessing.get_context("fork").Process(target=_killed_writer, args=(store, fmt))
    child.start()
    child.join()
    leftovers = [p.name for p in store.iterdir() if ".tmp-" in p.name]
    assert leftovers == [f"{part_path(store, 3, fmt).name}.tmp-{child.pid}"]
    assert list(completed_parts(store)) == [0]
    assert build_index(store) == 0 and len(StoreReader(store)) == 0
    assert [p.name for p in store.iterdir() if ".tmp-" in p.name] == leftovers   # maybe a live writer's
    remove_leftovers(store, [3], fmt)   # what a stage does before it writes part 3 again
    assert not [p for p in store.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("fmt", FORMATS)
def test_build_index_removes_a_killed_builders_temporaries_only(tmp_path, fmt):
    store = tmp_path / "s"
    with PartWriter(store, 0, fmt, DIMS) as writer:
        writer.add("a", np.ones((3, DIMS)))
    dead = ["index.h5.tmp-k1l2", "index.json.tmp-x_9", "sizes.json.tmp-abc"]   # a builder killed mid-write
    alive = f"{part_path(store, 1, fmt).name}.tmp-4242"                          # a writer may own this one
    for name in dead + [alive]:
        (store / name).write_bytes(b"half")
    assert build_index(store) == 1 and StoreReader(store).get("a").shape == (3, DIMS)
    assert [p.name for p in store.iterdir() if ".tmp-" in p.name] == [alive]


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicate_ids_across_parts_name_both_parts(tmp_path, fmt):
    for part in (4, 9):
        with PartWriter(tmp_path, part, fmt, DIMS) as writer:
            writer.add(f"only-in-{part}", np.zeros((1, DIMS)))
            writer.add("twice", np.zeros((2, DIMS)))
    with pytest.raises(ValueError, match=r"'twice'.*part-00004.*part-00009"):
        build_index(tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_needs_a_current_index(tmp_path, fmt):
    write_store(tmp_path, fmt, make_items(), n_parts=2, empty_part=False)
    with pytest.raises(FileNotFoundError, match=r"index.*--index-only"):
        StoreReader(tmp_path)
    build_index(tmp_path)
    with PartWriter(tmp_path, 5, fmt, DIMS, attrs={"recipe": {"name": "t", "n": 13}}) as writer:
        writer.add("late", np.zeros((1, DIMS)))
    with pytest.raises(ValueError, match=r"part-00005.*--index-only"):
        StoreReader(tmp_path)
    build_index(tmp_path)
    assert "late" in StoreReader(tmp_path)


def _read_in_worker(args):
    reader, key = args
    return os.getpid(), key, reader.get(key), reader.load_all([key])[0]


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_works_in_worker_processes(tmp_path, fmt, method):
    items = make_items(3)
    write_store(tmp_path, fmt, items)
    build_index(tmp_path)
    reader = StoreReader(tmp_path)
    reader.get(TRICKY[0])  # the parent holds open handles when the workers start
    keys = list(items)[::3]
    with multiprocessing.get_context(method).Pool(2) as pool:
        results = pool.map(_read_in_worker, [(reader, k) for k in keys], chunksize=1)
    assert {pid for pid, *_ in results} - {os.getpid()}
    for _, key, got, loaded in results:
        assert np.array_equal(got, items[key].astype(np.float16))
        assert np.array_equal(loaded, got)
    assert np.array_equal(reader.get(keys[0]), items[keys[0]].astype(np.float16))
    assert pickle.loads(pickle.dumps(reader)).ids == reader.ids


_INHERITED = None  # a reader that forked workers inherit as it is, without pickling (DataLoader-style)


def _read_inherited(key):
    return key, _INHERITED.get(key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_reader_inherited_by_forked_workers(tmp_path, fmt):
    global _INHERITED
    items = make_items(5)
    write_store(tmp_path, fmt, items)
    build_index(tmp_path)
    _INHERITED = StoreReader(tmp_path)
    try:
        _INHERITED.load_all()  # open handles in the parent
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(_read_inherited, list(items), chunksize=4)
        for key, got in results:
            assert np.array_equal(got, items[key].astype(np.float16))
        assert np.array_equal(_INHERITED.get(TRICKY[1]), items[TRICKY[1]].astype(np.float16))
    finally:
        _INHERITED.close()
        _INHERITED = None


@pytest.mark.parametrize("fmt", FORMATS)
def test_float32_on_request_is_exact(tmp_path, fmt):
    items = make_items(4)
    items["big"] = np.full((2, DIMS), 1e6, dtype=np.float32)  # beyond float16
    write_store(tmp_path, fmt, items, n_parts=2, dtype="float32")
    build_index(tmp_path)
    reader = StoreReader(tmp_path)
    assert reader.dtype == np.float32
    for key, array in items.items():
        assert reader.get(key).dtype == np.float32 and np.array_equal(reader.get(key), array)
    assert reader.load_all()[0].dtype == np.float32


@pytest.mark.parametrize("fmt", FORMATS)
def test_add_rejects_bad_items(tmp_path, fmt):
    with PartWriter(tmp_path, 0, fmt, DIMS) as writer:
        with pytest.raises(ValueError, match=r"\(frames > 0, 7\).*\(4, 8\)"):
            writer.add("wide", np.zeros((4, DIMS + 1)))
        for bad in (np.zeros((0, DIMS)), np.zeros(DIMS), np.full((2, DIMS), np.nan)):
            with pytest.raises(ValueError):
                writer.add("bad", bad)
        with pytest.raises(ValueError, match="float32"):
            writer.add("huge", np.full((1, DIMS), 1e6))
        writer.add("ok", np.zeros((1, DIMS)))
        with pytest.raises(ValueError, match="already added"):
            writer.add("ok", np.zeros((1, DIMS)))
        with pytest.raises(ValueError, match="reserved"):
            writer.add("meta", np.zeros((1, DIMS)), meta={"id": "other"})
        for meta, match in (({1: "int key"}, "str keys"), ({"x": float("nan")}, "JSON values"),
                            ({"x": "\ud800"}, "UTF-8"), (["not", "a dict"], "must be a dict")):
            with pytest.raises(ValueError, match=match):
                writer.add("meta", np.zeros((1, DIMS)), meta=meta)
    assert build_index(tmp_path) == 1
    with pytest.raises(ValueError, match=r"dims: cache has 7, requested 8"):
        PartWriter(tmp_path, 1, fmt, DIMS + 1)
    with pytest.raises(ValueError, match="already complete"):
        PartWriter(tmp_path, 0, fmt, DIMS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_add_rows_writes_what_add_writes_one_by_one(tmp_path, fmt):
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((9, DIMS)).astype(np.float32)
    keys = TRICKY + ["plain"]
    metas = [{"path": f"images/{k}"} if i % 2 else None for i, k in enumerate(keys)]
    for name, add in (("rows", lambda w: (w.add_rows(keys[:4], rows[:4], metas[:4]),
                                          w.add_rows([], rows[:0], []),
                                          w.add_rows(keys[4:], rows[4:], metas[4:]))),
                      ("one", lambda w: [w.add(k, rows[i:i + 1], metas[i]) for i, k in enumerate(keys)])):
        with PartWriter(tmp_path / name, 0, fmt, DIMS) as writer:
            add(writer)
        build_index(tmp_path / name)
    by_rows, one = StoreReader(tmp_path / "rows"), StoreReader(tmp_path / "one")
    assert by_rows.ids == one.ids == keys
    for i, key in enumerate(keys):
        assert np.array_equal(by_rows.get(key), one.get(key)) and by_rows.get(key).shape == (1, DIMS)
        assert by_rows.meta(key) == one.meta(key)
    if fmt == "hdf5":   # h5py's own view of the part: the rows in order, float16
        with h5py.File(part_path(tmp_path / "rows", 0, fmt)) as f:
            assert np.array_equal(f["features"][:], rows.astype(np.float16))

    with PartWriter(tmp_path / "bad", 0, fmt, DIMS) as writer:
        writer.add_rows(["a"], rows[:1])
        for bad_keys, bad_rows, match in ((["b", "b"], rows[:2], "repeated|already added"),
                                          (["a"], rows[:1], "already added"),
                                          (["c", "d"], rows[:1], "keys need rows"),
                                          (["c"], np.full((1, DIMS), np.inf), "infinite"),
                                          (["c"], rows[:1, :3], r"\(frames > 0, 7\)")):
            with pytest.raises(ValueError, match=match):
                writer.add_rows(bad_keys, bad_rows)
        with pytest.raises(ValueError, match="reserved"):
            writer.add_rows(["c"], rows[:1], [{"frames": 3}])
    build_index(tmp_path / "bad")
    assert StoreReader(tmp_path / "bad").ids == ["a"]   # a refused block adds none of its rows


def test_tar_members_are_what_tarfile_writes(tmp_path):
    """The wds writer stamps headers itself: its bytes must be those of Python's tarfile (PAX format), for
    plain names and for those that need a PAX record (non-ASCII, over 100 bytes), at every padding case."""
    names = ["a.npy", "x" * 100, "y" * 101, "café.json", "%2E%2F.npy", "日本.npy", ""]
    members = [(name, bytes(range(256)) * (size // 256) + b"z" * (size % 256))
               for name, size in zip(names, (0, 1, 511, 512, 513, 70_000, 3))]
    ours, theirs = tmp_path / "ours.tar", tmp_path / "theirs.tar"
    with open(ours, "wb") as f:
        writer = TarMembers(f, mtime=1_700_000_000)
        for name, data in members:
            writer.add(name, data)
        writer.close()
    with tarfile.open(theirs, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    assert ours.read_bytes() == theirs.read_bytes()
    with tarfile.open(ours) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == members


def test_npy_header_is_what_np_save_writes():
    for dtype, shape in ((np.float16, (1, 512)), (np.float32, (37, 39)), (np.float16, (2048, 80)), ("<i8", (3,))):
        array = (np.arange(int(np.prod(shape))) % 1000).astype(dtype).reshape(shape)
        saved = io.BytesIO()
        np.save(saved, array, allow_pickle=False)
        assert npy_header(array.dtype, array.shape) + array.tobytes() == saved.getvalue()


def test_claim_section_writes_then_checks(tmp_path):
    features = {"recipe": "mfcc-seed", "n_mels": 80, "window": [400, 160], "extra": {"lifter": 22}}
    assert read_manifest(tmp_path) == {}
    claim_section(tmp_path, "features", features)
    claim_section(tmp_path, "clip", {"model": "ViT-B-16"})
    assert read_manifest(tmp_path) == {"features": features, "clip": {"model": "ViT-B-16"}}
    before = (tmp_path / MANIFEST).stat().st_mtime_ns
    claim_section(tmp_path, "features", {**features, "window": (400, 160)})  # a tuple reads back as a list
    assert (tmp_path / MANIFEST).stat().st_mtime_ns == before

    requested = {"recipe": "mfcc-seed", "n_mels": 40, "window": [400, 160], "extra": {"lifter": 0},
                 "deltas": True}
    with pytest.raises(CacheMismatchError) as err:
        claim_section(tmp_path, "features", requested, fix=f"delete {tmp_path}/audio")
    message = str(err.value)
    assert str(tmp_path) in message and "'features'" in message
    assert "features.n_mels: cache has 80, requested 40" in message
    assert "features.extra.lifter: cache has 22, requested 0" in message
    assert "features.deltas: cache has (absent), requested true" in message
    assert "recipe" not in message and "window" not in message
    assert f"delete {tmp_path}/audio" in message
    assert read_manifest(tmp_path)["features"] == features


def test_settings_diff_is_type_aware():
    assert settings_diff({"a": 1, "b": 0.5}, {"a": 1.0, "b": 0.5}) == []
    assert settings_diff({"a": True}, {"a": 1}) == ["a: cache has true, requested 1"]
    assert settings_diff({"a": {"b": 1}}, {}, prefix="x") == ['x.a: cache has {"b": 1}, requested (absent)']


def test_corrupt_manifest_is_named(tmp_path):
    (tmp_path / MANIFEST).write_text('{"features": ')
    with pytest.raises(ValueError, match=f"{tmp_path / MANIFEST}.*not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="not valid JSON"):
        claim_section(tmp_path, "features", {"n_mels": 80})


def test_records_round_trip_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"records\.jsonl.*extract-audio"):
        read_records(tmp_path)
    records = [{"utt_id": "1000_aa_0", "caption": "a dog é 日本", "split": "train"}, {"utt_id": "x", "n": 2}]
    write_records(tmp_path, records)
    assert read_records(tmp_path) == records
    write_records(tmp_path, records[:1])  # replaced, not appended
    assert read_records(tmp_path) == records[:1]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _build_index_often(store, times):
    return [build_index(store) for _ in range(times)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_shard_jobs_that_finish_together_build_one_valid_index(tmp_path, fmt):
    """Two processes building the index of one store at once (the last two --shard jobs): each build
    removes killed builders' temporaries, which must never be the other live builder's."""
    store = tmp_path / "s"
    for part in range(6):
        with PartWriter(store, part, fmt, DIMS) as writer:
            for i in range(20):
                writer.add(f"p{part}-{i}", np.full((2 + i % 3, DIMS), part))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        counts = pool.starmap(_build_index_often, [(store, 40), (store, 40)])
    assert counts == [[120] * 40] * 2
    reader = StoreReader(store)
    assert len(reader) == 120 and reader.get("p5-19").tolist() == np.full((3, DIMS), 5).tolist()
    assert not [p.name for p in store.iterdir() if ".tmp-" in p.name]


def test_failures_need_their_keys_and_tolerate_a_torn_last_line(tmp_path):
    assert read_failures(tmp_path) == []
    record_stage_failures(tmp_path, "extract-audio",
                          [{"stage": "extract-audio", "id": "u1", "path": "/a.wav", "reason": "empty"}])
    record_stage_failures(tmp_path, "embed-images", iter([{"stage": "embed-images", "id": "i1",
                                                           "reason": "bad jpeg"}]))
    record_stage_failures(tmp_path, "x", [])
    with pytest.raises(ValueError, match="reason"):
        record_stage_failures(tmp_path, "x", [{"stage": "x", "id": "y"}])
    with open(tmp_path / "failures.jsonl", "a") as f:
        f.write('{"stage": "extract-au')  # a writer killed mid-line
    assert read_failures(tmp_path) == [
        {"stage": "extract-audio", "id": "u1", "path": "/a.wav", "reason": "empty"},
        {"stage": "embed-images", "id": "i1", "path": None, "reason": "bad jpeg"}]


def test_record_stage_failures_replaces_only_that_stage(tmp_path):
    record_stage_failures(tmp_path, "images",
                          [{"stage": "images", "id": "i1", "path": "/i1.jpg", "reason": "truncated"}])
    first = [{"stage": "audio", "id": f"u{i}", "path": f"/u{i}.wav", "reason": "empty"} for i in range(3)]
    record_stage_failures(tmp_path, "audio", first)
    record_stage_failures(tmp_path, "audio", first[1:])  # a rerun re-reports what still fails
    stages_ids = [(f["stage"], f["id"]) for f in read_failures(tmp_path)]
    assert stages_ids == [("images", "i1"), ("audio", "u1"), ("audio", "u2")]
    with pytest.raises(ValueError, match="'images', not 'audio'"):
        record_stage_failures(tmp_path, "audio", [{"stage": "images", "id": "x", "reason": "r"}])


def test_atomic_write_text_replaces_whole_file(tmp_path):
    atomic_write_text(tmp_path / "sub" / "f.txt", "first")
    atomic_write_text(tmp_path / "sub" / "f.txt", "é")
    assert (tmp_path / "sub" / "f.txt").read_text(encoding="utf-8") == "é"
    assert os.listdir(tmp_path / "sub") == ["f.txt"]
    plain = tmp_path / "plain.txt"
    plain.write_text("x")                      # what open() makes under this process's umask
    assert (tmp_path / "sub" / "f.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not 0600


def test_an_output_path_that_is_a_link_or_a_pipe_is_written_through(tmp_path):
    """`--json link.json` updates the file the link names and keeps the link; `--json fifo` (or /dev/stdout
    piped to jq) gets the bytes instead of being replaced by a regular file."""
    import threading
    target = tmp_path / "runs" / "target.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(os.listdir(target.parent)) == ["target.json"]
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    atomic_write_text(fifo, "through the pipe")
    reader.join(timeout=10)
    assert got == ["through the pipe"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["fifo.json", "link.json", "runs"]


def test_cache_package_does_not_import_torch():
    code = "import sys, cache.store, cache.index, cache.reader, cache.manifest; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1]).returncode == 0


def test_stage_commands_in_messages_can_be_copied():
    """What a message tells the user to run must run as the cache was made: quoted paths, the teacher's
    weights file as PATH (a checkpoint is recorded by its sha256; 'none' would load random weights), and the
    settings the parts were made with."""
    from cache.manifest import stage_command
    clip = {"model": "ViT-B-32", "pretrained": None, "weights_sha256": "ab" * 32, "precision": "bf16-autocast",
            "image_decode": "torchvision", "dtype": "float32"}
    line = stage_command("/c d", "embed-images", {"corpus": {"root": "/data/my corpus"}, "clip": clip})
    assert line == ("clipspeech embed-images --data '/data/my corpus' --cache '/c d' --model ViT-B-32 "
                    "--pretrained PATH --device cuda --gpu-decode --dtype float32")
    random = {"model": "ViT-B-32", "pretrained": None, "weights_sha256": None, "precision": "fp32",
              "image_decode": "pil", "dtype": "float16"}
    assert stage_command("/c", "embed-images", {"clip": random}).endswith("--pretrained none --no-draft")
    assert stage_command("/c", "embed-images", {"clip": {**random, "model": "local-dir"}}) == \
        "clipspeech embed-images --data CORPUS --cache /c --model local-dir:PATH --no-draft"
    assert stage_command("/c", "embed-images", {}) == \
        "clipspeech embed-images --data CORPUS --cache /c --model NAME --pretrained TAG|PATH|none"
