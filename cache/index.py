"""The index of a store: every completed part scanned once (ids, part, row, frames; for wds the byte offsets
of each member), so that readers find any key without opening every part."""
from __future__ import annotations

import collections
import io
import mmap
import os
import pathlib
import re
import tarfile

import h5py
import numpy as np

from cache.manifest import atomic_target, atomic_write_json, atomic_write_text, file_lock, to_json
from cache.store import (INDEX_FILE, SIZES_JSON, STORE_VERSION, completed_parts, fixed_bytes, read_store_json,
                         unescape_key)

_INDEX_LOCK = ".index.lock"
_INDEX_TEMP_RE = re.compile(r"^(?:index\.h5|index\.json|sizes\.json)\.tmp-[\w-]+$")


def build_index(store_dir) -> int:
    """Index every completed part (ids, part, row, frames; for wds the byte offsets); returns the item
    count. Writes index.h5 (hdf5) or sizes.json + index.json (wds), atomically.

    One builder at a time per store (shard jobs that finish together may both build it): under the store's
    lock, index temporaries can only be a killed builder's, and are removed."""
    store_dir = pathlib.Path(store_dir)
    settings = read_store_json(store_dir)   # first: its error names the store and the fix
    with file_lock(store_dir / _INDEX_LOCK):
        for path in store_dir.iterdir():
            if _INDEX_TEMP_RE.match(path.name):
                path.unlink(missing_ok=True)
        return _build_index(store_dir, settings)


def _build_index(store_dir: pathlib.Path, settings: dict) -> int:
    fmt, dims, dtype = settings["format"], settings["dims"], np.dtype(settings["dtype"])
    ids: list[str] = []
    columns: dict[str, list] = collections.defaultdict(list)
    sizes: dict[str, int] = {}
    owner: dict[str, str] = {}
    for number, path in completed_parts(store_dir).items():
        part_ids, cols = (_scan_hdf5 if fmt == "hdf5" else _scan_tar)(path, dims, dtype)
        for id in part_ids:
            if id in owner:
                raise ValueError(f"id {id!r} is in both {owner[id]} and {path.name} of store {store_dir}: "
                                 "each id must go to one part; delete the store and run the stage again")
            owner[id] = path.name
        sizes[path.name] = len(part_ids)
        ids.extend(part_ids)
        columns["part"].append(np.full(len(part_ids), number, dtype=np.int32))
        columns["row"].append(np.arange(len(part_ids), dtype=np.int64))
        for name, values in cols.items():
            columns[name].append(values)
    cols = {name: np.concatenate(v) if v else np.zeros(0, np.int64) for name, v in columns.items()}
    for name in ("part", "row", "lengths"):
        cols.setdefault(name, np.zeros(0, np.int64))
    if fmt == "hdf5":
        _write_index_h5(store_dir / INDEX_FILE[fmt], ids, cols, sizes)
    else:
        atomic_write_json(store_dir / SIZES_JSON, sizes)
        index = {"version": STORE_VERSION, "parts": sizes, "ids": ids, **{k: v.tolist() for k, v in cols.items()}}
        # one compact line: indented, a SpokenCOCO-sized index is 1.4x the bytes and 4x the time to write
        atomic_write_text(store_dir / INDEX_FILE[fmt], to_json(index, "the store index") + "\n")
    return len(ids)


def _invalid_part(path: pathlib.Path, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid part ({why}); delete it and run the stage again")


def _scan_hdf5(path: pathlib.Path, dims: int, dtype: np.dtype) -> tuple[list[str], dict[str, np.ndarray]]:
    try:
        with h5py.File(path, "r") as f:
            shape, stored = f["features"].shape, f["features"].dtype
            offsets = f["offsets"][:]
            ids = [b.decode("utf-8") for b in f["ids"][:].tolist()]
    except (OSError, KeyError) as e:    # truncated or not HDF5 (OSError), or a dataset missing (KeyError)
        raise _invalid_part(path, f"h5py cannot read it: {e}") from None
    lengths = np.diff(offsets)
    if shape[1:] != (dims,) or stored != dtype:
        raise _invalid_part(path, f"features are {shape} {stored}, the store says (frames, {dims}) {dtype}")
    if len(offsets) != len(ids) + 1 or offsets[0] != 0 or offsets[-1] != shape[0] or (lengths <= 0).any():
        raise _invalid_part(path, "offsets do not match ids and features")
    return ids, {"lengths": lengths.astype(np.int64), "start": offsets[:-1].astype(np.int64)}


class _LeftToTarfile(Exception):
    """A member the block scan does not read itself (a PAX record, a GNU long name, a base-256 size, a
    non-ASCII or prefixed name, a checksum it does not recognise): the part is scanned by tarfile instead."""


_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)
_NPY_MAGIC = b"\x93NUMPY"
_NPY_PREFIX = {(1, 0): 10, (2, 0): 12}   # magic, version and header length field, before the header text


