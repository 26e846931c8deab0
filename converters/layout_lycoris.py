"""Flax-layout fields of the LyCORIS algorithms beyond LoRA/LoHa/LoKr (IA3, GLoRA, OFT, BOFT) and of
DoRA on LoHa/LoKr. Torch layouts as LyCORIS 4.1.3 saves them (`lycoris/modules/*.py`):

* IA3: `weight` `(out,)` for Linear, `(1, out, 1, 1)` for Conv; `(in,)` / `(1, in, 1, 1)` when
  `on_input` is 1.
* GLoRA: `a1.weight` `(in, r[, 1, 1])`, `a2.weight` `(r, in[, 1, 1])`, `b1.weight` `(out, r[, 1, 1])`,
  `b2.weight` `(r, in[, kh, kw])`, Tucker `bm.weight` `(r, r, kh, kw)` with a 1x1 `b2`; `alpha`.
* diagonal OFT `oft_blocks` `(n, b, b)`, BOFT `(m, n, b, b)`, `n * b` output channels;
  `rescale` `(out, 1[, 1, 1])`; `alpha` is the norm constraint per output channel.
* T-LoRA: `q_layer.weight` `(r, in[, 1, 1])`, `p_layer.weight` `(out, r[, 1, 1])`, `lambda_layer` `(1, r)`,
  `alpha`. The file holds only the trained factors; the delta subtracts their starting point, the rank-`r`
  truncated SVD of the base weight, which LyCORIS recomputes from the weight when it loads the file:
  `ΔW = (alpha / r) · (P diag(λ) Q − U_r diag(s_r) V_rᵀ)`, every rank active (no timestep mask set).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from converters import layout
from converters.errors import InvalidAdapterError, ShapeMismatchError
from converters.records import Record


def ia3_leaf(rec: Record, kernel_shape, path: str, alpha) -> tuple[str, dict]:
    t = rec.tensors
    on_input = bool(float(np.asarray(t["on_input"]).reshape(())))
    vec = np.asarray(t["ia3_w"]).reshape(-1)
    axis = -2 if on_input else -1
    if vec.size != kernel_shape[axis]:
        side = "input" if on_input else "output"
        raise ShapeMismatchError(
            f"{rec.sources['ia3_w']}: IA3 weight of shape {tuple(t['ia3_w'].shape)} scales the {side} channels "
            f"(on_input={int(on_input)}) but {path} has {kernel_shape[axis]} of them (shape {tuple(kernel_shape)})."
        )
    shape = [1] * len(kernel_shape)
    shape[axis] = vec.size
    return "ia3", {"weight": vec.reshape(shape), "kernel": tuple(int(n) for n in kernel_shape)}


def glora_leaf(rec: Record, kernel_shape, path: str, alpha: float) -> tuple[str, dict]:
    t = rec.tensors
    a1, a2 = t["glora_a1"], t["glora_a2"]
    r, n_in = a2.shape[0], a2.shape[1]
    if n_in != kernel_shape[-2]:
        raise ShapeMismatchError(
            f"{rec.sources['glora_a2']}: GLoRA a2 of shape {tuple(a2.shape)} mixes {n_in} input channels but {path} "
            f"has {kernel_shape[-2]} (shape {tuple(kernel_shape)})."
        )
    b_half = {"down": t["glora_b2"], "up": t["glora_b1"]}
    if "glora_bm" in t:
        b_half["mid"] = t["glora_bm"]
    names = {"down": "glora_b2", "up": "glora_b1", "mid": "glora_bm"}
    b_rec = dataclasses.replace(rec, kind="lora", tensors=b_half,
                                sources={role: rec.sources[names[role]] for role in b_half})
    _, b = layout.lora_leaf(b_rec, kernel_shape, path, alpha)
    fields: dict[str, Any] = {
        "a_down": a2.reshape(r, n_in).T,
        "a_up": a1.reshape(n_in, r).T,
        "b_down": b["a"],
        "b_up": b["b"],
        "alpha": alpha,
    }
    return "glora", fields


def oft_leaf(rec: Record, kernel_shape, path: str, alpha: float | None) -> tuple[str, dict]:
    t = rec.tensors
    blocks = t["oft_blocks"]
    n_out = kernel_shape[-1]
    n, b = blocks.shape[-3], blocks.shape[-1]
    fits = n * b == n_out
    if blocks.ndim == 4:  # BOFT: stage i mixes channels 2**i * b / 2 apart
        fits = fits and all(n_out % (2**i * b) == 0 for i in range(blocks.shape[0]))
    if not fits:
        raise ShapeMismatchError(
            f"{rec.sources['oft_blocks']}: {'BOFT' if blocks.ndim == 4 else 'OFT'} blocks of shape {tuple(blocks.shape)} "
            f"cover {n * b} output channels but {path} has {n_out} (shape {tuple(kernel_shape)})."
        )
    rescale = t["rescale"].reshape(-1) if "rescale" in t else np.ones((n_out,), np.float32)
    fields = {
        "blocks": blocks,
        "rescale": rescale,
        "constraint": float(alpha or 0.0) * n_out,
        "kernel": tuple(int(k) for k in kernel_shape),
    }
    return ("boft" if blocks.ndim == 4 else "oft"), fields


def tlora_leaf(rec: Record, kernel_shape, path: str, alpha: float) -> tuple[str, dict]:
    """The trained half of a T-LoRA delta as LoRA factors; `with_tlora_base` adds the base half."""
    t = rec.tensors
    if len(kernel_shape) > 2 and any(int(n) != 1 for n in kernel_shape[:-2]):
        raise ShapeMismatchError(
            f"{rec.sources['tlora_q']}: a T-LoRA module on {path}, a {'x'.join(map(str, kernel_shape[:-2]))} conv "
            f"(shape {tuple(kernel_shape)}): LyCORIS 4.1.3 writes 1x1 factors for it that no forward can add to the "
            "layer's output (LyCORIS's own fails on it); T-LoRA is defined for Linear layers and 1x1 convs."
        )
    q, p = t["tlora_q"], t["tlora_p"]
    if q.shape[1] != kernel_shape[-2] or p.shape[0] != kernel_shape[-1]:
        raise ShapeMismatchError(
            f"{rec.sources['tlora_q']}: T-LoRA q_layer {tuple(q.shape)} and p_layer {tuple(p.shape)} (torch layout) give "
            f"a delta of shape ({p.shape[0]}, {q.shape[1]}) but {path} has shape {tuple(kernel_shape)}. The adapter "
            "was made for a different model or model size."
        )
    r = int(q.shape[0])
    lam = np.asarray(t["tlora_lambda"], np.float32).reshape(r, *([1] * (t["tlora_q"].ndim - 1)))
    lora = dataclasses.replace(rec, kind="lora", tensors={"down": lam * np.asarray(t["tlora_q"], np.float32), "up": t["tlora_p"]},
                               sources={"down": rec.sources["tlora_q"], "up": rec.sources["tlora_p"]})
    _, fields = layout.lora_leaf(lora, kernel_shape, path, alpha)
    return "tlora", fields


def with_tlora_base(fields: dict, kernel) -> dict:
    """LoRA fields of a whole T-LoRA delta: the trained factors beside minus the rank-`r` truncated SVD
    of the base `kernel` (Flax layout), concatenated on the rank axis (rank `2r`, alpha doubled so the
    scale stays `alpha / r`)."""
    a, b = np.asarray(fields["a"], np.float32), np.asarray(fields["b"], np.float32)
    r = a.shape[-1]
    w = np.asarray(kernel, np.float32).reshape(-1, np.shape(kernel)[-1])  # (in, out) = W_torchᵀ; float32 as LyCORIS
    v, s, ut = np.linalg.svd(w, full_matrices=False)  # W_torch = utᵀ diag(s) vᵀ
    k = min(r, s.size)
    base_a = np.zeros((w.shape[0], r), np.float32)
    base_b = np.zeros((r, w.shape[1]), np.float32)
    base_a[:, :k] = v[:, :k] * s[:k]
    base_b[:k] = -ut[:k]
    return {
        **fields,
        "a": np.concatenate([a, base_a.reshape(a.shape)], axis=-1),
        "b": np.concatenate([b, base_b], axis=0),
        "alpha": 2.0 * float(fields["alpha"]),
    }


def with_dora(builder):
    """A LoHa/LoKr leaf builder that also reads LyCORIS `dora_scale` into the leaf's `magnitude`."""

    def build(rec: Record, kernel_shape, path: str, alpha) -> tuple[str, dict]:
        if "dora_scale" not in rec.tensors:
            return builder(rec, kernel_shape, path, alpha)
        inner = dataclasses.replace(rec, tensors={k: v for k, v in rec.tensors.items() if k != "dora_scale"})
        leaf, fields = builder(inner, kernel_shape, path, alpha)
        if leaf not in ("loha", "lokr"):
            raise InvalidAdapterError(
                f"{rec.sources['dora_scale']}: DoRA on a {rec.kind} module whose factors only fit {path} "
                f"{tuple(kernel_shape)} as a whole delta is not supported."
            )
        fields["magnitude"] = layout._magnitude(rec, "dora_scale", kernel_shape, path)
        fields["strength"] = "comfyui"
        return leaf, fields

    return build
