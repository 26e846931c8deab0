"""PyTorch <-> Flax layouts of LoRA factors. Every transpose jlora does lives here.

Flax layout: `a` has the target kernel's shape with its last (output) axis
replaced by the rank: `(in, r)` for Dense, `(kh, kw, in, r)` for Conv; `b` is
`(r, out)`. Then `delta = tensordot(a, b, 1)` has the kernel's shape.
"""

from __future__ import annotations

import numpy as np

from converters.errors import ShapeMismatchError


def down_to_flax(down: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """torch `lora_A` weight (r, in) or (r, in, kh, kw) -> Flax `a` for a kernel of `kernel_shape`."""
    if down.ndim == 2:
        a = down.T
        if len(kernel_shape) == 4:  # torch Linear onto a 1x1 Flax conv
            a = a.reshape((1, 1) + a.shape)
        return a
    a = down.transpose(2, 3, 1, 0)  # (r, in, kh, kw) -> (kh, kw, in, r)
    if len(kernel_shape) == 2 and a.shape[:2] == (1, 1):  # torch 1x1 conv onto a Flax Dense
        a = a[0, 0]
    return a


def up_to_flax(up: np.ndarray) -> np.ndarray:
    """torch `lora_B` weight (out, r) or (out, r, 1, 1) -> Flax `b` (r, out)."""
    return (up[:, :, 0, 0] if up.ndim == 4 else up).T


def factors_to_flax(down, up, kernel_shape, *, key: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Both factors in Flax layout, checked against the kernel they modify."""
    a, b = down_to_flax(down, tuple(kernel_shape)), up_to_flax(up)
    want_a = tuple(kernel_shape[:-1])
    if a.shape[:-1] != want_a or b.shape[1] != kernel_shape[-1]:
        raise ShapeMismatchError(
            f"{key}: LoRA factors down {tuple(down.shape)} / up {tuple(up.shape)} (torch layout) do not fit "
            f"{path} of shape {tuple(kernel_shape)}: expected in-shape {want_a} and out {kernel_shape[-1]}. "
            "The LoRA was made for a different model or model size."
        )
    return a, b


def factors_to_torch(a: np.ndarray, b: np.ndarray, conv: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flax `a`, `b` -> torch `lora_A`, `lora_B` weights (conv when the target is a conv)."""
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
    if conv:
        return a.T[:, :, None, None], b.T[:, :, None, None]
    return a.T, b.T