def _scan_tar(path: pathlib.Path, dims: int, dtype: np.dtype) -> tuple[list[str], dict[str, np.ndarray]]:
    """ids and, per item, frames and the byte offsets of its .npy data and its .json member in the part.

    The parts are written by cache/tar.py: plain ustar headers for short ASCII names, PAX records else.
    Those plain headers are read here straight from the file's blocks, and each distinct .npy header text
    is parsed once (all embeddings of a store share one): tarfile and np.load cost about 65 us an item
    (docs/benchmarks.md, store index), about what embedding an image costs on a GPU. A part with any other
    member goes to tarfile, as before."""
    try:
        return _scan_tar_blocks(path, dims, dtype)
    except _LeftToTarfile:
        return _scan_tar_tarfile(path, dims, dtype)


def _scan_tar_blocks(path: pathlib.Path, dims: int, dtype: np.dtype) -> tuple[list[str], dict[str, np.ndarray]]:
    ids, lengths, data_offset, json_offset, json_size = [], [], [], [], []
    headers: dict[bytes, tuple] = {}   # .npy header text -> (shape, fortran order, dtype)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _invalid_part(path, "an empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos, expected = 0, None   # expected: the key whose .json must come next
            while True:
                if pos + _TAR_BLOCK > size:
                    raise _invalid_part(path, f"it ends at byte {size} without the end-of-archive blocks")
                header = mm[pos:pos + _TAR_BLOCK]
                if header == _ZERO_BLOCK:
                    break
                name, member_size = _plain_header(path, pos, header)
                data = pos + _TAR_BLOCK
                if data + member_size > size:
                    raise _invalid_part(path, f"member {name} is cut short at byte {size}")
                key, _, ext = name.partition(".")
                if ext == "npy" and expected is None:
                    prefix, (shape, fortran, stored) = _npy_header(path, name, mm, data, member_size, headers)
                    _check_npy(path, name, shape, fortran, stored, member_size - prefix, dims, dtype)
                    ids.append(unescape_key(key))
                    lengths.append(shape[0])
                    data_offset.append(data + prefix)
                    expected = key
                elif ext == "json" and key == expected:
                    json_offset.append(data)
                    json_size.append(member_size)
                    expected = None
                else:
                    raise _invalid_part(path, f"unexpected member {name}")
                pos = data + member_size + -member_size % _TAR_BLOCK
    return _tar_columns(path, expected, ids, lengths, data_offset, json_offset, json_size)


def _tar_columns(path: pathlib.Path, expected: str | None, ids: list[str], *columns: list[int]):
    """What a scan of a wds part found, once it has read all of it (expected: a key still waiting for its
    .json member)."""
    if expected is not None:
        raise _invalid_part(path, f"{expected}.npy has no .json")
    names = ("lengths", "data_offset", "json_offset", "json_size")
    return ids, {name: np.asarray(values, dtype=np.int64) for name, values in zip(names, columns)}


def _plain_header(path: pathlib.Path, pos: int, header: bytes) -> tuple[str, int]:
    """(name, size) of a regular file's ustar header at byte `pos`, as cache/tar.py writes it; _LeftToTarfile
    for other headers; ValueError for a header whose checksum is wrong (tarfile would stop reading there)."""
    if header[156] not in b"0\0" or header[124] & 0x80 or header[345] or not header[257:262] == b"ustar":
        raise _LeftToTarfile   # another type (PAX 'x', GNU 'L'), a base-256 size, a ustar name prefix
    try:
        checksum = int(header[148:156].strip(b"\0 ") or b"-1", 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        name = header[:100].split(b"\0", 1)[0].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise _LeftToTarfile from None
    unsigned = sum(header) - sum(header[148:156]) + 256   # tarfile's sum, with the checksum field as spaces
    if checksum != unsigned:
        signed = unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:])
        if checksum == signed:   # old writers' signed sums: tarfile accepts them
            raise _LeftToTarfile
        raise _invalid_part(path, f"the tar header at byte {pos} has a wrong checksum")
    return name, size


