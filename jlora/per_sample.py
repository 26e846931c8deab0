"""A different LoRA per sample in one batch.

Merging weights gives one LoRA per call. `per_sample` runs the LoRAs unmerged
instead, next to every `nn.Dense` / `nn.Conv` of a linen model whose kernel has a leaf:
`y_i += scale_i * alpha_k / r * (x_i @ a_k) @ b_k` with `k = ids[i]` (convs: the `a` kernel with
the module's strides and padding, then a 1x1 `b`). The K adapters are stacked by
`stack_adapters` (padded to one rank and target set, leading axis K).

>>> stacked = stack_adapters([a0, a1, a2])
>>> step = jax.jit(per_sample_apply(unet.apply))
>>> y = step(stacked, jnp.array([0, 2, NO_LORA, 0]), jnp.array([1.0, 0.8, 0.0, 0.5]), {"params": p}, x, t, c)

The leading axis of every adapted module's input must be the batch axis, of size `len(ids)`.
In diffusers-Flax UNets and transformers-Flax CLIP encoders it is (attention projections see
`(B, seq, C)`, convs `(B, H, W, C)`, `time_emb_proj` `(B, C)`; pass timesteps of shape `(B,)`).
With classifier-free guidance the UNet batch is `[uncond; cond]`, `2B` rows: pass
`jnp.concatenate([ids, ids])` and the scales likewise (diffusers applies the LoRA to both halves).

Layers run under `nn.scan` (jlora.models.flux's stacked blocks, kernels `(L, in, out)`): a
scanned module sees one layer's kernel and no layer index, so its LoRAs travel through the scan
as the `lora` variable collection, which the scan slices per layer like its params. The scan
must list it (`variable_axes={"params": 0, "lora": 0}`, as jlora.models.flux does) and the
model gets `per_sample_variables(stacked)` as `variables["lora"]` (`per_sample_apply` adds it).
Otherwise `per_sample` raises `UnsupportedModuleError` naming the path.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import InvalidAdapterError, KeyMismatchError, ShapeMismatchError, UnsupportedModuleError
from jlora.hotswap import _flat, _name, _require_lora
from jlora.leaf import LoraLeaf

PyTree = Any

NO_LORA = -1
"""The adapter id of a sample that runs without LoRA (any id outside `[0, K)` does the same)."""

METHODS = ("concat", "gather")

COLLECTION = "lora"
"""The linen variable collection that carries layer-stacked LoRAs through `nn.scan`."""


def _coefficients(ids, scales, alpha, rank: int) -> jax.Array:
    """`(B, K)`: `scale_i * alpha_k / R` where sample i uses adapter k, else 0."""
    one_hot = jax.nn.one_hot(ids, alpha.shape[0], dtype=jnp.float32)  # ids outside [0, K): a zero row
    return one_hot * scales[:, None] * (alpha[None, :] / rank)


def _per_row(h: jax.Array, coef: jax.Array) -> jax.Array:
    """`h` `(B, ..., n)` times `coef` `(B, n)` broadcast over the middle axes."""
    return h * coef.reshape((coef.shape[0],) + (1,) * (h.ndim - 2) + (coef.shape[-1],)).astype(h.dtype)


def _down(module, x, a):
    """`x` through the down factor `a` `(..., in, n)`: a matmul for Dense, the module's own conv for Conv."""
    if isinstance(module, nn.Conv):
        conv = module.clone(parent=None, features=a.shape[-1], use_bias=False)
        return conv.apply({"params": {"kernel": a}}, x)
    return jnp.tensordot(x, a, axes=1, precision=module.precision)


def _lora_concat(module, x, leaf: LoraLeaf, ids, scales):
    """The K adapters side by side on the rank axis: one down and one up projection, masked per sample."""
    k, rank = leaf.a.shape[0], leaf.a.shape[-1]
    a = jnp.moveaxis(leaf.a, 0, -2).reshape(leaf.a.shape[1:-1] + (k * rank,))
    b = leaf.b.reshape(k * rank, leaf.b.shape[-1])
    coef = jnp.repeat(_coefficients(ids, scales, leaf.alpha, rank), rank, axis=1)
    return jnp.tensordot(_per_row(_down(module, x, a), coef), b, axes=1, precision=module.precision)


