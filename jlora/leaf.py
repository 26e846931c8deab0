"""The adapter leaf: low-rank factors of one weight, in Flax layout, as a pytree of arrays."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraLeaf:
    """LoRA factors for one kernel: `delta = (alpha / rank) * tensordot(a, b, 1)`.

    Attributes:
      a: down factor with the kernel's shape, last axis replaced by the rank:
        `(in, r)` for a Dense kernel, `(kh, kw, in, r)` for a Conv kernel.
      b: up factor `(r, out)`.
      alpha: scalar array; the scaling is `alpha / r` (alpha = r means 1).

    All three are array leaves, so scaling, stacking, sharding and optax updates
    are plain tree maps and changing alpha never retraces.

    >>> leaf = LoraLeaf(jnp.ones((8, 4)), jnp.ones((4, 16)), jnp.float32(4.0))
    >>> leaf.delta().shape
    (8, 16)
    """

    a: jax.Array
    b: jax.Array
    alpha: jax.Array

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the kernel this leaf modifies."""
        return tuple(self.a.shape[:-1]) + (self.b.shape[-1],)

    def delta(self) -> jax.Array:
        """The float32 weight delta `(alpha / r) * a @ b`, shaped like the kernel."""
        a = jnp.asarray(self.a, jnp.float32)
        b = jnp.asarray(self.b, jnp.float32)
        d = jnp.tensordot(a, b, axes=1, precision=jax.lax.Precision.HIGHEST)
        return d * (jnp.asarray(self.alpha, jnp.float32) / self.rank)


def is_adapter_leaf(x) -> bool:
    """True for `None` (no adapter) and for adapter leaves; use as `is_leaf` in tree maps."""
    return x is None or isinstance(x, LoraLeaf)