def _check_npy(path: pathlib.Path, name: str, shape: tuple, fortran: bool, stored: np.dtype, data_bytes: int,
               dims: int, dtype: np.dtype) -> None:
    """A .npy member must hold (frames > 0, dims) of the store's dtype, C order, all of its bytes."""
    if len(shape) != 2 or shape[1] != dims or shape[0] < 1 or stored != dtype or fortran:
        raise _invalid_part(path, f"{name} is {shape} {stored}, the store says (frames, {dims}) {dtype}")
    if data_bytes != shape[0] * dims * dtype.itemsize:
        raise _invalid_part(path, f"{name} holds {data_bytes} bytes of data, not the "
                                  f"{shape[0] * dims * dtype.itemsize} of its shape {shape}")


def _npy_header(path: pathlib.Path, name: str, mm, start: int, size: int,
                known: dict[bytes, tuple]) -> tuple[int, tuple]:
    """(bytes before the data, (shape, fortran order, dtype)) of the .npy member at `start`; each distinct
    header text is parsed once, by numpy's own reader."""
    version = (mm[start + 6], mm[start + 7]) if size >= 10 else None
    if mm[start:start + 6] != _NPY_MAGIC or version not in _NPY_PREFIX:
        raise _invalid_part(path, f"{name} is not a .npy array of version 1.0 or 2.0")
    length_at = start + 8
    text_at = start + _NPY_PREFIX[version]
    text_len = int.from_bytes(mm[length_at:text_at], "little")
    if _NPY_PREFIX[version] + text_len > size:
        raise _invalid_part(path, f"{name}'s .npy header runs past the member")
    text = mm[text_at:text_at + text_len]
    shape = known.get(text)
    if shape is None:
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        try:
            shape = known[text] = read(io.BytesIO(mm[length_at:text_at + text_len]))
        except ValueError as e:
            raise _invalid_part(path, f"{name} has a bad .npy header ({e})") from None
    return _NPY_PREFIX[version] + text_len, shape


def _scan_tar_tarfile(path: pathlib.Path, dims: int,
                      dtype: np.dtype) -> tuple[list[str], dict[str, np.ndarray]]:
    """_scan_tar through Python's tarfile and numpy's .npy reader, member by member: any tar that tarfile
    reads (and the baseline of benchmarks/store_index.py)."""
    ids, lengths, data_offset, json_offset, json_size = [], [], [], [], []
    expected = None  # the key whose .json must come next
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "npy" and expected is None:
                    f = tar.extractfile(member)
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise _invalid_part(path, f"{member.name} has .npy version {version}")
                    shape, fortran, stored = read_header(f)
                    _check_npy(path, member.name, shape, fortran, stored, member.size - f.tell(), dims, dtype)
                    ids.append(unescape_key(key))
                    lengths.append(shape[0])
                    data_offset.append(member.offset_data + f.tell())
                    expected = key
                elif ext == "json" and key == expected:
                    json_offset.append(member.offset_data)
                    json_size.append(member.size)
                    expected = None
                else:
                    raise _invalid_part(path, f"unexpected member {member.name}")
    except tarfile.ReadError as e:
        raise _invalid_part(path, f"tarfile cannot read it: {e}") from None
    return _tar_columns(path, expected, ids, lengths, data_offset, json_offset, json_size)


def _write_index_h5(path: pathlib.Path, ids: list[str], cols: dict[str, np.ndarray], sizes: dict) -> None:
    with atomic_target(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=fixed_bytes(ids))
        for name, values in cols.items():
            f.create_dataset(name, data=values)
        f.attrs["parts"] = to_json(sizes, "sizes")
        f.attrs["version"] = STORE_VERSION
