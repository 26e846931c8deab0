"""jlora's safetensors reader/writer against the official `safetensors` library."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from converters import safetensors_io
from jlora.errors import CorruptFileError


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "a.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float16),
        "b.alpha": np.array(8.0, np.float32),
        "c.conv": rng.standard_normal((4, 3, 3, 3)).astype(np.float64),
        "d.ids": np.arange(5, dtype=np.int64),
    }


def test_reads_files_written_by_safetensors(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors.numpy.save_file(_tensors(), str(path), metadata={"lora_adapter_metadata": "{}"})
    tensors, metadata = safetensors_io.load_file(path)
    assert metadata == {"lora_adapter_metadata": "{}"}
    assert sorted(tensors) == sorted(_tensors())
    for k, v in _tensors().items():
        assert tensors[k].dtype == v.dtype and np.array_equal(tensors[k], v)


def test_bfloat16_from_torch(tmp_path):
    path = tmp_path / "bf16.safetensors"
    t = torch.randn(3, 5).to(torch.bfloat16)
    safetensors.torch.save_file({"w": t}, str(path))
    tensors, _ = safetensors_io.load_file(path)
    assert tensors["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensors["w"].astype(np.float32), t.float().numpy())


def test_files_we_write_read_back_with_safetensors(tmp_path):
    path = tmp_path / "ours.safetensors"
    data = dict(_tensors(), bf=np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3))
    safetensors_io.save_file(data, path, {"k": "v"})
    loaded = safetensors.torch.load_file(str(path))
    assert loaded["bf"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["bf"].float().numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    for k, v in _tensors().items():
        np.testing.assert_array_equal(loaded[k].numpy(), v)
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"k": "v"}


def _write_raw(path, header: bytes, data: bytes, length=None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


@pytest.mark.parametrize(
    "case",
    ["empty", "short", "length_lies", "not_json", "not_object", "bad_dtype", "out_of_bounds", "overlap", "size_mismatch", "bad_metadata"],
)
@pytest.mark.parametrize("read", [safetensors_io.load_file, safetensors_io.map_file], ids=["load", "map"])
def test_corrupt_files_raise_typed_error(tmp_path, case, read):
    path = tmp_path / f"{case}.safetensors"
    ok = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    data = b"\0" * 8
    if case == "empty":
        path.write_bytes(b"")
    elif case == "short":
        path.write_bytes(b"\x10\x00")
    elif case == "length_lies":
        _write_raw(path, json.dumps(ok).encode(), data, length=10_000)
    elif case == "not_json":
        _write_raw(path, b"{not json", data)
    elif case == "not_object":
        _write_raw(path, b"[1, 2]", data)
    elif case == "bad_dtype":
        _write_raw(path, json.dumps({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode(), data)
    elif case == "out_of_bounds":
        _write_raw(path, json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), data)
    elif case == "overlap":
        hdr = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
        _write_raw(path, json.dumps(hdr).encode(), data)
    elif case == "size_mismatch":
        _write_raw(path, json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), data)
    elif case == "bad_metadata":
        _write_raw(path, json.dumps(dict(ok, __metadata__={"a": 1})).encode(), data)
    with pytest.raises(CorruptFileError) as e:
        read(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("read", [safetensors_io.load_file, safetensors_io.map_file], ids=["load", "map"])
def test_truncated_real_file(tmp_path, read):
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file(_tensors(), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 7])
    with pytest.raises(CorruptFileError, match="truncated"):
        read(path)


@pytest.mark.parametrize("read", [safetensors_io.load_file, safetensors_io.map_file], ids=["load", "map"])
def test_reads_exactly_what_the_safetensors_library_reads(tmp_path, read):
    """Validity is the library's: a header entry written as a positional list is read as it reads it."""
    path = tmp_path / "positional.safetensors"
    data = np.arange(8, dtype=np.float32)
    header = {"w": ["F32", [2, 4], [0, 32]], "v": {"dtype": "F32", "shape": [2], "data_offsets": [32, 40]}}
    _write_raw(path, json.dumps(header).encode(), data.tobytes() + data[:2].tobytes())
    ours, _ = read(path)
    ref = safetensors.numpy.load_file(str(path))
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k])


@pytest.mark.parametrize("read", [safetensors_io.load_file, safetensors_io.map_file], ids=["load", "map"])
@pytest.mark.parametrize("case", ["duplicate_key", "two_metadata", "metadata_list"])
def test_header_ambiguities_are_refused(tmp_path, case, read):
    path = tmp_path / f"{case}.safetensors"
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    raw = {
        "duplicate_key": '{"w": %s, "w": %s}' % (entry, entry),
        "two_metadata": '{"__metadata__": {"a": "1"}, "w": %s, "__metadata__": {"a": "2"}}' % entry,
        "metadata_list": '{"__metadata__": [], "w": %s}' % entry,
    }[case]
    _write_raw(path, raw.encode(), b"\0" * 8)
    with pytest.raises(CorruptFileError) as e:
        read(path)
    assert str(path) in str(e.value)


def test_lazy_slices_read_only_the_block(tmp_path):
    path = tmp_path / "big.safetensors"
    w = np.arange(6 * 10, dtype=np.float32).reshape(6, 10)
    safetensors.numpy.save_file({"w": w}, str(path))
    with safetensors_io.open_file(path) as f:
        assert f.shape("w") == (6, 10) and f.dtype("w") == np.float32
        np.testing.assert_array_equal(f.read("w", (slice(2, 4), slice(3, 7))), w[2:4, 3:7])
        np.testing.assert_array_equal(f.read("w", (slice(5, 6),)), w[5:6])


@pytest.mark.parametrize("read", [safetensors_io.load_file, safetensors_io.map_file], ids=["load", "map"])
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink_loop"])
def test_only_regular_files_are_opened(tmp_path, kind, read):
    import os

    path = tmp_path / "x.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(tmp_path / "y.safetensors", path)
        os.symlink(path, tmp_path / "y.safetensors")
    with pytest.raises(CorruptFileError) as e:  # a FIFO would block open() forever
        read(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("pad", [0, 1, 3], ids=["aligned", "odd_header", "header_3"])
def test_mapped_views_equal_the_library_read(tmp_path, pad):
    """`map_file` gives read-only views equal to what `safetensors` reads, for every dtype, empty tensors
    and a header whose length leaves the data unaligned."""
    path = tmp_path / "m.safetensors"
    data = dict(_tensors(), bf=np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3),
                empty=np.zeros((0, 4), np.float32))
    safetensors.numpy.save_file(data, str(path), metadata={"k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n].rstrip(b" ") + b" " * pad
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    views, metadata = safetensors_io.map_file(path)
    ref = safetensors.numpy.load_file(str(path))
    assert metadata == {"k": "v"} and sorted(views) == sorted(ref)
    for k, v in ref.items():
        assert views[k].dtype == v.dtype and views[k].shape == v.shape
        np.testing.assert_array_equal(views[k], v)
        assert not views[k].flags.writeable
