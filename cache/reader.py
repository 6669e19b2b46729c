"""Reading an indexed store (cache/store.py writes it): random access by key, batches, and the whole
store as one contiguous array plus offsets; file handles opened lazily in each process, never across a fork."""
from __future__ import annotations

import collections
import json
import os
import pathlib
from typing import Iterator, Sequence

import h5py
import numpy as np

from cache.store import INDEX_FILE, INDEX_FIX, RESERVED_META, completed_parts, read_store_json

_SPAN_BYTES = 64 << 20  # iteration reads at most about this much of a part at once
_GAP_BYTES = 1 << 20  # iter_rows reads past at most this much unwanted data to join two rows in one read
_MAX_OPEN = 64  # open part files per reader and process


class StoreReader:
    """Random access and fast bulk reads of an indexed store.

    File handles are opened lazily and cached per process; pickling drops them, so a reader can be sent
    to worker processes (h5py objects cannot be pickled, and must not be shared across a fork).
    """

    def __init__(self, store_dir):
        self.store_dir = pathlib.Path(store_dir)
        settings = read_store_json(self.store_dir)
        self.fmt: str = settings["format"]
        self.dims: int = settings["dims"]
        self.dtype = np.dtype(settings["dtype"])
        self.attrs: dict = settings["attrs"]
        index_path = self.store_dir / INDEX_FILE[self.fmt]
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: store {self.store_dir} has no index; "
                                    f"{INDEX_FIX}")
        if self.fmt == "hdf5":
            try:
                with h5py.File(index_path, "r") as f:
                    self.ids: list[str] = [b.decode("utf-8") for b in f["ids"][:].tolist()]
                    cols = {name: f[name][:] for name in f if name != "ids"}
                    sizes = json.loads(f.attrs["parts"])
            except (OSError, KeyError) as e:
                raise ValueError(f"{index_path} cannot be read ({e}); delete it and rebuild it: "
                                 f"{INDEX_FIX}") from None
        else:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            self.ids, sizes = index["ids"], index["parts"]
            cols = {k: np.asarray(v, dtype=np.int64) for k, v in index.items()
                    if k not in ("ids", "parts", "version")}
        self.lengths: np.ndarray = cols.pop("lengths").astype(np.int64)
        self._part, self._row = cols.pop("part").astype(np.int64), cols.pop("row")
        self._cols = cols  # hdf5: start frame in the part; wds: byte offsets of .npy data and .json
        self._paths = completed_parts(self.store_dir)
        on_disk = sorted(p.name for p in self._paths.values())
        if set(on_disk) != set(sizes):
            raise ValueError(f"the index of store {self.store_dir} covers {sorted(sizes)} but the folder "
                             f"holds {on_disk}; rebuild it: {INDEX_FIX}")
        self._pos = {id: i for i, id in enumerate(self.ids)}
        self._files: collections.OrderedDict = collections.OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key) -> bool:
        return key in self._pos

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = collections.OrderedDict(), None
        return state

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _position(self, key: str) -> int:
        try:
            return self._pos[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in store {self.store_dir}") from None

    def _handle(self, part: int):
        if self._pid != os.getpid():
            # A forked child: the cached handles are the parent's; forget them without touching them.
            self._files, self._pid = collections.OrderedDict(), os.getpid()
        handle = self._files.get(part)
        if handle is None:
            path = self._paths[part]
            # hdf5: the `features` dataset itself, as looking it up costs more than a small read.
            try:
                handle = h5py.File(path, "r")["features"] if self.fmt == "hdf5" else os.open(path, os.O_RDONLY)
            except (OSError, KeyError) as e:
                raise ValueError(f"{path} cannot be read ({e}); delete it and run the stage that wrote "
                                 f"{self.store_dir.name}/ again") from None
            self._files[part] = handle
            if len(self._files) > _MAX_OPEN:
                _close(self._files.popitem(last=False)[1])
        self._files.move_to_end(part)
        return handle

    def _read_items(self, part: int, positions: np.ndarray) -> list[np.ndarray]:
        """Arrays of the items at `positions` (all in `part`), with one read of the span that holds them."""
        lengths = self.lengths[positions]
        if self.fmt == "hdf5":
            start = self._cols["start"][positions]
            lo, hi = int(start.min()), int((start + lengths).max())
            block = self._handle(part)[lo:hi]
            return [block[s - lo:s - lo + n] for s, n in zip(start.tolist(), lengths.tolist())]
        start = self._cols["data_offset"][positions]
        nbytes = lengths * self.dims * self.dtype.itemsize
        lo, hi = int(start.min()), int((start + nbytes).max())
        buf = _pread(self._handle(part), hi - lo, lo, self._paths[part])
        return [np.frombuffer(buf, self.dtype, count=n * self.dims, offset=s - lo).reshape(n, self.dims)
                for s, n in zip(start.tolist(), lengths.tolist())]

    def get(self, key: str) -> np.ndarray:
        """The (frames, dims) array stored under `key`."""
        i = self._position(key)
        return self._read_items(int(self._part[i]), np.array([i]))[0].copy()

    def meta(self, key: str) -> dict:
        """The meta dict given to `PartWriter.add` for `key` ({} when none)."""
        i = self._position(key)
        part = int(self._part[i])
        handle = self._handle(part)
        if self.fmt == "hdf5":
            meta = handle.file.get("meta")
            return json.loads(meta[int(self._row[i])]) if meta is not None else {}
        size, offset = int(self._cols["json_size"][i]), int(self._cols["json_offset"][i])
        raw = _pread(handle, size, offset, self._paths[part])
        return {k: v for k, v in json.loads(raw).items() if k not in RESERVED_META}

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        """(id, array) in index order, reading each part in spans of about _SPAN_BYTES."""
        return zip(self.ids, self.iter_rows(np.arange(len(self), dtype=np.int64)))

    def iter_rows(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """The arrays of index rows `rows`, in that order (own copies). Neighbouring rows of one part, in
        file order and less than _GAP_BYTES apart, are read together, one read per span of at most about
        _SPAN_BYTES: rows in index order (a part, or a shard's members in tar order) read the file
        sequentially with no per-item parsing; scattered rows cost one small read each."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.fmt == "hdf5":
            start = self._cols["start"][rows] * (self.dims * self.dtype.itemsize)
        else:
            start = self._cols["data_offset"][rows]
        end = start + self.lengths[rows] * (self.dims * self.dtype.itemsize)
        parts = self._part[rows]
        first = 0
        for i in range(1, len(rows) + 1):
            if (i == len(rows) or parts[i] != parts[first] or start[i] < end[i - 1]
                    or start[i] - end[i - 1] > _GAP_BYTES or end[i] - start[first] > _SPAN_BYTES):
                for array in self._read_items(int(parts[first]), rows[first:i]):
                    yield np.array(array)
                first = i

    def iter_batches(self, batch_size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
        """Lists of up to `batch_size` (id, array) pairs in index order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        batch = []
        for item in self:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def load_all(self, keys: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Everything (or `keys`, in that order) as one contiguous (total_frames, dims) array, offsets
        (N+1, int64: item i is features[offsets[i]:offsets[i+1]]) and ids. One read per part."""
        if keys is None:
            positions = np.arange(len(self), dtype=np.int64)
        else:
            positions = np.array([self._position(k) for k in keys], dtype=np.int64)
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(self.lengths[positions], out=offsets[1:])
        features = np.empty((int(offsets[-1]), self.dims), dtype=self.dtype)
        parts = self._part[positions]
        order = np.argsort(parts, kind="stable")
        bounds_out = offsets.tolist()
        bounds = np.flatnonzero(np.diff(parts[order])) + 1
        for where in np.split(order, bounds) if len(order) else []:
            part, first, last = int(parts[where[0]]), int(where[0]), int(where[-1])
            if self.fmt == "hdf5" and last - first + 1 == len(where) and _is_run(positions[where]):
                # A run of rows lands on a run of output rows (the index-order case): no copy per item.
                start = int(self._cols["start"][positions[first]])
                size = int(offsets[last + 1] - offsets[first])
                self._handle(part).read_direct(
                    features, np.s_[start:start + size], np.s_[offsets[first]:offsets[last + 1]])
                continue
            for j, array in zip(where.tolist(), self._read_items(part, positions[where])):
                features[bounds_out[j]:bounds_out[j + 1]] = array
        return features, offsets, [self.ids[i] for i in positions.tolist()]

    def close(self) -> None:
        """Close the files this process opened."""
        if self._pid == os.getpid():
            while self._files:
                _close(self._files.popitem()[1])


def _is_run(positions: np.ndarray) -> bool:
    return bool(len(positions)) and bool((np.diff(positions) == 1).all())


def _close(handle) -> None:
    if isinstance(handle, int):
        os.close(handle)
    else:
        handle.file.close()


def _pread(fd: int, size: int, offset: int, path: pathlib.Path) -> bytes:
    # pread keeps no file position, so threads may share one descriptor.
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise ValueError(f"{path} ends before byte {offset}: the part changed after indexing; "
                             f"{INDEX_FIX}")
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)
