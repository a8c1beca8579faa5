"""The IDX file format of MNIST and Fashion-MNIST: read (gzip or raw) and write, every header checked.

An IDX file is a 4-byte magic number, one big-endian int32 per dimension, then the
array in C order, big-endian. The magic is 0x00 0x00 <type code> <ndim>, so
2051 = 0x0803 is a 3-D uint8 array (images N x H x W) and 2049 = 0x0801 a 1-D
uint8 array (labels N). A file that breaks the format is a DataError (a ValueError) that names
the path and what was wrong, never an assert.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

IDX_IMAGES_MAGIC = 2051  # uint8, 3 dims: (N, H, W)
IDX_LABELS_MAGIC = 2049  # uint8, 1 dim:  (N,)

# type code (third byte of the magic) -> big-endian dtype
_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx_bytes(path) -> bytes:
    """The IDX payload of a file: gunzipped when it starts with the gzip magic, whatever its name."""
    path = Path(path)
    data = path.read_bytes()
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from e


def parse_idx(data: bytes, path="<bytes>", expected_magic: int | None = None) -> np.ndarray:
    """Decode an IDX payload into a native-endian array (a copy, safe to write).

    `path` only names the source in error messages. With `expected_magic`, any
    other magic number is an error (an image file passed where labels belong).
    """
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _DTYPES or ndim == 0:
        raise DataError(f"{path}: bad IDX magic number {magic} (0x{magic:08x}); expected "
                         f"{expected_magic or '0x0000TTDD (T: type code, D: dims)'}")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path}: IDX magic number is {magic}, expected {expected_magic} "
                         f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header} for {ndim} dims)")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = _DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{path}: file {what}: header says shape {dims} of {dtype.name} "
                         f"({expected} bytes in all), file holds {len(data)} bytes")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # copies: the result owns writable memory


def read_idx(path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a NumPy array."""
    return parse_idx(read_idx_bytes(path), path, expected_magic)


def write_idx(path, array, compress: bool | None = None) -> None:
    """Write an array as IDX (the tests build small files with it); gzip when the name ends in .gz."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("=").str[1:]: code for code, dt in _DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str[1:])
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
