"""PyTorch <-> Flax layouts of adapter tensors. Every transpose jlora does lives here.

Flax layout: a low-rank "down" factor `a` has the target kernel's shape with its
last (output) axis replaced by the rank: `(in, r)` for Dense, `(kh, kw, in, r)`
for Conv; an "up" factor `b` is `(r, out)`. Then `tensordot(a, b, 1)` has the
kernel's shape. Full weights go from torch `(out, in[, kh, kw])` to Flax
`([kh, kw,] in, out)`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from converters.errors import InvalidAdapterError, ShapeMismatchError
from converters.records import Record


def weight_to_flax(w: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """A full torch weight (out, in[, kh, kw] or [, kd, kh, kw]) in the layout of a Flax kernel of `kernel_shape`."""
    if w.ndim == 1:
        return w
    if w.ndim == 5:  # Conv3d: OIDHW -> DHWIO
        return w.transpose(2, 3, 4, 1, 0)
    if w.ndim == 2:
        out = w.T
        return out.reshape((1, 1) + out.shape) if len(kernel_shape) == 4 else out
    out = w.transpose(2, 3, 1, 0)
    return out[0, 0] if len(kernel_shape) == 2 and out.shape[:2] == (1, 1) else out


def down_to_flax(down: np.ndarray, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """torch down factor (r, in) or (r, in, kh, kw) -> Flax `a` for a kernel of `kernel_shape`."""
    return weight_to_flax(down, kernel_shape)


def up_to_flax(up: np.ndarray) -> np.ndarray:
    """torch up factor (out, r) or a 1x1 conv (out, r, 1, 1[, 1]) -> Flax `b` (r, out)."""
    return up.reshape(up.shape[:2]).T


def _fail(rec: Record, path: str, kernel_shape, got, role: str = "") -> ShapeMismatchError:
    shapes = ", ".join(f"{r} {tuple(t.shape)}" for r, t in sorted(rec.tensors.items()))
    key = rec.sources.get(role) or rec.keys[0]
    hint = "The adapter was made for a different model or model size."
    if rec.module == "x_embedder" and len(got) == 2 and got[0] > kernel_shape[0]:
        hint = (f"A Flux Control LoRA widens the image input to {got[0]} channels: load it onto "
                f"jlora.models.flux.expand_input_channels(params, {got[0]}).")
    return ShapeMismatchError(
        f"{key}: {rec.kind} tensors ({shapes}, torch layout) give a delta of shape {tuple(got)} but {path} has "
        f"shape {tuple(kernel_shape)}. {hint}"
    )


def _tucker_down(down: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """Fold a Tucker core into the down factor: (r, in, 1, 1) x (r, r, kh, kw) -> (r, in, kh, kw)."""
    return np.einsum("pqhw,qi->pihw", mid.astype(np.float32), down[:, :, 0, 0].astype(np.float32))


def _check_core(rec: Record, path: str, kernel_shape, core_role: str, core, down, up_out: int) -> None:
    """A Tucker core `(r, r, kh, kw)` between `down (r, in, ...)` and an up of `up_out` outputs must fit the
    kernel before any product is formed (the product's size is then bounded by the kernel's)."""
    spatial = tuple(kernel_shape[:2]) if len(kernel_shape) == 4 else (1, 1)
    ok = (core.ndim == 4 and down.ndim >= 2 and core.shape[1] == down.shape[0] and tuple(core.shape[2:]) == spatial
          and down.shape[1] == kernel_shape[-2] and up_out == kernel_shape[-1])
    if not ok:
        raise _fail(rec, path, kernel_shape, (up_out, down.shape[1] if down.ndim >= 2 else -1) + tuple(core.shape[2:]),
                    core_role)


def lora_leaf(rec: Record, kernel_shape, path: str, alpha: float) -> tuple[str, dict]:
    t = rec.tensors
    if "mid" in t:
        _check_core(rec, path, kernel_shape, "mid", t["mid"], t["down"], t["up"].shape[0] if t["up"].ndim else -1)
        if t["down"].ndim != 4 or t["down"].shape[2:] != (1, 1):
            raise _fail(rec, path, kernel_shape, tuple(t["down"].shape), "down")
    down = _tucker_down(t["down"], t["mid"]) if "mid" in t else t["down"]
    a, b = down_to_flax(down, tuple(kernel_shape)), up_to_flax(t["up"])
    if a.shape[:-1] != tuple(kernel_shape[:-1]):
        raise _fail(rec, path, kernel_shape, a.shape[:-1] + b.shape[-1:], "down")
    if b.shape[1] != kernel_shape[-1]:
        raise _fail(rec, path, kernel_shape, a.shape[:-1] + b.shape[-1:], "up")
    fields: dict[str, Any] = {"a": a, "b": b, "alpha": alpha}
    if "magnitude" in t or "dora_scale" in t:
        role = "magnitude" if "magnitude" in t else "dora_scale"
        fields["magnitude"] = _magnitude(rec, role, kernel_shape, path)
        fields["strength"] = "peft" if role == "magnitude" else "comfyui"
        return "dora", fields
    return "lora", fields


def _magnitude(rec: Record, role: str, kernel_shape, path: str) -> np.ndarray:
    """DoRA magnitude as an array broadcastable to the Flax kernel (size 1 on the normed axes)."""
    m = rec.tensors[role]
    n_out, n_in = kernel_shape[-1], kernel_shape[-2]
    ones = [1] * len(kernel_shape)
    per_output = m.size == n_out and (m.ndim == 1 or m.shape[0] == n_out or role == "magnitude")
    if per_output:
        ones[-1] = n_out
    elif m.size == n_in and m.ndim >= 2 and m.shape[1] == n_in:
        ones[-2] = n_in
    else:
        raise ShapeMismatchError(
            f"{rec.sources[role]}: DoRA magnitude of shape {tuple(m.shape)} fits neither the output ({n_out}) nor the "
            f"input ({n_in}) channels of {path} {tuple(kernel_shape)}."
        )
    return m.reshape(ones)


def loha_leaf(rec: Record, kernel_shape, path: str, alpha: float) -> tuple[str, dict]:
    t = rec.tensors
    fields: dict[str, Any] = {"alpha": alpha}
    in_shape = (kernel_shape[-2],) + (tuple(kernel_shape[:2]) if len(kernel_shape) == 4 else ())
    for i in ("1", "2"):
        wa, wb = t[f"w{i}a"], t[f"w{i}b"]
        if f"t{i}" in t:  # Tucker: down (r, in) with core (r, r, kh, kw); wa is (r, out)
            _check_core(rec, path, kernel_shape, f"t{i}", t[f"t{i}"], wb, wa.shape[1] if wa.ndim == 2 else -1)
            down = np.einsum("pqhw,qi->pihw", t[f"t{i}"].astype(np.float32), wb.astype(np.float32))
            up = wa.T
        else:  # wa (out, r), wb (r, in * kh * kw)
            r = wb.shape[0]
            if wb.shape[1] != int(np.prod(in_shape)):
                raise _fail(rec, path, kernel_shape, (wa.shape[0], wb.shape[1]), f"w{i}b")
            down = wb.reshape((r,) + in_shape)
            up = wa
        a, b = down_to_flax(down, tuple(kernel_shape)), up_to_flax(up)
        if a.shape[:-1] + b.shape[-1:] != tuple(kernel_shape):
            raise _fail(rec, path, kernel_shape, a.shape[:-1] + b.shape[-1:], f"w{i}a")
        fields[f"a{i}"], fields[f"b{i}"] = a, b
    return "loha", fields


def _lokr_shape(t: Mapping[str, np.ndarray], i: str) -> tuple[int, ...] | None:
    """The shape `_lokr_factor` would build, from the factor shapes alone (None: they do not chain)."""
    if f"lokr_w{i}" in t:
        return tuple(t[f"lokr_w{i}"].shape)
    wa, wb = t[f"lokr_w{i}a"], t[f"lokr_w{i}b"]
    if wa.ndim != 2 or wb.ndim < 2:
        return None
    if f"lokr_t{i}" in t:
        core = t[f"lokr_t{i}"]
        if core.ndim != 4 or core.shape[0] != wa.shape[0] or core.shape[1] != wb.shape[0] or wb.ndim != 2:
            return None
        return (wa.shape[1], wb.shape[1]) + tuple(core.shape[2:])
    if wa.shape[1] != wb.shape[0]:
        return None
    return (wa.shape[0], int(np.prod(wb.shape[1:], dtype=np.int64)))


def _lokr_factor(t: Mapping[str, np.ndarray], i: str) -> np.ndarray:
    if f"lokr_w{i}" in t:
        return t[f"lokr_w{i}"].astype(np.float32)
    wa, wb = t[f"lokr_w{i}a"].astype(np.float32), t[f"lokr_w{i}b"].astype(np.float32)
    if f"lokr_t{i}" in t:  # Tucker: core (r, r, kh, kw), wa (r, out2), wb (r, in2)
        return np.einsum("pqhw,qi,po->oihw", t[f"lokr_t{i}"].astype(np.float32), wb, wa)
    return wa @ wb.reshape(wb.shape[0], -1)


def lokr_leaf(rec: Record, kernel_shape, path: str, alpha: float | None) -> tuple[str, dict]:
    t = rec.tensors
    s1, s2 = _lokr_shape(t, "1"), _lokr_shape(t, "2")
    if s1 is None or s2 is None:
        role = "lokr_w1" if s1 is None else "lokr_w2"
        raise _fail(rec, path, kernel_shape, (), role if role in rec.sources else role + "a")
    if len(s1) != 2 or min(s1) < 1:
        raise InvalidAdapterError(f"{rec.sources.get('lokr_w1', rec.keys[0])}: LoKr w1 must be 2-D, got {s1}.")
    (o1, i1), n_out, n_in = s1, kernel_shape[-1], kernel_shape[-2]
    k = tuple(kernel_shape[:2]) if len(kernel_shape) == 4 else ()
    decomposed = any(r in t for r in ("lokr_w1a", "lokr_w2a"))
    factor = (alpha / rec.rank) if (decomposed and alpha is not None) else 1.0
    o2, i2 = n_out // o1, n_in // i1
    if not (n_out % o1 or n_in % i1) and s2[0] == o2 and _size(s2) == o2 * i2 * _size(k):
        w1, w2 = _lokr_factor(t, "1"), _lokr_factor(t, "2")
        w2 = w2.reshape((o2, i2) + k)
        return "lokr", {"w1": w1.T, "w2": weight_to_flax(w2, tuple(kernel_shape)), "factor": factor}
    if _size(s1) * _size(s2) == _size(kernel_shape):
        return "diff", {"diff": _lokr_dense(t, kernel_shape), "factor": factor}
    if n_out % o1 or n_in % i1:
        raise _fail(rec, path, kernel_shape, (o1, i1), "lokr_w1")
    raise _fail(rec, path, kernel_shape, (o1 * s2[0], i1 * int(np.prod(s2[1:], dtype=np.int64))),
                "lokr_w2" if "lokr_w2" in rec.sources else "lokr_w2a")


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _lokr_dense(t: Mapping[str, np.ndarray], kernel_shape) -> np.ndarray:
    """kron(w1, w2) reshaped row-major to the torch weight `(out, in[, kh, kw])`, in Flax layout.

    For factors whose Kronecker axes do not follow the weight's (w1 `(20, 60)`, w2 `(16, 48)` on a
    `320x320x3x3` conv: the product's columns run over the flattened `in*kh*kw` axis and 60 does not
    divide 320); the delta is then held whole, like a full diff.
    """
    w1, w2 = _lokr_factor(t, "1"), _lokr_factor(t, "2")
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    torch_shape = (kernel_shape[-1], kernel_shape[-2]) + tuple(kernel_shape[:-2])
    return weight_to_flax(np.kron(w1, w2).reshape(torch_shape), tuple(kernel_shape))


def diff_leaf(rec: Record, kernel_shape, path: str) -> tuple[str, dict]:
    d = weight_to_flax(rec.tensors["diff"], tuple(kernel_shape))
    if d.shape != tuple(kernel_shape):
        raise _fail(rec, path, kernel_shape, d.shape, "diff")
    return "diff", {"diff": d, "factor": 1.0}


def set_leaf(rec: Record, weight_shape, path: str) -> tuple[str, dict]:
    v = weight_to_flax(rec.tensors["set"], tuple(weight_shape))
    if v.shape != tuple(weight_shape):
        raise _fail(rec, path, weight_shape, v.shape, "set")
    return "set", {"value": v, "mask": np.ones((1,) * v.ndim, bool)}


def bias_leaf(rec: Record, bias_shape, path: str, factor: float) -> tuple[str, dict]:
    role = "up_bias" if "up_bias" in rec.tensors else "diff_b"
    d = rec.tensors[role]
    if d.shape != tuple(bias_shape):
        raise ShapeMismatchError(
            f"{rec.sources[role]}: bias delta of shape {tuple(d.shape)} does not fit {path} of shape {tuple(bias_shape)}."
        )
    return "diff", {"diff": d, "factor": factor}


def factors_to_torch(a: np.ndarray, b: np.ndarray, conv: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flax `a`, `b` -> torch `lora_A`, `lora_B` weights (conv when the target is a conv)."""
    if a.ndim == 5:
        return a.transpose(4, 3, 0, 1, 2), b.T[:, :, None, None, None]
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
    if conv:
        return a.T[:, :, None, None], b.T[:, :, None, None]
    return a.T, b.T
