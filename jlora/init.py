"""Creating adapters from scratch (for fine-tuning, demos and tests)."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from jlora.errors import JloraError
from jlora.leaf import LoraLeaf
from jlora.loading import path_of

PyTree = Any


def init_adapter(
    params: PyTree,
    key: jax.Array,
    *,
    rank: int = 4,
    alpha: float | None = None,
    targets: str = r".*",
    b_std: float = 0.0,
    dtype=jnp.float32,
) -> PyTree:
    """A new adapter on every Dense/Conv kernel of `params` whose path matches `targets`.

    `a` is drawn like PEFT's default (Kaiming-uniform over the input fan); `b` is
    zeros (so the adapter starts as the identity, as for training) unless `b_std > 0`.

    Args:
      params: the params tree to adapt.
      key: PRNG key.
      rank: LoRA rank.
      alpha: LoRA alpha (default: rank, i.e. scaling 1).
      targets: regex searched in the `/`-joined path of each kernel, e.g. `attn[12]/to_[qkv]`.
      b_std: standard deviation of a random `b` (0 gives zeros).
      dtype: factor dtype.

    >>> adapter = jlora.init_adapter(unet_params, jax.random.key(0), rank=8, targets=r"to_[qkv]|to_out_0")
    """
    pattern = re.compile(targets)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    picked = [
        i for i, (kp, x) in enumerate(flat)
        if path_of(kp)[-1] == "kernel" and jnp.ndim(x) in (2, 4) and pattern.search("/".join(path_of(kp)))
    ]
    if not picked:
        raise JloraError(f"init_adapter: no kernel path matches targets={targets!r}.")
    keys = jax.random.split(key, 2 * len(picked))
    leaves: list = [None] * len(flat)
    for n, i in enumerate(picked):
        shape = tuple(jnp.shape(flat[i][1]))
        fan_in = 1
        for d in shape[:-1]:
            fan_in *= d
        bound = (1.0 / fan_in) ** 0.5 * (3.0 ** 0.5)
        a = jax.random.uniform(keys[2 * n], shape[:-1] + (rank,), jnp.float32, -bound, bound)
        b = b_std * jax.random.normal(keys[2 * n + 1], (rank, shape[-1]), jnp.float32)
        leaves[i] = LoraLeaf(a=a.astype(dtype), b=b.astype(dtype), alpha=jnp.float32(rank if alpha is None else alpha))
    return jax.tree_util.tree_unflatten(treedef, leaves)
