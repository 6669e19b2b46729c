"""The bytes of a WebDataset part: tar members and .npy payloads, written as Python's tarfile and numpy would
write them, byte for byte, at a fraction of their per-item cost.

tarfile builds each header through a dict, a copy of the TarInfo and a PAX check of every field, and
np.save writes a fresh header per array: together most of the 107 us an embedding cost in a wds part
(docs/benchmarks.md, store writes), when embed-images must keep up with a GPU at 8,000 images/s. So the
common case - a short ASCII name and a plain file - is stamped from a header that tarfile built once, and
.npy headers are cached per (dtype, shape). Everything else goes through tarfile itself.
"""
from __future__ import annotations

import functools
import io
import tarfile
import time

import numpy as np

BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
_NAME, _SIZE, _CHECKSUM = slice(0, 100), slice(124, 136), slice(148, 156)


class TarMembers:
    """Appends regular-file members to a binary file open for writing, as tarfile.open(fileobj=file, mode="w",
    format=tarfile.PAX_FORMAT) and addfile(TarInfo(name) with size, mode 0o644 and the writer's mtime) would;
    `close` writes the end-of-archive blocks (it does not close the file)."""

    def __init__(self, file, mtime: int | None = None):
        self.file, self.mtime, self.offset = file, int(time.time()) if mtime is None else int(mtime), 0
        self._template = bytearray(self._tarfile_header("", 0))
        self._template_sum = sum(self._template) - sum(self._template[_CHECKSUM])

    def add(self, name: str, data: bytes) -> None:
        header = self._header(name, len(data))
        pad = -len(data) % BLOCK
        self.file.write(header)
        self.file.write(data)
        if pad:
            self.file.write(b"\0" * pad)
        self.offset += len(header) + len(data) + pad

    def close(self) -> None:
        end = 2 * BLOCK
        self.file.write(b"\0" * (end + -(self.offset + end) % RECORD))
        self.offset = 0

    def _header(self, name: str, size: int) -> bytes:
        raw = name.encode("ascii") if name.isascii() else b""
        if not raw or len(raw) > 100 or size >= 8 ** 11:   # a PAX record or a large size: tarfile's own
            return self._tarfile_header(name, size)
        header = self._template.copy()
        header[:len(raw)] = raw            # the template's name field is all NUL
        size_field = b"%011o\0" % size
        header[_SIZE] = size_field
        # the checksum sums every byte with its own field as 8 spaces (tarfile.calc_chksums)
        checksum = self._template_sum + 256 + sum(raw) + sum(size_field) - sum(self._template[_SIZE])
        header[_CHECKSUM] = b"%06o\0 " % checksum
        return bytes(header)

    def _tarfile_header(self, name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, self.mtime, 0o644
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    empty = np.empty(shape, dtype=np.dtype(dtype))
    np.save(out, empty, allow_pickle=False)
    return out.getvalue()[:out.tell() - empty.nbytes]


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The header that np.save writes before the bytes of a C-contiguous array of `dtype` and `shape`."""
    return _npy_header(np.dtype(dtype).str, tuple(int(n) for n in shape))
