"""PNG files and contact sheets from uint8 image arrays, with numpy and zlib only."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Sequence

import numpy as np

from converters.safetensors_io import unique_temp_path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit RGB (`(H, W, 3)`) or grayscale (`(H, W)`) uint8 array as PNG bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"encode_png: need uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}.")
    h, w = image.shape[:2]
    color = 2 if image.ndim == 3 else 0
    rows = image.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def write_png(path: str, image: np.ndarray) -> None:
    """Write `image` to `path` atomically (a temporary file renamed over it)."""
    data = encode_png(image)
    tmp = unique_temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_png(path: str) -> np.ndarray:
    """The pixels of a PNG written by `write_png` (8-bit, filter 0), for checks and contact sheets."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file.")
    pos, idat, w = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            if depth != 8 or color not in (0, 2):
                raise ValueError(f"{path}: only 8-bit RGB/gray PNGs are read here.")
            channels = 3 if color == 2 else 1
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * channels)
    if (rows[:, 0] != 0).any():
        raise ValueError(f"{path}: filtered PNG rows are not supported here.")
    out = rows[:, 1:].reshape(h, w, channels)
    return out[..., 0] if channels == 1 else out


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """`image` scaled to fit `size x size`: box-averaged down by an integer factor, nearest up."""
    h, w = image.shape[:2]
    factor = max(1, int(np.ceil(max(h, w) / size)))
    if factor > 1:
        hh, ww = h // factor * factor, w // factor * factor
        image = image[:hh, :ww].reshape(hh // factor, factor, ww // factor, factor, -1).mean((1, 3)).round().astype(np.uint8)
    up = max(1, size // max(image.shape[:2]))
    return np.repeat(np.repeat(image, up, 0), up, 1)


def contact_sheet(images: Sequence[np.ndarray], columns: int | None = None, cell: int = 256, pad: int = 4) -> np.ndarray:
    """The images as one grid (RGB uint8), each fit into a `cell x cell` square on a white ground."""
    if not images:
        raise ValueError("contact_sheet: no images.")
    n = len(images)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    sheet = np.full((rows * (cell + pad) + pad, columns * (cell + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        t = thumbnail(np.asarray(image, np.uint8).reshape(image.shape[0], image.shape[1], -1)[..., :3], cell)
        r, c = divmod(i, columns)
        y, x = pad + r * (cell + pad) + (cell - t.shape[0]) // 2, pad + c * (cell + pad) + (cell - t.shape[1]) // 2
        sheet[y : y + t.shape[0], x : x + t.shape[1]] = t
    return sheet
