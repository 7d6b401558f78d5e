"""Rows of an ``.npz`` archive's arrays, read in place: what ``data=arrays data.streaming=true`` reads.

``numpy.savez`` stores each array as an uncompressed ZIP member (``ZIP_STORED``), so an array's
``.npy`` data is one contiguous run of bytes in the archive: after the member's local file header
(30 bytes, its name and its extra field) and the ``.npy`` header (``numpy.lib.format``). With that
offset, rows ``[a, b)`` of a C-ordered array are one ranged read of ``(b - a) * row_bytes`` bytes:
the archive is never read whole. Files are opened through ``pyarrow.fs`` (:mod:`ensemble_service.storage`),
so a local path and an object-store URI (``s3://``, ``gs://``) read alike.

A member compressed by ``numpy.savez_compressed``, saved in Fortran order, or holding objects cannot
be read this way: :func:`locate` says so in one line (:class:`~ensemble_service.data.base.DataError`).
"""
from __future__ import annotations

import io
import math
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np

from ensemble_service.data.base import DataError

_LOCAL_HEADER = 30          # a ZIP local file header's fixed part
_LOCAL_SIGNATURE = b"PK\x03\x04"


@dataclass(frozen=True)
class Member:
    """Where one array's data is in the archive and how to read it (plain values: picklable)."""
    key: str                    # the array's name in the archive ("x", "y", ...)
    offset: int                 # byte offset of element [0, ...] in the archive
    dtype: str                  # numpy dtype string (byte order included), e.g. "<f4"
    shape: Tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * math.prod(self.shape[1:])

    def as_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "offset": self.offset, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Member":
        return cls(str(d["key"]), int(d["offset"]), str(d["dtype"]), tuple(int(s) for s in d["shape"]))


def open_archive(uri: str, where: str):
    """(pyarrow filesystem, path inside it) of the archive at ``uri`` (a local path or a URI), checked
    to be a file; a one-line DataError otherwise."""
    from pyarrow import fs as pafs

    from ensemble_service import storage

    try:
        fs, path = storage.filesystem(uri)
        info = fs.get_file_info(path)
    except storage.StorageError as exc:
        raise DataError(str(exc).replace("cluster.storage", "data.path")) from None
    except OSError as exc:
        raise DataError(f"{where}: cannot reach it ({' '.join(str(exc).split())[:200]})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{where}: no such file")
    if info.type != pafs.FileType.File:
        raise DataError(f"{where} is a directory, not a file")
    return fs, path


def locate(f, where: str) -> Dict[str, Member]:
    """Every array of the archive open as ``f`` (a seekable binary file), by key; a one-line
    DataError when it is not a ZIP archive or an array cannot be read in place."""
    try:
        infos = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise DataError(f"{where}: cannot read it as a .npz archive ({_first(exc)})") from None
    out: Dict[str, Member] = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            continue
        key = info.filename[:-4]
        if info.compress_type != zipfile.ZIP_STORED:
            raise DataError(f"{where}: array {key!r} is compressed (numpy.savez_compressed); streaming reads rows "
                            "in place: save the archive with numpy.savez, or set data.streaming=false")
        head = _read_at(f, _LOCAL_HEADER, info.header_offset)
        if len(head) < _LOCAL_HEADER or head[:4] != _LOCAL_SIGNATURE:
            raise DataError(f"{where}: array {key!r} has no ZIP local header where the directory says; "
                            "the archive is corrupt")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + _LOCAL_HEADER + name_len + extra_len
        prefix = _read_at(f, 12, start)
        try:
            stream = io.BytesIO(prefix)
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                size = 10 + struct.unpack("<H", prefix[8:10])[0]
                reader = np.lib.format.read_array_header_1_0
            elif version == (2, 0):
                size = 12 + struct.unpack("<I", prefix[8:12])[0]
                reader = np.lib.format.read_array_header_2_0
            else:
                raise ValueError(f".npy format version {version[0]}.{version[1]} (only 1.0 and 2.0 stream)")
            shape, fortran, dtype = reader(io.BytesIO(_read_at(f, size, start)[8:]))
        except ValueError as exc:
            raise DataError(f"{where}: array {key!r} cannot be read in place ({_first(exc)})") from None
        if dtype.hasobject:
            raise DataError(f"{where}: array {key!r} holds Python objects (it needs unpickling); save plain "
                            "numeric arrays")
        if fortran and len(shape) > 1:
            raise DataError(f"{where}: array {key!r} is stored in Fortran order, so its rows are not contiguous; "
                            "save numpy.ascontiguousarray(...) of it, or set data.streaming=false")
        out[key] = Member(key, start + size, dtype.str, tuple(int(s) for s in shape))
        expected = dtype.itemsize * math.prod(shape)
        if info.file_size != size + expected:
            raise DataError(f"{where}: array {key!r} holds {info.file_size - size} data bytes, but its header "
                            f"says {expected}; the archive is corrupt")
    return out


def read_whole(f, key: str, where: str) -> np.ndarray:
    """A small array of the archive, read whole (``allow_pickle=False``)."""
    try:
        with zipfile.ZipFile(f) as archive:
            return np.load(io.BytesIO(archive.read(f"{key}.npy")), allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise DataError(f"{where}: cannot read array {key!r} ({_first(exc)})") from None


def read_rows(f, member: Member, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of ``member`` (one ranged read of the archive open as ``f``)."""
    n = max(0, min(stop, member.shape[0]) - start)
    data = _read_at(f, n * member.row_bytes, member.offset + start * member.row_bytes)
    if len(data) != n * member.row_bytes:
        raise DataError(f"array {member.key!r}: the archive ended early (rows {start}-{stop}); it is truncated")
    return np.frombuffer(data, dtype=np.dtype(member.dtype)).reshape(n, *member.shape[1:])


def _read_at(f, nbytes: int, offset: int) -> bytes:
    if nbytes <= 0:
        return b""
    if hasattr(f, "read_at"):  # a pyarrow random-access file
        return f.read_at(nbytes, offset)
    f.seek(offset)
    return f.read(nbytes)


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
