"""Read and write safetensors files with numpy only, validating every header field.

The reader never executes code and checks the header against the file before it
touches any tensor: header length, JSON, dtypes, shapes, offsets in bounds, no
overlaps. bfloat16 and float8 tensors come back as `ml_dtypes` numpy arrays.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

from converters.errors import CorruptFileError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _corrupt(path, why: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: not a valid safetensors file: {why}.")


def read_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Return `(tensor_entries, metadata, data_start)` of a safetensors file, validated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit in a file of {size} bytes (truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _corrupt(path, f"header is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _corrupt(path, f"entry {key!r} lacks dtype/shape/data_offsets")
        dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise _corrupt(path, f"tensor {key!r} has unknown dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise _corrupt(path, f"tensor {key!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _corrupt(path, f"tensor {key!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
        if not 0 <= begin <= end <= data_len or end - begin != expected:
            raise _corrupt(
                path,
                f"tensor {key!r} {entry['dtype']}{shape} has data_offsets {offsets} but needs {expected} "
                f"bytes inside a data section of {data_len} bytes (truncated or header lies)",
            )
        spans.append((begin, end, key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _corrupt(path, f"tensors {k0!r} and {k1!r} overlap in the data section")
    return header, metadata, 8 + n


def load_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load every tensor of a safetensors file as numpy arrays, plus its string metadata.

    The data section is read once into one buffer; the arrays are views into it.
    """
    header, metadata, start = read_header(path)
    tensors: dict[str, np.ndarray] = {}
    if not header:
        return tensors, metadata
    end = max(entry["data_offsets"][1] for entry in header.values())
    buf = np.empty(end, np.uint8)  # not zero-filled: every byte is read below
    with open(path, "rb") as f:
        f.seek(start)
        if f.readinto(memoryview(buf)) != end:
            raise _corrupt(path, "the data section ended early (truncated while reading)")
    for key, entry in header.items():
        begin, stop = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        tensors[key] = buf[begin:stop].view(dtype).reshape(entry["shape"])
    return tensors, metadata


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays (any dtype in the safetensors set, incl. bfloat16) to a safetensors file."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[key]))
        name = _NAMES.get(arr.dtype)
        if name is None:
            raise TypeError(f"cannot write tensor {key!r}: dtype {arr.dtype} has no safetensors name")
        header[key] = {"dtype": name, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
