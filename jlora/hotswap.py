"""Hotswapping LoRAs into a compiled step, and stacking adapters for per-sample serving.

Hotswap (diffusers' `enable_lora_hotswap(target_rank=R)` + `load_lora_weights(..., hotswap=True)`):
a jitted step compiles for the structure, shapes and dtypes of its adapter argument. A template
fixes them: a `LoraLeaf` of rank `R` on every targeted kernel. `pad_adapter` brings any LoRA of
rank <= R on a subset of those kernels to exactly that structure (zero-padded factors, alpha
rescaled so `alpha / r` is unchanged, zero leaves elsewhere), so swapping it in reuses the
compiled step.

>>> template = hotswap_template(params, rank=16, targets=r"to_[qkv]|to_out_0|conv")
>>> step = jax.jit(lambda p, a, s, *x: unet.apply({"params": jlora.apply(p, a, s)}, *x))
>>> y = step(params, pad_adapter(jlora.load_lora(path, params, "unet"), template), 0.8, *x)

`hotswap_lora` loads a file straight into the previous adapter's buffers (the padding donated), as
diffusers' `load_lora_adapter(..., hotswap=True)` replaces the weights of the loaded adapter in place:

>>> current = hotswap_lora(path, params, current, "unet")

`stack_adapters` pads K adapters to one template and stacks them on a leading axis, the input of
`jlora.per_sample`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import InvalidAdapterError, KeyMismatchError, ShapeMismatchError
from jlora.leaf import LoraLeaf, is_adapter_leaf
from jlora.loading import _collector_paused, _leaf_paths, _load, path_of

PyTree = Any


# ---------------------------------------------------------------------------- trees


def _flat(tree: PyTree):
    """`([(path, leaf)], treedef)` of an adapter (or params) tree, `None` counted as a leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_adapter_leaf)
    return list(zip(_leaf_paths(tree, treedef, is_adapter_leaf), leaves)), treedef


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _is_stacked(leaf: LoraLeaf) -> bool:
    return jnp.ndim(leaf.b) == 3


def _require_lora(leaf, path, what: str) -> LoraLeaf:
    if not isinstance(leaf, LoraLeaf):
        raise InvalidAdapterError(
            f"{what}: {_name(path)} holds a {type(leaf).__name__}, which has no rank axis to pad or run "
            "unmerged (LoHa, LoKr, DoRA, diffs and set weights). Fuse it into the base params with "
            "jlora.fuse(params, adapter) and serve the LoRA-type rest, or drop it from the adapter."
        )
    return leaf


def _zero_leaf(shape: tuple[int, ...], rank: int, stacked: bool, dtype) -> LoraLeaf:
    """A zero LoRA of `rank` on a kernel of `shape` (`(L, in, out)` when stacked); alpha = rank. Its arrays are
    made on the device (not moved from host memory, which the CPU device could use in place), so a donated
    padding can write into them."""
    if stacked:
        layers, n_in, n_out = shape
        return LoraLeaf(
            a=jnp.zeros((layers, n_in, rank), dtype),
            b=jnp.zeros((layers, rank, n_out), dtype),
            alpha=jnp.full((layers,), rank, jnp.float32),
        )
    return LoraLeaf(a=jnp.zeros(shape[:-1] + (rank,), dtype), b=jnp.zeros((rank, shape[-1]), dtype),
                    alpha=jnp.full((), rank, jnp.float32))


def _template_from_regex(params: PyTree, rank: int, pattern: str, dtype) -> PyTree:
    try:
        regex = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise KeyMismatchError(f"hotswap_template: targets={pattern!r} is not a regular expression ({e}).") from None
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    picked = {
        path_of(kp): tuple(x.shape)
        for kp, x in flat
        if path_of(kp)[-1] == "kernel" and len(x.shape) in (2, 3, 4, 5) and regex.search(_name(path_of(kp)))
    }
    if not picked:
        raise KeyMismatchError(f"hotswap_template: no kernel path matches targets={pattern!r}.")
    template = jax.tree_util.tree_map_with_path(
        lambda kp, x: _zero_leaf(picked[path_of(kp)], rank, len(picked[path_of(kp)]) == 3, dtype)
        if path_of(kp) in picked else None,
        params,
    )
    return jax.device_put(template)


