"""Adapter leaves: the per-weight pieces of an adapter, each a pytree of arrays in Flax layout.

Every leaf type knows the kernel shape it modifies and how to merge into a weight:
`merge(w, scale)` returns the float32 adapted weight. Additive leaves only define
`delta()` (then `merge` is `w + scale * delta()`); DoRA overrides `merge`.
All fields are arrays, so scaling, stacking, sharding and optax updates are tree maps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _low_rank(a, b) -> jax.Array:
    return jnp.tensordot(_f32(a), _f32(b), axes=1, precision=_HI)


class AdapterLeaf:
    """Base class of adapter leaves (for `isinstance` checks and the shared `merge`)."""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def delta(self) -> jax.Array:
        """The float32 weight delta at scale 1, shaped like the target weight."""
        raise NotImplementedError

    def merge(self, w: jax.Array, scale) -> jax.Array:
        """The float32 adapted weight `w + scale * delta()`."""
        return _f32(w) + _f32(scale) * self.delta()

    @property
    def invertible(self) -> bool:
        """Whether `merge` can be undone by merging with `-scale` (true for additive leaves)."""
        return True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraLeaf(AdapterLeaf):
    """LoRA factors for one kernel: `delta = (alpha / rank) * tensordot(a, b, 1)`.

    Attributes:
      a: down factor with the kernel's shape, last axis replaced by the rank:
        `(in, r)` for a Dense kernel, `(kh, kw, in, r)` for a Conv kernel.
      b: up factor `(r, out)`.
      alpha: scalar array; the scaling is `alpha / r` (alpha = r means 1).

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
        return _low_rank(self.a, self.b) * (_f32(self.alpha) / self.rank)


def is_adapter_leaf(x) -> bool:
    """True for `None` (no adapter) and for adapter leaves; use as `is_leaf` in tree maps."""
    return x is None or isinstance(x, AdapterLeaf)
