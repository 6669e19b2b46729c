"""Stores of the feature cache: folders of numbered parts (HDF5 or WebDataset tar) that map a key to a
(frames x dims) array, one writing process per part; the stages' plan of parts and shards. The index that
readers use for random access is built by cache/index.py."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re

import h5py
import numpy as np

from cache.manifest import atomic_write_json, fsync_path, settings_diff, to_json
from cache.tar import TarMembers, npy_header

FORMATS = ("hdf5", "wds")
DTYPES = ("float16", "float32")
STORE_JSON = "store.json"
SIZES_JSON = "sizes.json"
INDEX_FILE = {"hdf5": "index.h5", "wds": "index.json"}
STORE_VERSION = 1
INDEX_FIX = "run the stage again or `--index-only`"
RESERVED_META = ("id", "frames")  # the wds .json member adds these to the item's meta
FAILURES_DIR = "failures"  # STORE/failures/part-00012.json: a part's failures, written before the part

_SUFFIX = {"hdf5": ".h5", "wds": ".tar"}
_PART_RE = re.compile(r"^part-(\d{5,})\.(h5|tar)$")
_ESCAPES = str.maketrans({"%": "%25", ".": "%2E", "/": "%2F"})
_CHUNK_BYTES = 1 << 20  # HDF5's default chunk cache is 1 MiB: a chunk that fits is cached between get()s
_FLUSH_BYTES = 16 << 20  # the hdf5 writer appends to the resizable dataset in blocks of about this size


def escape_key(id: str) -> str:
    """`id` with '%', '.' and '/' percent-escaped, so webdataset's split at the first dot keeps it whole."""
    if not isinstance(id, str) or not id or "\x00" in id:
        raise ValueError(f"a store key must be a non-empty str without NUL characters, got {id!r}")
    return id.translate(_ESCAPES)


def unescape_key(key: str) -> str:
    """The inverse of `escape_key`."""
    return re.sub(r"%(25|2E|2F)", lambda m: chr(int(m.group(1), 16)), key)


def part_path(store_dir, part: int, fmt: str) -> pathlib.Path:
    """Final path of part number `part`, e.g. STORE/part-00012.h5."""
    _check_format(fmt)
    if isinstance(part, bool) or not isinstance(part, (int, np.integer)) or part < 0:
        raise ValueError(f"a part number must be an int >= 0, got {part!r}")
    return pathlib.Path(store_dir) / f"part-{int(part):05d}{_SUFFIX[fmt]}"


def plan_parts(n_items: int, part_size: int) -> list[range]:
    """Positions of each part's items: consecutive runs of `part_size` (the last one shorter)."""
    return [range(s, min(s + part_size, n_items)) for s in range(0, n_items, part_size)]


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """`shard` = (I, N), job I of N array jobs that write one store together; ValueError unless 0 <= I < N."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {i}/{n}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


def shard_parts(n_parts: int, shard: tuple[int, int]) -> list[int]:
    """The part numbers that job I of N writes: part k belongs to job k % N."""
    i, n = check_shard(shard)
    return [k for k in range(n_parts) if k % n == i]


def failures_path(store_dir, part: int) -> pathlib.Path:
    """STORE/failures/part-00012.json: the items part `part` could not hold, written before the part."""
    return pathlib.Path(store_dir) / FAILURES_DIR / f"part-{part:05d}.json"


def remove_leftovers(store_dir, parts, fmt: str) -> None:
    """Temporary files that a killed writer left for `parts` (only these: other jobs may be writing theirs)."""
    for k in parts:
        for final in (part_path(store_dir, k, fmt), failures_path(store_dir, k)):
            for tmp in final.parent.glob(f"{final.name}.tmp-*"):
                tmp.unlink(missing_ok=True)


def reopen_failed_parts(store_dir, parts, fmt: str) -> list[int]:
    """For --retry-failed: the parts among `parts` (complete ones) that recorded failures become missing
    again, to be computed anew once their files are fixed; returns them. The store's index goes first, then
    each part, then its failures file, so that a kill in between leaves parts to compute and no index (the
    stage is unfinished), never an index of a part that is gone."""
    failed = [k for k in sorted(parts) if recorded_failures(store_dir, [k])]
    if failed:
        for name in (INDEX_FILE[fmt], SIZES_JSON):
            (pathlib.Path(store_dir) / name).unlink(missing_ok=True)
        for k in failed:
            part_path(store_dir, k, fmt).unlink(missing_ok=True)
            failures_path(store_dir, k).unlink(missing_ok=True)
    return failed


def parts_to_write(store_dir, mine, fmt: str, retry_failed: bool = False) -> tuple[list[int], int]:
    """Which of this shard's parts `mine` a stage writes: those not complete (with `retry_failed`, also the
    complete ones that recorded failures, made missing again by reopen_failed_parts), after removing what
    killed writers of them left. Returns them and how many were made missing again."""
    done = completed_parts(store_dir)
    retried = reopen_failed_parts(store_dir, [k for k in mine if k in done], fmt) if retry_failed else []
    if retried:
        done = completed_parts(store_dir)
    todo = [k for k in mine if k not in done]
    remove_leftovers(store_dir, todo, fmt)   # only these: other shards may be writing theirs right now
    return todo, len(retried)


def recorded_failures(store_dir, parts) -> list[dict]:
    """The failures recorded for `parts`, in part order (parts without a failures file have none)."""
    paths = [failures_path(store_dir, k) for k in sorted(parts)]
    return [f for path in paths if path.is_file() for f in json.loads(path.read_text(encoding="utf-8"))]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown store format {fmt!r}; choose one of {FORMATS}")


def read_store_json(store_dir) -> dict:
    """The store's self-description {"version", "format", "dims", "dtype", "attrs"}."""
    path = pathlib.Path(store_dir) / STORE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {path.parent} is not a store or no part was ever "
                                "written to it; run the stage that writes it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete the store {path.parent} and run the "
                         "stage again") from None