def _check_structure(adapters: Sequence[PyTree], treedef, what: str) -> list:
    flats = []
    for i, adapter in enumerate(adapters):
        flat, other = _flat(adapter)
        if other != treedef:
            raise InvalidAdapterError(
                f"{what}: adapter {i} does not have the tree structure of the params/template; build every "
                "adapter from the same params (jlora.load_lora(path, params, component))."
            )
        flats.append(flat)
    return flats


def _template_from_adapters(params: PyTree, adapters: Sequence[PyTree], rank: int | None, dtype) -> PyTree:
    """Zero leaves on the union of the adapters' targets, rank `rank` (None: the largest rank per kernel)."""
    _, treedef = _flat(params)
    flats = _check_structure(adapters, treedef, "hotswap_template")
    leaves = []
    for position in zip(*flats):
        path = position[0][0]
        present = [_require_lora(leaf, path, "hotswap_template") for _, leaf in position if leaf is not None]
        if not present:
            leaves.append(None)
            continue
        layouts = {(l.shape, _is_stacked(l)) for l in present}
        if len(layouts) > 1:
            raise ShapeMismatchError(
                f"hotswap_template: the adapters disagree on the kernel at {_name(path)}: (shape, stacked) "
                f"{sorted(layouts)}; they were built for different params."
            )
        top = max(present, key=lambda l: l.rank)
        if rank is not None and top.rank > rank:
            raise _rank_error("hotswap_template", path, top, rank)
        r = top.rank if rank is None else rank
        leaves.append(_zero_leaf(present[0].shape, r, _is_stacked(present[0]), dtype))
    return jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves))


def hotswap_template(params: PyTree, rank: int, targets: str | Sequence[PyTree] = r".*", *, dtype=jnp.float32) -> PyTree:
    """The fixed adapter shape a jitted step compiles for: a zero LoRA of `rank` on every target.

    It plays the part of diffusers' `enable_lora_hotswap(target_rank=rank)`: compile the step
    with it (or with any adapter padded to it), then swap LoRAs in with `pad_adapter`.

    Args:
      params: the params tree the LoRAs are loaded onto (arrays or `jax.ShapeDtypeStruct`s).
      rank: the rank R every leaf gets; LoRAs up to rank R fit.
      targets: a regex searched in the `/`-joined path of each kernel (`kernel` leaves of 2 to
        5 axes; 3-axis kernels are taken as layer-stacked Dense kernels `(L, in, out)`, as in
        `jlora.models.flux`), or a sequence of adapters whose targets (and leaf layouts) are united.
      dtype: dtype of the factors (every padded adapter gets it, so swaps never change dtypes).

    Returns:
      An adapter tree with a zero `LoraLeaf` of rank `rank` on each target and `None` elsewhere
      (alpha = rank, so applying it changes nothing).

    Raises:
      KeyMismatchError: the regex matches no kernel.
      ShapeMismatchError: an adapter in `targets` has a rank above `rank`.
      InvalidAdapterError: an adapter in `targets` has non-LoRA leaves or another tree structure.

    >>> template = jlora.hotswap_template(unet_params, 16, targets=r"attn[12]/to_(q|k|v|out_0)")
    >>> template = jlora.hotswap_template(unet_params, 16, targets=[style_a, style_b])
    """
    if int(rank) < 1:
        raise ShapeMismatchError(f"hotswap_template: rank must be >= 1, got {rank}.")
    if isinstance(targets, str):
        return _template_from_regex(params, int(rank), targets, dtype)
    return _template_from_adapters(params, list(targets), int(rank), dtype)


def _rank_error(what: str, path, leaf: LoraLeaf, rank: int) -> ShapeMismatchError:
    return ShapeMismatchError(
        f"{what}: {_name(path)} has rank {leaf.rank} (a {tuple(leaf.a.shape)}, b {tuple(leaf.b.shape)}) above the "
        f"template's rank {rank}; build the template with rank >= {leaf.rank}, e.g. "
        f"hotswap_template(params, {leaf.rank}, ...)."
    )


