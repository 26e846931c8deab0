"""Shardings of adapter factors derived from the kernels they modify.

For a kernel with `PartitionSpec(*spec)` (one entry per axis), a LoRA's down factor
`a` (kernel shape, last axis = rank) takes the kernel's spec on its input axes and
leaves the rank axis unsharded, and the up factor `b` (rank, out) takes the
kernel's output-axis spec. Then each device's slice of `a @ b` is exactly its
slice of the kernel: applying an adapter needs no communication, under `jit`
with `NamedSharding`s and inside `shard_map` alike. Each leaf type says how its
fields shard (`AdapterLeaf.partition_specs`); LoKr factors are replicated, and a
DoRA norm over a sharded axis needs `jit` (XLA adds the reduction), not `shard_map`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jlora.errors import InvalidAdapterError
from jlora.leaf import AdapterLeaf, is_adapter_leaf

PyTree = Any


def _full_spec(spec: PartitionSpec, ndim: int) -> tuple:
    entries = tuple(spec)
    return entries + (None,) * (ndim - len(entries))


def _trimmed(spec: PartitionSpec) -> PartitionSpec:
    """`spec` without trailing `None`s: the form jit gives its outputs, so shardings compare equal."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def leaf_specs(leaf: AdapterLeaf, kernel_spec: PartitionSpec):
    """The leaf with each field replaced by its PartitionSpec, for a weight sharded as `kernel_spec`."""
    specs = leaf.partition_specs(_full_spec(kernel_spec, len(leaf.shape)))
    return jax.tree.map(_trimmed, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _leaf_sharding(leaf: AdapterLeaf, sharding):
    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda s: NamedSharding(sharding.mesh, s), leaf_specs(leaf, sharding.spec))
    if sharding.is_fully_replicated:
        return jax.tree.map(lambda _: sharding, leaf)
    raise InvalidAdapterError(
        f"cannot derive adapter shardings from a {type(sharding).__name__}; shard params with NamedSharding."
    )


def adapter_specs(adapter: PyTree, param_specs: PyTree) -> PyTree:
    """PartitionSpecs for an adapter, from the params' PartitionSpecs (for `shard_map` in_specs).

    `param_specs` is a tree of `PartitionSpec` shaped like the params.
    """
    return jax.tree.map(
        lambda leaf, spec: None if leaf is None else leaf_specs(leaf, spec),
        adapter,
        param_specs,
        is_leaf=lambda x: is_adapter_leaf(x) or isinstance(x, PartitionSpec),
    )


def adapter_shardings(adapter: PyTree, param_shardings: PyTree) -> PyTree:
    """Shardings for an adapter from the params' shardings (a tree of `jax.sharding.Sharding`).

    Use as `in_shardings` of a jitted call or with `jax.device_put`.
    """
    return jax.tree.map(
        lambda leaf, sh: None if leaf is None else _leaf_sharding(leaf, sh),
        adapter,
        param_shardings,
        is_leaf=lambda x: is_adapter_leaf(x) or isinstance(x, jax.sharding.Sharding),
    )


def shard_adapter(adapter: PyTree, params: PyTree) -> PyTree:
    """Place an adapter's factors next to the (already sharded) params they modify.

    >>> params = jax.device_put(params, param_shardings)
    >>> adapter = jlora.shard_adapter(adapter, params)
    """
    shardings = jax.tree.map(lambda x: x.sharding, params)
    placed = adapter_shardings(adapter, shardings)
    leaves, treedef = jax.tree_util.tree_flatten(adapter, is_leaf=is_adapter_leaf)
    target = jax.tree_util.tree_flatten(placed, is_leaf=is_adapter_leaf)[0]
    return jax.tree_util.tree_unflatten(
        treedef, [None if l is None else jax.device_put(l, s) for l, s in zip(leaves, target)]
    )


def to_host(x) -> np.ndarray:
    """`x` as a numpy array; an array sharded over several hosts is gathered first.

    Every process must call it for such arrays (the gather is collective).
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