def _store_settings(fmt: str, dims: int, dtype: str, attrs: dict) -> dict:
    """What store.json records: every part of the store was written with these."""
    return {"version": STORE_VERSION, "format": fmt, "dims": dims, "dtype": dtype, "attrs": attrs}


def store_settings_diff(store_dir, fmt: str, dims: int, dtype: str, attrs: dict, prefix: str = "") -> list[str]:
    """How the store's recorded settings differ from these (settings_diff lines); [] for a new store. Lets
    a stage refuse a mismatching store before any work, rather than at its first PartWriter."""
    store_dir = pathlib.Path(store_dir)
    if not (store_dir / STORE_JSON).is_file():
        return []
    return settings_diff(read_store_json(store_dir), _store_settings(fmt, dims, dtype, attrs), prefix)


def _claim_store(store_dir: pathlib.Path, settings: dict) -> None:
    # Parts of one store must agree on format, dims, dtype and attrs, or readers would mix them silently.
    if (store_dir / STORE_JSON).is_file():
        diffs = settings_diff(read_store_json(store_dir), settings)
        if diffs:
            lines = "\n  ".join(diffs)
            raise ValueError(f"store {store_dir} was written with other settings:\n  {lines}\n"
                             f"Fix: use another cache folder or delete {store_dir}")
    else:
        atomic_write_json(store_dir / STORE_JSON, settings)