def _pad_leaf(leaf: LoraLeaf, like: LoraLeaf, path) -> LoraLeaf:
    """`leaf` as host arrays with the rank, dtypes and alpha shape of `like`; `alpha / r` unchanged."""
    if leaf.shape != like.shape or _is_stacked(leaf) != _is_stacked(like):
        raise ShapeMismatchError(
            f"pad_adapter: {_name(path)} has a LoRA for a kernel of shape {leaf.shape} (stacked: {_is_stacked(leaf)}) "
            f"but the template's kernel is {like.shape} (stacked: {_is_stacked(like)}); build both from the same params."
        )
    r, rank = leaf.rank, like.rank
    if r > rank:
        raise _rank_error("pad_adapter", path, leaf, rank)
    a, b = np.zeros(like.a.shape, like.a.dtype), np.zeros(like.b.shape, like.b.dtype)
    a[..., :r] = np.asarray(leaf.a)
    b[..., :r, :] = np.asarray(leaf.b)
    alpha = np.broadcast_to(np.asarray(leaf.alpha, np.float32) * np.float32(rank / r), np.shape(like.alpha))
    return LoraLeaf(a=a, b=b, alpha=np.array(alpha))


def _pad_host(adapter: PyTree, template: PyTree) -> tuple[list, list, Any]:
    """(padded leaves, template leaves, treedef): new LoRAs as host arrays, the template's own leaves elsewhere."""
    flat_a, flat_t, treedef = _checked_pair(adapter, template)
    leaves = [
        None if leaf is None else _pad_leaf(leaf, t, path)
        for (path, leaf), (_, t) in zip(flat_a, flat_t)
    ]
    return leaves, [t for _, t in flat_t], treedef


def _checked_pair(adapter: PyTree, template: PyTree):
    """`(flat adapter, flat template, treedef)` after the checks every padding does."""
    flat_t, treedef = _flat(template)
    (flat_a,) = _check_structure([adapter], treedef, "pad_adapter")
    for path, leaf in flat_t:
        if leaf is not None:
            _require_lora(leaf, path, "pad_adapter (template)")
    outside = [_name(p) for (p, leaf), (_, t) in zip(flat_a, flat_t) if leaf is not None and t is None]
    if outside:
        raise KeyMismatchError(
            f"pad_adapter: the adapter has LoRAs on {len(outside)} kernels the template does not target: "
            f"{outside[:5]}; build the template with targets covering them (a wider regex, or "
            "hotswap_template(params, rank, targets=[...all adapters]))."
        )
    for path, leaf in flat_a:
        if leaf is not None:
            _require_lora(leaf, path, "pad_adapter")
    return flat_a, flat_t, treedef


def _device_put_like(arrays: list, like: list) -> list:
    """`arrays` on the devices of `like`: a committed array's sharding is kept, so the jit cache entry is reused."""
    committed = [i for i, x in enumerate(like) if getattr(x, "committed", False)]
    free = sorted(set(range(len(arrays))) - set(committed))
    out = [None] * len(arrays)
    if committed:
        out_c = jax.device_put([arrays[i] for i in committed], [like[i].sharding for i in committed])
        for i, x in zip(committed, out_c):
            out[i] = x
    for i, x in zip(free, jax.device_put([arrays[i] for i in free])):
        out[i] = x
    return out


def _fit(leaf: LoraLeaf, like: LoraLeaf, path) -> None:
    """The checks of `_pad_leaf`, without padding."""
    if leaf.shape != like.shape or _is_stacked(leaf) != _is_stacked(like):
        _pad_leaf(leaf, like, path)  # raises the shape error
    if leaf.rank > like.rank:
        raise _rank_error("pad_adapter", path, leaf, like.rank)


def _padded_into(like: LoraLeaf, leaf: LoraLeaf | None) -> LoraLeaf:
    """`leaf` zero-padded to `like`'s rank, written over `like`'s arrays (zeros where `leaf` is None)."""
    if leaf is None:
        return LoraLeaf(a=like.a.at[...].set(0), b=like.b.at[...].set(0), alpha=like.alpha.at[...].set(like.rank))
    r, rank = leaf.rank, like.rank
    a = like.a.at[..., :r].set(leaf.a.astype(like.a.dtype)).at[..., r:].set(0)
    b = like.b.at[..., :r, :].set(leaf.b.astype(like.b.dtype)).at[..., r:, :].set(0)
    alpha = like.alpha.at[...].set(jnp.broadcast_to(jnp.asarray(leaf.alpha, jnp.float32) * (rank / r), like.alpha.shape))
    return LoraLeaf(a=a, b=b, alpha=alpha.astype(like.alpha.dtype))


@functools.partial(jax.jit, donate_argnums=0)
def _pad_donating(like: list, leaves: list) -> list:
    return [_padded_into(t, leaf) for t, leaf in zip(like, leaves)]