def _lora_gather(module, x, leaf: LoraLeaf, ids, scales):
    """Each sample's own factors, gathered by id: the work per sample does not grow with K."""
    k, rank = leaf.a.shape[0], leaf.a.shape[-1]
    picked = jnp.clip(ids, 0, k - 1)
    coef = jnp.take_along_axis(_coefficients(ids, scales, leaf.alpha, rank), picked[:, None], axis=1)
    h = jax.vmap(lambda xi, ai: _down(module, xi[None], ai)[0])(x, leaf.a[picked])
    return jnp.einsum("b...r,bro->b...o", _per_row(h, coef), leaf.b[picked], precision=module.precision)


def _check_module(module, leaf: LoraLeaf, x, batch: int, name: str) -> None:
    if not isinstance(module, (nn.Dense, nn.Conv)):
        raise UnsupportedModuleError(
            f"per_sample: {name} belongs to a {type(module).__name__}; LoRAs run unmerged only on nn.Dense and "
            "nn.Conv. Merge this one with jlora.apply."
        )
    spatial = len(module.kernel_size) if isinstance(module, nn.Conv) else 0
    if leaf.a.ndim != spatial + 3 or leaf.b.ndim != 3:
        raise ShapeMismatchError(
            f"per_sample: the LoRA at {name} (a {tuple(leaf.a.shape[1:])}, b {tuple(leaf.b.shape[1:])}) does not fit "
            f"a {type(module).__name__} with {spatial} spatial axes; build the adapters from this model's params."
        )
    if isinstance(module, nn.Conv) and (module.feature_group_count != 1 or module.mask is not None):
        raise UnsupportedModuleError(f"per_sample: {name} is a grouped or masked conv; merge its LoRA with jlora.apply.")
    if x.ndim < 2 or x.shape[-1] != leaf.a.shape[-2] or leaf.b.shape[-1] != module.features:
        raise ShapeMismatchError(
            f"per_sample: {name}'s module takes input {tuple(x.shape)} and has {module.features} features but its "
            f"LoRA is (in {leaf.a.shape[-2]}, out {leaf.b.shape[-1]}); build the adapters from this model's params."
        )
    if x.shape[0] != batch:
        raise ShapeMismatchError(
            f"per_sample: {name}'s module got input {tuple(x.shape)} whose leading axis is not the batch of {batch} "
            "ids. Adapted modules must see the batch first; with classifier-free guidance the UNet batch is "
            "[uncond; cond]: pass jnp.concatenate([ids, ids]) and the scales likewise; pass timesteps as (B,)."
        )


def _leaf_table(stacked: PyTree) -> tuple[dict, int]:
    """`{module path: leaf}` of a stacked adapter, and its K."""
    table, ks = {}, set()
    for path, leaf in _flat(stacked)[0]:
        if leaf is None:
            continue
        _require_lora(leaf, path, "per_sample")
        if path[-1] != "kernel":
            raise InvalidAdapterError(f"per_sample: {_name(path)} is not a kernel; only kernel LoRAs run unmerged.")
        if not (leaf.a.shape[:1] == leaf.b.shape[:1] == jnp.shape(leaf.alpha)[:1]):
            raise InvalidAdapterError(f"per_sample: {_name(path)} is not stacked on a leading adapter axis; use stack_adapters.")
        table[path[:-1]] = leaf
        ks.add(leaf.a.shape[0])
    if not table:
        raise InvalidAdapterError("per_sample: the stacked adapter has no LoRA leaves.")
    if len(ks) > 1:
        raise InvalidAdapterError(f"per_sample: leaves stack different numbers of adapters {sorted(ks)}; use stack_adapters.")
    return table, ks.pop()


def _batch_arrays(ids, scales, k: int):
    """`ids` `(B,)` int and `scales` `(B,)` float32, checked (id range only when concrete)."""
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ShapeMismatchError(f"per_sample: ids must be a 1-D integer array, one adapter id per sample; got {ids.dtype}{ids.shape}.")
    if not isinstance(ids, jax.core.Tracer) and np.any((np.asarray(ids) < NO_LORA) | (np.asarray(ids) >= k)):
        raise ShapeMismatchError(f"per_sample: ids {np.asarray(ids).tolist()} must be in [0, {k}) or NO_LORA ({NO_LORA}).")
    scales = jnp.asarray(scales, jnp.float32)
    if scales.ndim == 0:
        scales = jnp.broadcast_to(scales, ids.shape)
    if scales.shape != ids.shape:
        raise ShapeMismatchError(f"per_sample: scales {scales.shape} must be a scalar or one per sample like ids {ids.shape}.")
    return ids, scales


def _layer_stacked(leaf: LoraLeaf) -> bool:
    """A stacked adapter's leaf on a layer-stacked kernel: a `(K, L, in, R)`, b `(K, L, R, out)`."""
    return leaf.b.ndim == 4