class PartWriter:
    """Writes one part of a store under a temporary name; `commit` renames it to its final name.

    Use as a context manager: commit on success, abort (temporary file deleted) on an exception.
    A part with no items is still committed, so a resumed stage knows it is done. For hdf5, per-item
    meta goes to a fixed-length JSON bytes dataset `meta`, created only when some item has meta.
    """

    def __init__(self, store_dir, part: int, fmt: str, dims: int, dtype: str = "float16",
                 attrs: dict | None = None):
        _check_format(fmt)
        if dtype not in DTYPES:
            raise ValueError(f"unknown store dtype {dtype!r}; choose one of {DTYPES}")
        if isinstance(dims, bool) or not isinstance(dims, (int, np.integer)) or dims < 1:
            raise ValueError(f"dims must be an int >= 1, got {dims!r}")
        attrs = json.loads(to_json({} if attrs is None else attrs, "store attrs"))
        if not isinstance(attrs, dict):
            raise ValueError(f"store attrs must be a dict, got {type(attrs).__name__}")
        self.store_dir = pathlib.Path(store_dir)
        self.path = part_path(self.store_dir, part, fmt)
        self.fmt, self.dims, self.dtype, self.attrs = fmt, int(dims), np.dtype(dtype), attrs
        if self.path.exists():
            raise ValueError(f"{self.path} is already complete (a rerun skips completed parts); delete it "
                             "to write it again")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        _claim_store(self.store_dir, _store_settings(fmt, self.dims, dtype, attrs))
        self.tmp_path = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._lengths: dict[str, int] = {}  # frames per key, in the order added
        self._state = "open"
        if fmt == "hdf5":
            self._h5 = h5py.File(self.tmp_path, "w")
            chunk_rows = int(np.clip(_CHUNK_BYTES // (self.dims * self.dtype.itemsize), 1, 4096))
            self._features = self._h5.create_dataset("features", shape=(0, self.dims), dtype=self.dtype,
                                                     maxshape=(None, self.dims),
                                                     chunks=(chunk_rows, self.dims))
            self._buffer: list[np.ndarray] = []
            self._buffer_rows = 0
            self._metas: list[str] = []
        else:
            self._file = open(self.tmp_path, "wb")
            self._tar = TarMembers(self._file)

    def add(self, key: str, array: np.ndarray, meta: dict | None = None) -> None:
        """Append item `key`: `array` (frames, dims), frames > 0, finite; `meta` a small JSON-able dict."""
        self._check_key(key)
        stored = self._stored(repr(key), array)
        self._write([key], stored, [len(stored)], [self._meta_json(key, meta, len(stored))])

    def add_rows(self, keys: list[str], rows: np.ndarray, metas: list[dict | None] | None = None) -> None:
        """Append one-frame items: keys[i] -> rows[i] (and metas[i]), as add() would one by one, but all or
        none of them, with the block's checks and conversion done once (embeddings at 8,000 images/s leave
        the main process ~125 us an image for everything; docs/benchmarks.md, store writes)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or len(rows) != len(keys) or (metas is not None and len(metas) != len(keys)):
            raise ValueError(f"add_rows: {len(keys)} keys need rows of shape ({len(keys)}, {self.dims}) and as "
                             f"many metas, got rows {rows.shape} and {None if metas is None else len(metas)} metas")
        if not keys:
            return
        for key in keys:
            self._check_key(key)
        if len(set(keys)) != len(keys):
            raise ValueError(f"add_rows: a key is repeated in {keys if len(keys) < 10 else 'the block'}")
        stored = self._stored(f"{keys[0]!r} .. {keys[-1]!r}", rows)
        metas = [None] * len(keys) if metas is None else metas
        texts = [self._meta_json(key, meta, 1) for key, meta in zip(keys, metas)]
        self._write(keys, stored, [1] * len(keys), texts)

    def _write(self, keys: list[str], block: np.ndarray, lengths: list[int], texts: list[str]) -> None:
        """Items checked and their meta encoded already (`_meta_json`): keys[i] -> the next lengths[i] rows
        of `block`, in order. Nothing here refuses an item, so a block is written whole."""
        self._lengths.update(zip(keys, lengths))
        if self.fmt == "hdf5":
            self._buffer.append(block)
            self._buffer_rows += len(block)
            self._metas.extend(texts)
            if self._buffer_rows * self.dims * self.dtype.itemsize >= _FLUSH_BYTES:
                self._flush()
            return
        header = npy_header(block.dtype, (lengths[0], self.dims)) if len(set(lengths)) == 1 else None
        start = 0
        for key, n, text in zip(keys, lengths, texts):
            data = block[start:start + n].tobytes()
            start += n
            escaped = escape_key(key)
            self._tar.add(f"{escaped}.npy", (header or npy_header(block.dtype, (n, self.dims))) + data)
            self._tar.add(f"{escaped}.json", text.encode("utf-8"))

    def _check_key(self, key: str) -> None:
        if self._state != "open":
            raise ValueError(f"cannot add {key!r}: the writer of {self.path} was already {self._state}")
        escape_key(key)   # refuses keys no store can hold
        if key in self._lengths:
            raise ValueError(f"key {key!r} was already added to {self.path.name}")

    def _stored(self, label: str, array: np.ndarray) -> np.ndarray:
        """`array` checked (2-d, dims columns, rows > 0, real, finite) and converted to the store's dtype."""
        array = np.asarray(array)
        if array.ndim != 2 or array.shape[1] != self.dims or array.shape[0] == 0:
            raise ValueError(f"{label}: expected an array of shape (frames > 0, {self.dims}) for store "
                             f"{self.store_dir}, got {array.shape}")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ValueError(f"{label}: expected a real numeric array, got dtype {array.dtype}")
        if not np.isfinite(array).all():
            raise ValueError(f"{label}: the array holds NaN or infinite values")
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            stored = np.ascontiguousarray(array, dtype=self.dtype)
        if not np.isfinite(stored).all():
            raise ValueError(f"{label}: values beyond the range of {self.dtype} (max "
                             f"{np.finfo(self.dtype).max}); write the store with dtype='float32'")
        return stored

    def _meta_json(self, key: str, meta: dict | None, frames: int) -> str:
        """The JSON text stored with an item of `frames` rows: hdf5 keeps `meta` ("" for none), wds the meta
        with the item's id and frames added. ValueError for a meta that is no dict, uses a reserved key or
        holds what JSON cannot (checked before anything of the item is written)."""
        meta = {} if meta is None else meta
        if not isinstance(meta, dict) or any(not isinstance(k, str) or k in RESERVED_META for k in meta):
            raise ValueError(f"{key!r}: meta must be a dict with str keys, without the reserved keys "
                             f"{RESERVED_META}, got {meta!r}")
        if self.fmt == "wds":
            meta = {**meta, "id": key, "frames": frames}
        text = to_json(meta, f"meta of {key!r}") if meta else ""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{key!r}: meta holds text that UTF-8 cannot encode ({err})") from None
        return text

    def _flush(self) -> None:
        # Bounded memory: the buffer goes to the resizable dataset whenever it reaches _FLUSH_BYTES.
        if not self._buffer:
            return
        block = np.concatenate(self._buffer)
        start = self._features.shape[0]
        self._features.resize(start + len(block), axis=0)
        self._features[start:] = block
        self._buffer, self._buffer_rows = [], 0

    def commit(self) -> pathlib.Path:
        """Flush, close, fsync and rename the part to its final name; returns that path."""
        if self._state != "open":
            raise ValueError(f"the writer of {self.path} was already {self._state}")
        try:
            if self.fmt == "hdf5":
                self._finish_hdf5()
                fsync_path(self.tmp_path)
            else:
                self._tar.close()
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            os.replace(self.tmp_path, self.path)
            fsync_path(self.store_dir)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return self.path

    def _finish_hdf5(self) -> None:
        self._flush()
        h5 = self._h5
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(list(self._lengths.values()), out=offsets[1:])
        h5.create_dataset("offsets", data=offsets)
        h5.create_dataset("ids", data=fixed_bytes(list(self._lengths)))
        if any(self._metas):
            h5.create_dataset("meta", data=fixed_bytes([m or "{}" for m in self._metas]))
        h5.attrs["__store__"] = to_json({"version": STORE_VERSION, "dims": self.dims,
                                         "dtype": str(self.dtype)}, "store")
        for name, value in self.attrs.items():
            h5.attrs[name] = to_json(value, f"attr {name!r}")
        h5.close()

    def abort(self) -> None:
        """Close and delete the temporary file; a committed part is left alone."""
        if self._state != "open":
            return
        self._state = "aborted"
        with contextlib.suppress(Exception):
            if self.fmt == "hdf5":
                self._h5.close()
            else:
                self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._state == "open":
            if exc_type is None:
                self.commit()
            else:
                self.abort()
        return False


def fixed_bytes(strings: list[str]) -> np.ndarray:
    """utf-8 strings as a fixed-length bytes array `S<maxlen>` (HDF5 variable-length strings are slow)."""
    encoded = [s.encode("utf-8") for s in strings]
    width = max([len(b) for b in encoded] + [1])
    return np.array(encoded, dtype=h5py.string_dtype("utf-8", width))


def completed_parts(store_dir) -> dict[int, pathlib.Path]:
    """{part number: path} of the parts that reached their final name, sorted; {} for a missing folder."""
    store_dir = pathlib.Path(store_dir)
    if not store_dir.is_dir():
        return {}
    found = sorted((int(m.group(1)), p) for p in store_dir.iterdir() if (m := _PART_RE.match(p.name)))
    if len({p.suffix for _, p in found}) > 1:
        raise ValueError(f"store {store_dir} holds parts of both formats (.h5 and .tar); delete {store_dir} "
                         "and run the stage again")
    return dict(found)
