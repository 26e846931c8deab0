"""Creating adapters from scratch (for fine-tuning, demos and tests)."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

    3-axis kernels are taken as Dense kernels stacked over layers, `(L, in, out)` (`nn.scan`, as in
    `jlora.models.flux`), and get one LoRA per layer; 4- and 5-axis kernels are 2-D and 3-D convs.

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
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise JloraError(f"init_adapter: rank must be an integer >= 1, got {rank!r}.")
    for name, value in (("alpha", alpha), ("b_std", b_std)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
                                  or not np.isfinite(value)):
            raise JloraError(f"init_adapter: {name} must be a finite number, got {value!r}.")
    try:
        pattern = re.compile(targets)
    except (re.error, TypeError) as e:
        raise JloraError(f"init_adapter: targets={targets!r} is not a regular expression ({e}).") from None
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    picked = [
        i for i, (kp, x) in enumerate(flat)
        if path_of(kp)[-1] == "kernel" and jnp.ndim(x) in (2, 3, 4, 5) and pattern.search("/".join(path_of(kp)))
    ]
    if not picked:
        raise JloraError(f"init_adapter: no kernel path matches targets={targets!r}.")
    keys = jax.random.split(key, 2 * len(picked))
    leaves: list = [None] * len(flat)
    for n, i in enumerate(picked):
        leaves[i] = _new_leaf(tuple(jnp.shape(flat[i][1])), keys[2 * n], keys[2 * n + 1], rank, alpha, b_std, dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _new_leaf(shape: tuple[int, ...], key_a, key_b, rank: int, alpha, b_std: float, dtype) -> LoraLeaf:
    """A LoRA for one kernel: Dense `(in, out)`, Conv `(*k, in, out)`, or layer-stacked Dense `(L, in, out)`."""
    alpha = float(rank if alpha is None else alpha)
    if len(shape) == 3:  # layers stacked for nn.scan: one LoRA per layer
        layers, n_in, n_out = shape
        bound = (3.0 / n_in) ** 0.5
        a = jax.random.uniform(key_a, (layers, n_in, rank), jnp.float32, -bound, bound)
        b = b_std * jax.random.normal(key_b, (layers, rank, n_out), jnp.float32)
        return LoraLeaf(a=a.astype(dtype), b=b.astype(dtype), alpha=jnp.full((layers,), alpha, jnp.float32))
    fan_in = math.prod(shape[:-1])
    bound = (3.0 / fan_in) ** 0.5  # Kaiming-uniform with a = sqrt(5), as PEFT initialises lora_A
    a = jax.random.uniform(key_a, shape[:-1] + (rank,), jnp.float32, -bound, bound)
    b = b_std * jax.random.normal(key_b, (rank, shape[-1]), jnp.float32)
    return LoraLeaf(a=a.astype(dtype), b=b.astype(dtype), alpha=jnp.float32(alpha))