def per_sample_variables(stacked: PyTree) -> dict:
    """The `lora` collection for models that scan their layers: each layer-stacked leaf of `stacked`
    with the layer axis first (`a (L, K, in, R)`, `b (L, K, R, out)`, `alpha (L, K)`), at its module's path.

    Pass it as `variables["lora"]` next to `variables["params"]` (`per_sample_apply` does); the
    model's `nn.scan` must slice it (`variable_axes={"params": 0, "lora": 0}`).
    """
    out: dict = {}
    for path, leaf in _flat(stacked)[0]:
        if leaf is None or not _layer_stacked(leaf):
            continue
        node = out
        for key in path[:-2]:
            node = node.setdefault(key, {})
        node[path[-2]] = {"a": jnp.moveaxis(leaf.a, 1, 0), "b": jnp.moveaxis(leaf.b, 1, 0), "alpha": jnp.moveaxis(leaf.alpha, 1, 0)}
    return out


def _layer_slice(module, leaf: LoraLeaf, name: str) -> LoraLeaf:
    """This layer's factors of a layer-stacked leaf, from the `lora` collection the scan sliced."""
    if not all(module.has_variable(COLLECTION, f) for f in ("a", "b", "alpha")):
        raise UnsupportedModuleError(
            f"per_sample: the LoRA at {name} (a {tuple(leaf.a.shape[1:])}) is stacked over layers run by nn.scan, "
            f"and the module has no {COLLECTION!r} variables for its layer. Give the scan "
            f"variable_axes={{'params': 0, {COLLECTION!r}: 0}} (jlora.models.flux does) and pass "
            f"per_sample_variables(stacked) as variables[{COLLECTION!r}] (per_sample_apply does)."
        )
    a, b, alpha = (module.get_variable(COLLECTION, f) for f in ("a", "b", "alpha"))
    if a.shape[0] != leaf.a.shape[0] or a.shape[1:] != leaf.a.shape[2:] or b.shape[1:] != leaf.b.shape[2:]:
        raise ShapeMismatchError(
            f"per_sample: {name}: the {COLLECTION!r} variables (a {tuple(a.shape)}, b {tuple(b.shape)}) are not this "
            "stacked adapter's layer slices; build them with per_sample_variables(stacked)."
        )
    return LoraLeaf(a=a, b=b, alpha=alpha)


@contextlib.contextmanager
def per_sample(stacked: PyTree, ids, scales=1.0, *, method: str = "concat", strict: bool = True):
    """Run a linen model with LoRA `ids[i]` at `scales[i]` on sample i, unmerged, in one call.

    Inside the block every linen `nn.Dense` / `nn.Conv` call whose module path has a leaf in `stacked`
    (module path + `kernel` = leaf path) adds `scale_i * alpha_k / R * (x_i @ a_k) @ b_k` to its
    output. Run the model on the base params, not `jlora.apply`-merged ones. Enter the block
    inside the jitted function, with `stacked`, `ids` and `scales` among its arguments (or use
    `per_sample_apply`): the LoRAs are wired in while jax traces, so a jitted function first
    called inside the block would keep those ids (this raises when it can tell).

    Args:
      stacked: from `stack_adapters`; adapter k serves the samples with `ids == k`.
      ids: `(B,)` integers, `NO_LORA` (-1) for a sample without LoRA.
      scales: `(B,)` or a scalar: the LoRA call scale per sample.
      method: "concat" runs the K adapters side by side (one matmul or conv of width K*R, then a
        per-sample mask; best when K*R is small) and "gather" takes each sample's own factors
        (batched per-sample matmuls and convs; work independent of K).
      strict: on leaving the block, raise if some leaf's module never ran.

    Yields:
      The set of module paths that ran with a LoRA (filled while the model runs).

    Raises:
      UnsupportedModuleError: a leaf's module is scanned (`nn.scan`), grouped, or not Dense/Conv.
      ShapeMismatchError: an adapted module's input does not lead with the batch of `len(ids)`.
      KeyMismatchError: (strict) leaves whose modules never ran.

    >>> def step(p, stacked, ids, scales, x, t, c):
    ...     with jlora.per_sample(stacked, ids, scales):
    ...         return unet.apply({"params": p}, x, t, c).sample
    >>> y = jax.jit(step)(params, stacked, jnp.array([0, 1, jlora.NO_LORA]), jnp.array([1.0, 0.6, 0.0]), x, t, c)
    """
    if method not in METHODS:
        raise ValueError(f"per_sample: method must be one of {METHODS}, got {method!r}.")
    table, k = _leaf_table(stacked)
    ids, scales = _batch_arrays(ids, scales, k)
    lora = _lora_concat if method == "concat" else _lora_gather

    def run(module, leaf, x, call, args, kwargs):
        if _layer_stacked(leaf):
            leaf = _layer_slice(module, leaf, _name(module.path + ("kernel",)))
        _check_module(module, leaf, x, ids.shape[0], _name(module.path + ("kernel",)))
        if isinstance(x, jax.core.Tracer) and not isinstance(ids, jax.core.Tracer):
            raise InvalidAdapterError(
                "per_sample: the ids are concrete while the model is traced (jit, vmap, grad), so they would be "
                "baked into the compiled function; pass stacked, ids and scales as arguments of the jitted "
                "function and enter per_sample inside it (per_sample_apply does this)."
            )
        y = call()
        dtype = jnp.promote_types(x.dtype, leaf.a.dtype)
        factors = LoraLeaf(a=leaf.a.astype(dtype), b=leaf.b.astype(dtype), alpha=jnp.asarray(leaf.alpha, jnp.float32))
        return y + lora(module, x.astype(dtype), factors, ids, scales).astype(y.dtype)

    with intercept_adapted(table, run, "per_sample", strict=strict) as used:
        yield used


