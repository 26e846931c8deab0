"""Read and write safetensors files through the `safetensors` library.

Reading opens the file once with `safetensors.safe_open` (memory-mapped; the library
validates the header: JSON, dtypes, shapes, offsets in bounds, no overlaps, no
duplicate keys) and maps every failure to `CorruptFileError` naming the file. Only
regular files are opened: a directory, FIFO, device or symlink loop is refused
before any `open()`, so nothing blocks.

`open_file` keeps the file open for lazy reads of whole tensors or slices (base
weights are read shard by shard straight into device buffers); `load_file` reads
every tensor at once. bfloat16 and float8 tensors come back as `ml_dtypes` arrays.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import mmap
import os
import stat
import struct
import uuid
from typing import Iterator, Mapping

import ml_dtypes  # noqa: F401 - registers bfloat16/float8 with numpy, which safetensors' numpy reader needs
import numpy as np
import safetensors

from converters.errors import CorruptFileError, InvalidAdapterError, LoraFileNotFoundError

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
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def _corrupt(path, why: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: not a valid safetensors file: {why}.")


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise a typed error unless `path` is a regular file (following symlinks); never opens it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LoraFileNotFoundError(f"{path}: no such file.") from None
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else (e.strerror or type(e).__name__)
        raise CorruptFileError(f"{path}: cannot be read as a file ({why}).") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise CorruptFileError(f"{path}: is {kind}; a safetensors weight file was expected.")


def _open_regular(path: str) -> int:
    """A read-only descriptor of `path`, refused unless it is a regular file (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CorruptFileError(f"{path}: cannot be opened ({e.strerror or type(e).__name__}).") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptFileError(f"{path}: is not a regular file; a safetensors weight file was expected.")
    return fd


def _same_file(path: str, fd: int) -> None:
    """Refuse a file replaced while it was being opened (the header checked must be the one read)."""
    a, b = os.fstat(fd), os.stat(path)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        raise CorruptFileError(f"{path}: the file was replaced while it was being opened; load it again.")


def _refuse_duplicate_keys(path: str, fd: int) -> tuple[int, dict] | None:
    """JSON lets a key repeat (the last one wins); in a weight file that hides tensors, so refuse it.

    Returns the header's length and its parsed JSON (None where the library is left to name the problem)."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        return None  # the library names the problem
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        return None
    raw = os.pread(fd, n, 8)
    seen_twice: list[str] = []

    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            seen_twice.extend(k for k, c in collections.Counter(k for k, _ in items).items() if c > 1)
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # the library names the problem
    if seen_twice:
        raise _corrupt(path, f"the header names {seen_twice[0]!r} more than once (keys must be unique)")
    return n, header


def _describe(path, e: BaseException) -> CorruptFileError:
    """The library's reason for refusing a file, with the entry to blame when one can be named."""
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    detail = _diagnose(path)
    return _corrupt(path, f"{msg}{f' ({detail})' if detail else ''}")


def _diagnose(path) -> str:
    """Explain a file the library refused, for the message only (never used to accept a file).

    Bounded: reads at most 16 MiB of header and gives up quietly on anything unexpected.
    """
    try:
        size = os.path.getsize(path)
        if size < 8:
            return f"the file is {size} bytes, shorter than the 8-byte header length"
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 8 + n > size:
                return f"header length {n} does not fit in a file of {size} bytes (truncated?)"
            if n > 16 << 20:
                return ""
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            return f"the header is not JSON ({type(err).__name__})"
        if not isinstance(header, dict):
            return f"the header is not a JSON object but {type(header).__name__}"
        data_len = size - 8 - n
        header.pop("__metadata__", None)
        spans = []
        for key, entry in header.items():
            problem = _entry_problem(entry, data_len)
            if problem:
                return f"tensor {key!r}: {problem}"
            spans.append((entry["data_offsets"][0], entry["data_offsets"][1], key))
        spans.sort()
        for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                return f"tensors {k0!r} and {k1!r} overlap in the data section"
        return f"the file is {size} bytes"
    except Exception:  # noqa: BLE001 - the library's message stands on its own
        return ""


def _entry_problem(entry, data_len: int) -> str:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "the entry is not an object with dtype, shape and data_offsets"
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        return f"unknown dtype {entry['dtype']!r}"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        return f"invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        return f"invalid data_offsets {offsets!r}"
    begin, end = offsets
    need = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= data_len or end - begin != need:
        return (f"{entry['dtype']}{shape} needs {need} bytes but has data_offsets {offsets} in a data section "
                f"of {data_len} bytes (truncated, or the header lies)")
    return ""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """One open safetensors file: keys, shapes, dtypes and metadata from its header; tensors on demand.

    Use as a context manager (`with open_file(path) as f:`); reads after `close()` fail.

    >>> with open_file("unet/diffusion_pytorch_model.safetensors") as f:
    ...     block = f.read("conv_in.weight", (slice(0, 160),))
    """

    def __init__(self, path: str | os.PathLike, *, mapped: bool = False):
        self.path = os.fspath(path)
        self.bytes_read = 0  # tensor bytes read so far (slices count only their own bytes)
        self._map = None
        check_regular_file(self.path)
        fd = _open_regular(self.path)
        try:
            parsed = _refuse_duplicate_keys(self.path, fd)
            self._handle = safetensors.safe_open(self.path, framework="np")
            self._handle.__enter__()
            _same_file(self.path, fd)
            self.metadata: dict[str, str] = dict(self._handle.metadata() or {})
            self._keys = list(self._handle.keys())
            self._slices = {k: self._handle.get_slice(k) for k in self._keys}
            self._info = {k: (tuple(int(d) for d in s.get_shape()), s.get_dtype()) for k, s in self._slices.items()}
            if mapped:
                self._map, self._starts = self._map_data(fd, parsed)
        except CorruptFileError:
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - every parser failure is a corrupt file
            self.close()
            raise _describe(self.path, e) from None
        finally:
            os.close(fd)
        for key, (_, dtype) in self._info.items():
            if dtype not in _DTYPES:
                self.close()
                raise _corrupt(self.path, f"tensor {key!r} has dtype {dtype}, which jlora does not read")

    def _map_data(self, fd: int, parsed):
        """A read-only memory map of the file and each tensor's byte offset in it, from the header the
        library validated (a file rewritten in between no longer matches it and is refused)."""
        if parsed is None:
            raise _corrupt(self.path, "the header could not be parsed")
        n, header = parsed
        try:  # an entry is an object, or (as the library also reads it) a list [dtype, shape, data_offsets]
            starts = {k: 8 + n + int((header[k]["data_offsets"] if isinstance(header[k], dict) else header[k][2])[0])
                      for k in self._keys}
        except (KeyError, TypeError, ValueError, IndexError):
            starts = None
        if starts is None or len(header) - ("__metadata__" in header) != len(self._keys):
            raise CorruptFileError(f"{self.path}: the file changed while it was being opened; load it again.")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ), starts

    def view(self, key: str) -> np.ndarray:
        """The tensor `key` as a read-only view into the file's memory map (nothing is copied).

        Only for files opened with `mapped=True`. The view stays valid after `close()`; it reads the
        file's pages, so copy what is kept (a file truncated while viewed cannot be read)."""
        if self._map is None:
            raise ValueError(f"{self.path}: opened without mapped=True, or closed")
        shape, _ = self._info[key]
        dtype = self.dtype(key)
        count = math.prod(shape)
        if count == 0:
            out = np.empty(shape, dtype)
            out.flags.writeable = False
            return out
        try:
            out = np.frombuffer(self._map, dtype, count, self._starts[key]).reshape(shape)
        except ValueError:
            raise _corrupt(self.path, f"tensor {key!r} lies outside the file (it changed while being read)") from None
        self.bytes_read += out.nbytes
        return out

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][0]

    def dtype(self, key: str) -> np.dtype:
        return _DTYPES[self._info[key][1]]

    def nbytes(self, key: str) -> int:
        shape, _ = self._info[key]
        return int(np.prod(shape, dtype=np.int64)) * self.dtype(key).itemsize

    def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor `key`, or the block `index` (one slice per leading axis, step 1) of it."""
        try:
            if index is None or all(s == slice(None) for s in index):
                out = self._handle.get_tensor(key)
            else:
                out = self._slices[key][tuple(index)]
        except Exception as e:  # noqa: BLE001
            raise _corrupt(self.path, f"tensor {key!r} could not be read ({str(e)[:200]})") from None
        out = np.asarray(out).reshape(_block_shape(self.shape(key), index))
        self.bytes_read += out.nbytes
        return out

    def close(self) -> None:
        handle, self._handle = getattr(self, "_handle", None), None
        self._slices = {}
        self._map = None  # views taken keep the map alive; it unmaps when the last one goes
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.__exit__(None, None, None)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _block_shape(shape: tuple[int, ...], index) -> tuple[int, ...]:
    if index is None:
        return shape
    out = []
    for i, n in enumerate(shape):
        s = index[i] if i < len(index) else slice(None)
        start, stop, _ = s.indices(n)
        out.append(max(stop - start, 0))
    return tuple(out)


def open_file(path: str | os.PathLike) -> SafetensorsFile:
    """Open a safetensors file once, for lazy reads (`CorruptFileError` names the file on bad bytes)."""
    return SafetensorsFile(path)


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """`({key: (shape, dtype)}, metadata)` of a safetensors file, validated by the library, no tensor read."""
    with open_file(path) as f:
        return {k: (f.shape(k), f.dtype(k)) for k in f.keys()}, dict(f.metadata)


def load_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Load every tensor of a safetensors file as numpy arrays, plus its string metadata (one open)."""
    with open_file(path) as f:
        return {k: f.read(k) for k in f.keys()}, dict(f.metadata)