def _dense_source(x) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """A host array as `(dense array, perm)` with `x == transpose(dense, argsort(perm))`: a layout rule's
    transposed view of the file goes to the device as the file's own dense bytes (perm None: `x` as it is)."""
    x = np.asarray(x)
    if x.ndim < 2 or x.flags.c_contiguous:
        return x, None
    if x.T.flags.c_contiguous:  # the common case: every axis reversed
        return x.T, tuple(range(x.ndim - 1, -1, -1))
    perm = tuple(int(i) for i in np.argsort([-abs(st) for st in x.strides], kind="stable"))
    dense = np.transpose(x, perm)
    return (dense, perm) if dense.flags.c_contiguous else (x, None)


def _restored(x: jax.Array, perm: tuple[int, ...] | None) -> jax.Array:
    return x if perm is None else jnp.transpose(x, tuple(int(i) for i in np.argsort(perm)))


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _pad_donating_from_host(like: list, factors: list, alphas: jax.Array, layout: tuple) -> list:
    """`_pad_donating` for host factors `(a, b)` given as `_dense_source` arrays, with every alpha in one
    float32 vector; `layout` holds, per leaf, the two perms and the alpha's `(start, shape)` (None: no leaf).
    The transposes into Flax layout run on the device, fused with the padding into the donated buffers."""
    out = []
    for t, f, spec in zip(like, factors, layout):
        leaf = None
        if spec is not None:
            pa, pb, (start, shape) = spec
            alpha = alphas[start:start + max(1, int(np.prod(shape)))].reshape(shape)
            leaf = LoraLeaf(a=_restored(f[0], pa), b=_restored(f[1], pb), alpha=alpha)
        out.append(_padded_into(t, leaf))
    return out


def _pad_in_place(adapter: PyTree, template: PyTree, host: bool = False) -> PyTree:
    """The donated padding; `host`: the adapter's leaves hold host views (`jlora.loading.host_leaves`)."""
    flat_a, flat_t, treedef = _checked_pair(adapter, template)
    pos = [i for i, (_, t) in enumerate(flat_t) if t is not None]
    for i in pos:
        if flat_a[i][1] is not None:
            _fit(flat_a[i][1], flat_t[i][1], flat_a[i][0])
    for i in pos:
        if not isinstance(flat_t[i][1].a, jax.Array):
            raise InvalidAdapterError("pad_adapter(donate=True): the template's factors must be device arrays "
                                      "(jlora.hotswap_template or an adapter padded before).")
    like = [flat_t[i][1] for i in pos]
    if host:
        factors, layout, alphas = [], [], []
        for i in pos:
            leaf = flat_a[i][1]
            if leaf is None:
                factors.append(None), layout.append(None)
                continue
            (a, pa), (b, pb) = _dense_source(leaf.a), _dense_source(leaf.b)
            alpha = np.asarray(leaf.alpha, np.float32)
            factors.append((a, b)), layout.append((pa, pb, (len(alphas), alpha.shape)))
            alphas.extend(alpha.ravel().tolist())
        new = _pad_donating_from_host(like, factors, np.asarray(alphas, np.float32), tuple(layout))
    else:
        new = _pad_donating(like, [flat_a[i][1] for i in pos])
    out = [t for _, t in flat_t]
    for i, leaf in zip(pos, new):
        out[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, out)


def pad_adapter(adapter: PyTree, template: PyTree, *, donate: bool = False) -> PyTree:
    """`adapter` with exactly the template's structure, shapes and dtypes (the hotswap step).

    Each LoRA of rank r is zero-padded to the template's rank R on its rank axis, its alpha
    scaled by R / r (so `alpha / r` and the delta are unchanged), its factors cast to the
    template's dtype and placed like the template's leaf (with its sharding when committed, e.g.
    after `shard_adapter`); kernels the adapter leaves out get the template's zero leaf. Stacked
    leaves `(L, in, r)`, `(L, r, out)`, `(L,)` pad the same way. Call it outside `jit`: it pads
    on the host and moves the result in one transfer. The caller's trees are not modified.

    Raises:
      KeyMismatchError: the adapter has a LoRA on a kernel the template does not target.
      ShapeMismatchError: a rank above the template's, or a kernel of another shape.
      InvalidAdapterError: a non-LoRA leaf (LoHa, LoKr, DoRA, diff, set), or another tree structure.

    With `donate=True` the padding runs on the device into the template's own buffers: the template's
    arrays are consumed (deleted) and the result's factors occupy their memory, so a swap allocates
    nothing new. Pass the adapter being replaced as the template of the next swap (every adapter
    padded to one template has its structure): `current = pad_adapter(new, current, donate=True)`.
    The first swap of each rank layout compiles once.

    >>> y = step(params, jlora.pad_adapter(jlora.load_lora(path, params, "unet"), template), 0.8, *x)
    >>> current = jlora.pad_adapter(jlora.load_lora(path, params, "unet"), current, donate=True)
    """
    if donate:
        return _pad_in_place(adapter, template)
    leaves, like, treedef = _pad_host(adapter, template)
    new = [(i, leaf, like[i]) for i, leaf in enumerate(leaves) if leaf is not None]
    arrays = [x for _, leaf, _ in new for x in (leaf.a, leaf.b, leaf.alpha)]
    moved = iter(_device_put_like(arrays, [x for _, _, t in new for x in (t.a, t.b, t.alpha)]))
    out = list(like)
    for i, _, _ in new:
        out[i] = LoraLeaf(a=next(moved), b=next(moved), alpha=next(moved))
    return jax.tree_util.tree_unflatten(treedef, out)


