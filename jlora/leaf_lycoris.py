"""LyCORIS adapter leaves whose merge depends on the weight: IA3, GLoRA, diagonal OFT and BOFT.

These follow LyCORIS 4.1.3's own forward (`lycoris/modules/{ia3,glora,diag_oft,boft}.py`) at
multiplier `s`, in Flax layout (kernel `(..., in, out)`, output channels last):

* IA3: `W' = W * (1 + s * w)`, `w` per output channel (or per input channel, `on_input`).
* GLoRA: `W' = W + s * g * (P @ W + B)` with `P = a_down @ a_up` mixing input channels,
  `B = b_down @ b_up` a LoRA and `g = alpha / r`.
* diagonal OFT: each block of `b` output channels goes through `M = s * R + (1 - s) * I`,
  `R = (I + Q)(I - Q)^-1` the Cayley map of `Q = blocks - blocks^T` (its norm capped at
  `constraint` when that is positive), then every output channel is multiplied by `rescale`
  (in full, whatever `s`).
* BOFT: `m` butterfly stages of such blocks, each interpolated to the identity by `s`, then `rescale`.

None of them is additive (their change depends on `W`), so they do not sum with other
adapters; each has an exact inverse, `unmerge(w', s)`, which `jlora.unfuse` uses: IA3 divides,
GLoRA solves the low-rank update with the Woodbury identity, OFT/BOFT apply the inverse
blocks in reverse order. The inverse exists while `1 + s * w`, `I + s * g * P` and `M` are
invertible (true at `s` = 1 for a trained file; check the result with `safe_fusing`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jlora.leaf import AdapterLeaf, _HI, _f32, _leaf_repr, _low_rank


class _Multiplicative(AdapterLeaf):
    """Leaves whose merge is a function of the weight, with an exact inverse."""

    @property
    def additive(self) -> bool:
        return False

    @property
    def invertible(self) -> bool:
        return True

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.kernel)

    def delta(self) -> jax.Array:
        raise TypeError(f"a {type(self).__name__} scales its weight; its change is `merge(w, s) - w`, not a fixed delta")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ia3Leaf(_Multiplicative):
    """LyCORIS IA3: `W' = W * (1 + s * weight)`.

    `weight` broadcasts against the kernel: `(1, ..., 1, out)` for per-output scaling,
    `(1, ..., in, 1)` for `on_input` files. `kernel` is the kernel's shape.
    """

    weight: jax.Array
    kernel: tuple = dataclasses.field(metadata=dict(static=True))

    def merge(self, w, scale):
        return _f32(w) * (1.0 + _f32(scale) * _f32(self.weight))

    def unmerge(self, w, scale):
        return _f32(w) / (1.0 + _f32(scale) * _f32(self.weight))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GloraLeaf(_Multiplicative):
    """LyCORIS GLoRA: `W' = W + s * (alpha / r) * (P @ W + b_down @ b_up)`, `P = a_down @ a_up`.

    `a_down` is `(in, r)`, `a_up` `(r, in)`: `P` acts on the kernel's input axis.
    `b_down` has the kernel's shape with the last axis replaced by the rank, `b_up` is `(r, out)`.
    """

    a_down: jax.Array
    a_up: jax.Array
    b_down: jax.Array
    b_up: jax.Array
    alpha: jax.Array

    @property
    def rank(self) -> int:
        return self.a_down.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.b_down.shape[:-1]) + (self.b_up.shape[-1],)

    def _gamma(self, scale):
        return _f32(scale) * _f32(self.alpha) / self.rank

    def merge(self, w, scale):
        w, g = _f32(w), self._gamma(scale)
        pw = jnp.einsum("ir,rj,...jo->...io", _f32(self.a_down), _f32(self.a_up), w, precision=_HI)
        return w + g * (pw + _low_rank(self.b_down, self.b_up))

    def unmerge(self, w, scale):
        """`(I + g P)^-1 (W' - g B)` with `(I + g U V)^-1 = I - g U (I + g V U)^-1 V`."""
        g = self._gamma(scale)
        rest = _f32(w) - g * _low_rank(self.b_down, self.b_up)
        u, v = _f32(self.a_down), _f32(self.a_up)
        small = jnp.eye(self.rank, dtype=jnp.float32) + g * jnp.matmul(v, u, precision=_HI)
        vr = jnp.einsum("sr,rj,...jo->...so", jnp.linalg.inv(small), v, rest, precision=_HI)
        return rest - g * jnp.einsum("is,...so->...io", u, vr, precision=_HI)


def cayley(blocks, constraint) -> jax.Array:
    """LyCORIS's orthogonal blocks: `(I + Q)(I - Q)^-1`, `Q = blocks - blocks^T` with `||Q||` capped at `constraint` (> 0)."""
    b = _f32(blocks)
    q = b - jnp.swapaxes(b, -1, -2)
    c = _f32(constraint)
    norm = jnp.sqrt(jnp.sum(q * q)) + 1e-8
    q = jnp.where((c > 0) & (norm > c), q * (c / norm), q)
    eye = jnp.eye(b.shape[-1], dtype=jnp.float32)
    return jnp.matmul(eye + q, jnp.linalg.inv(eye - q), precision=_HI)