def map_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as a read-only view into a memory map of it, plus its metadata.

    Validated as `open_file` validates; nothing is copied until a view is read. For callers that
    convert the tensors and copy the result (`jlora.load_lora`): a view reads the file's pages for as
    long as it lives, so arrays meant to be kept come from `load_file`.
    """
    with SafetensorsFile(path, mapped=True) as f:
        return {k: f.view(k) for k in f.keys()}, dict(f.metadata)


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(key, array)` one tensor at a time, in file order (host memory stays near one tensor)."""
    with open_file(path) as f:
        for key in f.keys():
            yield key, f.read(key)


def unique_temp_path(path: str | os.PathLike) -> str:
    """A temporary name in the directory of `path`, unique per process and call."""
    path = os.fspath(path)
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays (any dtype in the safetensors set, incl. bfloat16) to a safetensors file.

    The file is written under a unique temporary name in the same directory and moved into
    place with `os.replace`, so readers never see a partial file and concurrent writers of
    the same path never share a temporary file.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[key]))
        name = _NAMES.get(arr.dtype)
        if name is None:
            raise InvalidAdapterError(f"cannot write tensor {key!r}: dtype {arr.dtype} has no safetensors name; cast it "
                                      "to float32, float16 or bfloat16.")
        header[key] = {"dtype": name, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = unique_temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for arr in arrays:
                f.write(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
