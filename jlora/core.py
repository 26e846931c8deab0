"""The transform: apply, fuse and unfuse scaled low-rank deltas as tree maps.

An adapter is a pytree shaped like the params it targets, with `None` where a
weight has no adapter and a `LoraLeaf` where it has one. Every function here is
pure and jittable; `scale` is a traced array, so changing it never recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import InvalidAdapterError, UnsafeFusingError
from jlora.leaf import LoraLeaf, SumLeaf, is_adapter_leaf, with_dora_strength

PyTree = Any


def _map(fn, adapter: PyTree, params: PyTree, what: str) -> PyTree:
    try:
        return jax.tree.map(fn, adapter, params, is_leaf=is_adapter_leaf)
    except ValueError as e:
        raise InvalidAdapterError(
            f"{what}: the adapter tree does not have the structure of the params tree ({e}). "
            "Build adapters from the same params with jlora.load_lora / load_lora_weights."
        ) from None


def _check_shape(leaf, w) -> None:
    if leaf.shape != tuple(w.shape):
        raise InvalidAdapterError(f"adapter leaf of kernel shape {leaf.shape} applied to a weight of shape {tuple(w.shape)}.")


def check_scale(scale, what: str) -> jax.Array:
    """`scale` as a float32 scalar array; a typed error for None, strings, non-scalars or a concrete
    non-finite value (traced scalars pass; per-sample scale vectors belong to `jlora.per_sample`)."""
    if scale is None or isinstance(scale, (str, bytes, bool)) or (isinstance(scale, (list, tuple, dict))):
        raise InvalidAdapterError(f"{what}: scale must be a number or a scalar array, got {scale!r}.")
    try:
        s = jnp.asarray(scale, jnp.float32)
    except (TypeError, ValueError) as e:
        raise InvalidAdapterError(f"{what}: scale must be a number or a scalar array, got {type(scale).__name__} ({e}).") from None
    if s.ndim != 0:
        raise InvalidAdapterError(f"{what}: scale must be a scalar, got shape {tuple(s.shape)}; for a scale per sample "
                                  "use jlora.per_sample.")
    if not isinstance(s, jax.core.Tracer) and not bool(jnp.isfinite(s)):
        raise InvalidAdapterError(f"{what}: scale must be finite, got {float(s)}.")
    return s


def delta(adapter: PyTree, scale=1.0) -> PyTree:
    """The float32 weight deltas `scale * alpha / r * a @ b` of an adapter (None elsewhere)."""
    s = check_scale(scale, "delta")
    return jax.tree.map(lambda leaf: None if leaf is None else s * leaf.delta(), adapter, is_leaf=is_adapter_leaf)


def apply(params: PyTree, adapter: PyTree, scale=1.0, *, component: str | None = None, strategy: str = "merge",
          apply_fn=None, dora_strength: str | None = None) -> PyTree:
    """Params with the adapter merged in: `W + scale * (alpha / r) * a @ b` for each adapted weight.

    The delta is computed in float32 and the result cast back to the weight's dtype.
    Use it inside the jitted/sharded denoiser call; `scale` may be a traced value.

    Args:
      params: the model's params tree (linen dict, FrozenDict or nnx state).
      adapter: tree of the same structure with `None` or `LoraLeaf` leaves.
      scale: the call-time LoRA scale (diffusers' `cross_attention_kwargs={"scale": s}`).
      component: with a `jlora.Adapters` collection, the component to take (its active adapters at their
        weights, `jlora.resolve`).
      strategy: "merge" (the default) returns merged params. "unmerged" and "auto" need `apply_fn`
        (a linen model's call taking the params tree first) and return `call(*args, **kwargs)`, which runs
        `apply_fn(params, *args, **kwargs)` with each kernel LoRA either merged or run beside its
        nn.Dense / nn.Conv layer: "unmerged" always beside, "auto" whichever costs less for the tokens
        the layer sees (decided at trace time; `jlora.strategy_plan` lists the choices).
      apply_fn: the model call for strategy "unmerged" / "auto".
      dora_strength: how `scale` acts on DoRA leaves (a static choice, one of `jlora.leaf.DORA_STRENGTHS`):
        "peft" (inside the norm), "comfyui" (A1111/ComfyUI: `W + s * (DoRA(W) - W)`) or "lycoris"
        (LyCORIS: the delta in full, only the renormalisation scaled). None: each leaf's own rule
        (PEFT files "peft", kohya/LyCORIS `dora_scale` files "comfyui"). All agree at scale 1.

    >>> y = jax.jit(lambda p, a, s, x: model.apply({"params": jlora.apply(p, a, s)}, x))(p, a, 0.8, x)
    >>> fn = lambda p, x: model.apply({"params": p}, x)
    >>> y = jax.jit(lambda p, a, s, x: jlora.apply(p, a, s, strategy="auto", apply_fn=fn)(x))(p, a, 0.8, x)
    """
    s = check_scale(scale, "apply")
    adapter = with_dora_strength(_resolved(adapter, component, "apply"), dora_strength)
    if strategy != "merge" or apply_fn is not None:
        from jlora.strategy import with_lora

        if apply_fn is None:
            raise InvalidAdapterError(f"apply: strategy={strategy!r} runs LoRAs beside their layers during the model call, "
                                      "so it needs apply_fn= (the model call taking the params tree first).")
        fn = with_lora(apply_fn, strategy=strategy)
        return lambda *args, **kwargs: fn(params, adapter, s, *args, **kwargs)
    if adapter is None:
        return params

    def merge(leaf, w):
        if leaf is None:
            return w
        _check_shape(leaf, w)
        return leaf.merge(w, s).astype(w.dtype)

    return _map(merge, adapter, params, "apply")


def _single_pass(leaf) -> bool:
    """Whether `leaf` is a plain LoRA leaf, whose whole-weight merge has a single-pass form."""
    return isinstance(leaf, LoraLeaf) and type(leaf).merge is LoraLeaf.merge


def _merge_once(leaf, w, s) -> jax.Array:
    """`leaf.merge(w, s)` for a whole-weight fuse (the single-pass form where there is one)."""
    return leaf.merge(w, s, single_pass=True) if _single_pass(leaf) else leaf.merge(w, s)


@jax.jit
def _merge_list(weights: list, leaves: list, s) -> list:
    return [_merge_once(leaf, w, s).astype(w.dtype) for w, leaf in zip(weights, leaves)]


def _merge_touched(params: PyTree, adapter: PyTree, s) -> PyTree:
    """`apply(params, adapter, s)` as one compiled merge over the adapted weights only: the other
    weights are the caller's arrays, not copies made by the compiled function."""
    flat, treedef = jax.tree_util.tree_flatten(adapter, is_leaf=lambda x: x is None or is_adapter_leaf(x))
    try:
        weights = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as e:
        raise InvalidAdapterError(
            f"fuse: the adapter tree does not have the structure of the params tree ({e}). "
            "Build adapters from the same params with jlora.load_lora / load_lora_weights."
        ) from None
    touched = [i for i, leaf in enumerate(flat) if leaf is not None]
    for i in touched:
        _check_shape(flat[i], weights[i])
    merged = _merge_list([weights[i] for i in touched], [flat[i] for i in touched], s)
    out = list(weights)
    for i, w in zip(touched, merged):
        out[i] = w
    return jax.tree_util.tree_unflatten(treedef, out)


def _find_nonfinite(fused: PyTree, adapter: PyTree) -> list[str]:
    paths = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_adapter_leaf)[0]
    weights = jax.tree_util.tree_flatten(fused)[0]
    return [
        jax.tree_util.keystr(path)
        for (path, leaf), w in zip(paths, weights)
        if leaf is not None and not bool(np.all(np.isfinite(np.asarray(jnp.asarray(w, jnp.float32)))))
    ]


@dataclasses.dataclass(frozen=True)
class FuseRecord:
    """What `fuse(..., return_record=True)` merged: the adapter, the scale, and a fingerprint of the
    adapter's arrays, so `unfuse` can subtract exactly that (or refuse another adapter or scale)."""

    adapter: PyTree
    scale: float
    fingerprint: str

    def __repr__(self) -> str:
        return f"FuseRecord({count(self.adapter)} weights, scale={self.scale}, fingerprint={self.fingerprint[:12]})"


def fingerprint(adapter: PyTree) -> str:
    """A digest of an adapter's structure, shapes, dtypes and values (host-side; call outside `jit`)."""
    import hashlib

    h = hashlib.sha256()
    flat, treedef = jax.tree_util.tree_flatten(adapter)
    h.update(str(treedef).encode())
    for x in flat:
        a = np.asarray(x)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _resolved(adapter, component, what: str):
    """An `Adapters` collection resolved for `component`; any other adapter as it is."""
    from jlora.adapters import Adapters, resolve

    if isinstance(adapter, Adapters):
        if component is None:
            raise InvalidAdapterError(f"{what}: an Adapters collection needs component=, e.g. component='unet'.")
        return resolve(adapter, component)
    if component is not None:
        raise InvalidAdapterError(f"{what}: component= is for an Adapters collection; this is one adapter tree.")
    return adapter


def fuse(params: PyTree, adapter: PyTree, scale=1.0, *, safe_fusing: bool = False, component: str | None = None,
         return_record: bool = False, dora_strength: str | None = None):
    """Fuse the adapter into the weights once (diffusers' `fuse_lora(lora_scale=scale)`).

    Pure: returns new params, the input is not modified. With `safe_fusing=True`
    the fused weights are checked for NaN/inf and `UnsafeFusingError` names the
    offending weights (call it outside `jit`). `adapter` may be a `jlora.Adapters` with
    `component=` (its active adapters at their weights, diffusers' `fuse_lora(adapter_names=...)`).
    With `return_record=True` it returns `(fused, FuseRecord)`; `unfuse(fused, record)` then
    subtracts exactly what was fused.

    >>> fused, record = jlora.fuse(params, adapter, scale=0.8, return_record=True)
    >>> restored = jlora.unfuse(fused, record)
    """
    adapter = with_dora_strength(_resolved(adapter, component, "fuse"), dora_strength)
    s = check_scale(scale, "fuse")
    fused = params if adapter is None else _merge_touched(params, adapter, s)
    if safe_fusing and adapter is not None:
        bad = _find_nonfinite(fused, adapter)
        if bad:
            raise UnsafeFusingError(
                f"fusing gives NaN/inf in {len(bad)} weights: {bad[:5]}; params were left as they were. "
                "The LoRA file is corrupt or the scale overflows the weight dtype."
            )
    if return_record:
        return fused, FuseRecord(adapter, float(s), fingerprint(adapter))
    return fused


def unfuse(params: PyTree, adapter, scale=None, *, record: FuseRecord | None = None, component: str | None = None) -> PyTree:
    """Undo `fuse(params, adapter, scale)` (subtracts the same delta, in float32).

    `unfuse(fused, record)` takes adapter and scale from a `FuseRecord`. `unfuse(fused, adapter, scale,
    record=record)` checks them against it. Without a record, `scale` defaults to 1.0.

    Raises:
      InvalidAdapterError: the adapter has leaves whose merge is not additive (DoRA, set weights), or
        adapter / scale differ from the record's.
    """
    if isinstance(adapter, FuseRecord):
        if record is not None:
            raise InvalidAdapterError("unfuse: give the FuseRecord once, as the adapter or as record=.")
        record, adapter = adapter, adapter.adapter
        if scale is not None and float(scale) != record.scale:
            raise InvalidAdapterError(f"unfuse: scale {scale} differs from the fused scale {record.scale}.")
        scale = record.scale
    else:
        adapter = _resolved(adapter, component, "unfuse")
        if record is not None:
            if fingerprint(adapter) != record.fingerprint:
                raise InvalidAdapterError("unfuse: this adapter is not the one that was fused (its arrays differ from the "
                                          f"record's, {record!r}); pass the record itself: unfuse(fused, record).")
            scale = record.scale if scale is None else scale
            if float(scale) != record.scale:
                raise InvalidAdapterError(f"unfuse: scale {scale} differs from the fused scale {record.scale}.")
    scale = 1.0 if scale is None else scale
    if adapter is None:
        return params
    leaves = jax.tree.leaves(adapter, is_leaf=is_adapter_leaf)
    if any(leaf is not None and not leaf.invertible for leaf in leaves):
        raise InvalidAdapterError(
            "unfuse: this adapter has leaves whose fusing cannot be undone (DoRA renormalises weights, set "
            "weights replace them); keep the params from before fuse() instead."
        )
    return _unapply_jit(params, adapter, check_scale(scale, "unfuse"))


def _unapply(params: PyTree, adapter: PyTree, s) -> PyTree:
    """Each adapted weight through its leaf's `unmerge` (subtraction for additive leaves; the exact
    inverse for IA3 / GLoRA / OFT / BOFT, which rescale the weight)."""

    def undo(leaf, w):
        if leaf is None:
            return w
        _check_shape(leaf, w)
        if _single_pass(leaf):
            return _merge_once(leaf, w, -s).astype(w.dtype)
        return leaf.unmerge(w, s).astype(w.dtype)

    return _map(undo, adapter, params, "unfuse")


_unapply_jit = jax.jit(_unapply)


def combine(adapters: Mapping[str, PyTree] | Sequence[PyTree], weights=None) -> PyTree:
    """Several adapters of the same params as one, each scaled by its weight (diffusers' `set_adapters`).

    The result stacks the factors along the rank axis, so
    `apply(p, combine({"a": A, "b": B}, {"a": wa, "b": wb}), s)` equals
    `p + s * (wa * delta(A) + wb * delta(B))` exactly. Weights may be traced arrays.

    Args:
      adapters: name -> adapter (or a list of adapters), all built for the same params.
      weights: name -> weight (or a list), default 1.0 each.
    """
    if isinstance(adapters, Mapping):
        names = list(adapters)
        trees = [adapters[n] for n in names]
        weights = weights if weights is not None else {}
        if not isinstance(weights, Mapping):
            raise InvalidAdapterError("combine: pass weights as a dict keyed by adapter name when adapters is a dict.")
        unknown = set(weights) - set(names)
        if unknown:
            raise InvalidAdapterError(f"combine: weights for unknown adapters {sorted(unknown)}; adapters are {names}.")
        ws = [weights.get(n, 1.0) for n in names]
    else:
        trees = list(adapters)
        ws = list(weights) if weights is not None else [1.0] * len(trees)
        if len(ws) != len(trees):
            raise InvalidAdapterError(f"combine: {len(trees)} adapters but {len(ws)} weights.")
    if not trees:
        raise InvalidAdapterError("combine: no adapters given.")

    def stack(*leaves):
        present = [(l, w) for l, w in zip(leaves, ws) if l is not None]
        if not present:
            return None
        if any(not l.additive for l, _ in present):
            raise InvalidAdapterError("combine: DoRA, set and multiplicative LyCORIS leaves (IA3, GLoRA, OFT, BOFT) change "
                                      "weights as a function of the weight and cannot be summed with other adapters.")
        if not all(isinstance(l, LoraLeaf) for l, _ in present):
            return SumLeaf(parts=tuple(l for l, _ in present), weights=jnp.stack([jnp.asarray(w, jnp.float32) for _, w in present]))
        if len({jnp.ndim(l.b) for l, _ in present}) > 1:
            raise InvalidAdapterError("combine: stacked and unstacked LoRA leaves on the same weight.")

        def scaled_a(leaf, w):  # fold weight * alpha / r into a; alpha may be per layer (stacked)
            a = jnp.asarray(leaf.a, jnp.float32)
            alpha = jnp.asarray(leaf.alpha, jnp.float32)
            factor = jnp.asarray(w, jnp.float32) * alpha.reshape(alpha.shape + (1,) * (a.ndim - alpha.ndim)) / leaf.rank
            return a * factor

        a = jnp.concatenate([scaled_a(l, w) for l, w in present], axis=-1)
        b = jnp.concatenate([jnp.asarray(l.b, jnp.float32) for l, _ in present], axis=-2)  # the rank axis
        alpha = jnp.full(jnp.shape(present[0][0].alpha), a.shape[-1], jnp.float32)
        return LoraLeaf(a=a.astype(present[0][0].a.dtype), b=b.astype(present[0][0].b.dtype), alpha=alpha)

    flat = [jax.tree_util.tree_flatten(t, is_leaf=is_adapter_leaf) for t in trees]
    treedef = flat[0][1]
    for i, (_, other) in enumerate(flat[1:], 1):
        if other != treedef:
            raise InvalidAdapterError(f"combine: adapter {i} has a different tree structure than adapter 0.")
    return jax.tree_util.tree_unflatten(treedef, [stack(*leaves) for leaves in zip(*(f[0] for f in flat))])


def summary(adapter: PyTree) -> str:
    """One line about an adapter tree: weights adapted, leaf kinds, ranks and factor dtypes.

    >>> jlora.summary(adapter)
    'adapter: 64 weights (lora 64), ranks [4], float32'
    """
    from collections import Counter

    leaves = [leaf for leaf in jax.tree.leaves(adapter, is_leaf=is_adapter_leaf) if leaf is not None]
    if not leaves:
        return "adapter: no weights"
    kinds = Counter(type(leaf).__name__.removesuffix("Leaf").lower() for leaf in leaves)
    ranks = sorted({int(leaf.rank) for leaf in leaves if hasattr(leaf, "rank")})
    dtypes = sorted({str(x.dtype) for leaf in leaves for x in jax.tree.leaves(leaf) if getattr(x, "ndim", 0) >= 2})
    kind_text = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    rank_text = f", ranks {ranks}" if ranks else ""
    return f"adapter: {len(leaves)} weights ({kind_text}){rank_text}, {'/'.join(dtypes) or 'no factors'}"


def count(adapter: PyTree) -> int:
    """Number of adapted weights in an adapter tree."""
    return sum(1 for leaf in jax.tree.leaves(adapter, is_leaf=is_adapter_leaf) if leaf is not None)