def _interpolated(r, scale):
    eye = jnp.eye(r.shape[-1], dtype=jnp.float32)
    s = _f32(scale)
    return s * r + (1.0 - s) * eye


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OftLeaf(_Multiplicative):
    """LyCORIS diagonal OFT: output channels in blocks of `b`, each block mixed by `M^T`.

    `blocks` is `(n, b, b)` with `n * b` output channels, `rescale` `(out,)` (ones when the
    file has none), `constraint` = alpha * out (0: none). `M = s * R + (1 - s) * I`.
    """

    blocks: jax.Array
    rescale: jax.Array
    constraint: jax.Array
    kernel: tuple = dataclasses.field(metadata=dict(static=True))

    def _m(self, scale):
        return _interpolated(cayley(self.blocks, self.constraint), scale)

    def merge(self, w, scale):
        w = _f32(w)
        n, b, _ = self.blocks.shape
        x = w.reshape(w.shape[:-1] + (n, b))
        out = jnp.einsum("knm,...kn->...km", self._m(scale), x, precision=_HI).reshape(w.shape)
        return out * _f32(self.rescale)

    def unmerge(self, w, scale):
        w = _f32(w) / _f32(self.rescale)
        n, b, _ = self.blocks.shape
        x = w.reshape(w.shape[:-1] + (n, b))
        inv = jnp.linalg.inv(self._m(scale))
        return jnp.einsum("kmn,...km->...kn", inv, x, precision=_HI).reshape(w.shape)


def _butterfly(x, mats, stages, block: int, inverse: bool):
    """LyCORIS's BOFT stages on the leading (output-channel) axis of `x` `(out, rest)`."""
    half = block // 2
    order = range(stages) if not inverse else reversed(range(stages))
    for i in order:
        k = 2**i * half
        rest = x.shape[1:]
        y = x.reshape((-1, 2, k) + rest)
        y = jnp.swapaxes(y, 1, 2).reshape((-1, block) + rest)
        y = jnp.einsum("bij,bj...->bi...", mats[i], y, precision=_HI)
        y = y.reshape((-1, k, 2) + rest)
        x = jnp.swapaxes(y, 1, 2).reshape((-1,) + rest)
    return x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BoftLeaf(_Multiplicative):
    """LyCORIS BOFT: `m` butterfly stages of orthogonal blocks on the output channels, then `rescale`.

    `blocks` is `(m, n, b, b)`; stage `i` mixes channels `2**i * b / 2` apart, its blocks
    interpolated to the identity by the call scale; `rescale` `(out,)`, `constraint` as in `OftLeaf`.
    """

    blocks: jax.Array
    rescale: jax.Array
    constraint: jax.Array
    kernel: tuple = dataclasses.field(metadata=dict(static=True))

    def _mats(self, scale):
        return _interpolated(cayley(self.blocks, self.constraint), scale)

    def merge(self, w, scale):
        w = _f32(w)
        x = jnp.moveaxis(w, -1, 0)
        m, _, b, _ = self.blocks.shape
        x = _butterfly(x.reshape(x.shape[0], -1), self._mats(scale), m, b, inverse=False).reshape(x.shape)
        return jnp.moveaxis(x, 0, -1) * _f32(self.rescale)

    def unmerge(self, w, scale):
        w = _f32(w) / _f32(self.rescale)
        x = jnp.moveaxis(w, -1, 0)
        m, _, b, _ = self.blocks.shape
        inv = jnp.linalg.inv(self._mats(scale))
        x = _butterfly(x.reshape(x.shape[0], -1), inv, m, b, inverse=True).reshape(x.shape)
        return jnp.moveaxis(x, 0, -1)


for _cls in (Ia3Leaf, GloraLeaf, OftLeaf, BoftLeaf):
    _cls.__repr__ = _leaf_repr