def hotswap_lora(
    source,
    params: PyTree,
    template: PyTree,
    component: str | None = None,
    *,
    format: str | None = None,
    scheme=None,
    strict: bool = True,
    metadata: Mapping | None = None,
    prefix: str | None = None,
    return_report: bool = False,
    **file_kwargs,
):
    """Load a LoRA file straight into the buffers of `template` (diffusers' `load_lora_adapter(..., hotswap=True)`).

    The same result as `pad_adapter(load_lora(source, params, component, ...), template, donate=True)`, and
    the same checks and errors, without the intermediate adapter: the file's tensors go from its memory map,
    in the file's own layout, straight into the donated padding as arguments of its one compiled call, which
    transposes them into Flax layout as it writes the template's memory. `template` is consumed (its arrays
    are deleted) only once the file has been read and checked; pass the result as the template of the next
    swap. The first swap of each rank layout compiles once.

    Args: as `load_lora` (`source`, `params`, `component`, `format`, `scheme`, `strict`, `metadata`,
      `prefix`, `return_report` and the file keywords); the factors take the template's dtype.

    Raises: what `load_lora` and `pad_adapter` raise (a rank above the template's, a LoRA outside its
      targets, a non-LoRA adapter); the template is then left as it was.

    >>> current = jlora.hotswap_template(params, rank=64, targets=r"to_(q|k|v|out_0)", dtype=jnp.bfloat16)
    >>> current = jlora.hotswap_lora("style.safetensors", params, current, "unet")
    >>> y = step(params, current, 0.8, *x)  # compiled once for every swap
    """
    name = component or "default"
    with _collector_paused():
        adapters, report = _load(
            source, {name: params}, default_component=name, format=format,
            schemes={name: scheme} if scheme is not None else None, strict=strict, dtype=None, metadata=metadata,
            file_kwargs=file_kwargs, prefixes=None if prefix is None else {"": prefix}, host=True,
        )
        swapped = _pad_in_place(adapters[name], template, host=True)
    return (swapped, report) if return_report else swapped


def stack_adapters(adapters: Sequence[PyTree], template: PyTree | None = None) -> PyTree:
    """K adapters as one tree of LoRA leaves with a leading axis K (for `per_sample`).

    Each adapter is padded to `template` (default: the union of their targets at the largest
    rank per kernel, float32 factors) and the factors stacked: `a (K, ..., in, R)`,
    `b (K, R, out)`, `alpha (K,)`. Adapter k in the list is id k. Call it outside `jit`.

    >>> stacked = jlora.stack_adapters([style, detail, character])
    """
    adapters = list(adapters)
    if not adapters:
        raise InvalidAdapterError("stack_adapters: no adapters given.")
    if template is None:
        template = _template_from_adapters(adapters[0], adapters, None, jnp.float32)
    padded = [_pad_host(a, template) for a in adapters]
    like, treedef = padded[0][1], padded[0][2]

    def stack(i):
        if like[i] is None:
            return None
        parts = [leaves[i] if leaves[i] is not None else like[i] for leaves, _, _ in padded]
        return LoraLeaf(*(np.stack([np.asarray(getattr(p, f)) for p in parts]) for f in ("a", "b", "alpha")))

    return jax.device_put(jax.tree_util.tree_unflatten(treedef, [stack(i) for i in range(len(like))]))