@contextlib.contextmanager
def intercept_adapted(table: Mapping[tuple, Any], run, what: str, *, strict: bool = True):
    """Route every linen `__call__` of a module whose path is a key of `table` through `run`.

    `run(module, leaf, x, call, args, kwargs)` gets the bound module, its `table` entry, the call's input
    array, `call()` (the module's call as it is) and the call's own arguments, and returns its output. Calls made inside `run`
    (a LoRA branch running the module's own conv) are not intercepted again. This is the one
    mechanism that runs LoRAs beside their layers (`per_sample`, `jlora.strategy`).

    Yields:
      The set of module paths that ran (filled while the model runs).

    Raises:
      KeyMismatchError: (strict) on leaving the block, entries whose modules never ran.
    """
    used: set = set()
    busy: list = []  # non-empty while `run` runs, so its own module calls pass through

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        leaf = None
        if not busy and context.method_name == "__call__" and module.scope is not None:
            leaf = table.get(tuple(module.path))
        if leaf is None:
            return next_fun(*args, **kwargs)
        x = jnp.asarray(args[0] if args else kwargs["inputs"])  # nn.Dense / nn.Conv take `inputs`
        busy.append(module)
        try:
            y = run(module, leaf, x, lambda: next_fun(*args, **kwargs), args, kwargs)
        finally:
            busy.pop()
        used.add(tuple(module.path))
        return y

    with nn.intercept_methods(interceptor):
        yield used
    missing = sorted(_name(p + ("kernel",)) for p in table.keys() - used)
    if strict and missing:
        raise KeyMismatchError(
            f"{what}: {len(missing)} adapted kernels were never called as nn.Dense/nn.Conv modules of that path: "
            f"{missing[:5]}; the model's module paths differ from its params paths, or those modules did not run."
        )


def per_sample_apply(apply_fn, *, method: str = "concat", strict: bool = True):
    """`apply_fn` with per-sample LoRAs: `fn(stacked, ids, scales, *args, **kwargs)`.

    The wrapped call runs `apply_fn(*args, **kwargs)` inside `per_sample(stacked, ids, scales)`;
    jit it, and new ids, scales and adapters of the same shapes reuse the compiled step. When
    `stacked` has layer-stacked leaves, the first argument (the variables dict, or a params tree
    that `apply_fn` accepts as `{"params": ...}`) gets `per_sample_variables(stacked)` as its
    `lora` collection.

    >>> step = jax.jit(jlora.per_sample_apply(unet.apply))
    >>> y = step(stacked, ids, scales, {"params": params}, x, t, c).sample
    """

    @functools.wraps(apply_fn)
    def fn(stacked, ids, scales, *args, **kwargs):
        layers = per_sample_variables(stacked)
        if layers:  # layer-stacked LoRAs ride in the `lora` collection, sliced by the model's scan
            if not args or not isinstance(args[0], Mapping):
                raise InvalidAdapterError(
                    "per_sample_apply: the adapters have layer-stacked LoRAs, which go in as the variables' "
                    f"{COLLECTION!r} collection; the wrapped function must take the variables (or params) dict first."
                )
            variables = args[0] if "params" in args[0] else {"params": args[0]}
            args = ({**variables, COLLECTION: layers},) + args[1:]
        with per_sample(stacked, ids, scales, method=method, strict=strict):
            return apply_fn(*args, **kwargs)

    return fn
