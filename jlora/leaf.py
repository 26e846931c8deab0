"""Adapter leaves: the per-weight pieces of an adapter, each a pytree of arrays in Flax layout.

Every leaf type knows the kernel shape it modifies and how to merge into a weight:
`merge(w, scale)` returns the float32 adapted weight. Additive leaves only define
`delta()` (then `merge` is `w + scale * delta()`); DoRA overrides `merge`, and the
multiplicative LyCORIS leaves (`jlora.leaf_lycoris`) define `merge` and its inverse `unmerge`.
All fields are arrays, so scaling, stacking, sharding and optax updates are tree maps.

DoRA strength (how a call scale `s` acts on a DoRA weight, `V = W + dW`, `n(V) = m * V / ||V||`):

* `"peft"`: the scale goes inside the norm, `n(W + s * dW)` (PEFT, diffusers).
* `"comfyui"`: the result is blended, `W + s * (n(W + dW) - W)` (A1111 and ComfyUI).
* `"lycoris"`: dW is applied in full and only the renormalisation is scaled,
  `V + s * (n(V) - V)` (LyCORIS 4.1.3, `weight_decompose`; it adds float32 eps to the norm).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_HI = jax.lax.Precision.HIGHEST


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _low_rank(a, b) -> jax.Array:
    """`a @ b` over the rank axis; a 3-D `b` (layers, r, out) means factors stacked on a layer axis."""
    if jnp.ndim(b) == 3:
        return jnp.einsum("l...r,lro->l...o", _f32(a), _f32(b), precision=_HI)
    return jnp.tensordot(_f32(a), _f32(b), axes=1, precision=_HI)


# When `jlora.fuse` / `unfuse` merge a LoRA up to this rank on a CPU, `w + a @ b` runs as one elementwise
# pass over `w` summing `r` outer products (each weight element is read and written once), instead of a
# matrix product written to a temporary and added in a second pass. At higher ranks the product itself
# costs more and the dot is faster. Inside a model call the merged kernel feeds a dot or conv, whose
# operand layout XLA may change; there the matrix product stays (`LoraLeaf.merge(single_pass=False)`).
OUTER_SUM_MAX_RANK = 32


def _outer_sum(a, b) -> jax.Array:
    """`tensordot(a, b, 1)` as a sum of rank-1 outer products, accumulated in rank order (float32), so
    zero factors padded onto the rank axis leave it bit for bit the same. XLA fuses it, and an add into
    a weight, into one elementwise loop."""
    acc = None
    for k in range(a.shape[-1]):
        bk = b[k] if b.ndim == 2 else b[:, k][:, None, :]  # (out,) or stacked (L, 1, out)
        term = a[..., k:k + 1] * bk
        acc = term if acc is None else acc + term
    return acc


@jax.custom_jvp
def _add_low_rank(w, a, b) -> jax.Array:
    """`w + tensordot(a, b, 1)` in float32 (all three float32; a 3-D `b` is stacked on a layer axis).

    On a CPU, ranks up to `OUTER_SUM_MAX_RANK` take the single-pass outer-product sum; elsewhere (and
    at higher ranks) the matrix product. Derivatives are the matrix products either way."""
    if not 0 < a.shape[-1] <= OUTER_SUM_MAX_RANK:
        return w + _low_rank(a, b)
    return jax.lax.platform_dependent(w, a, b, cpu=lambda w, a, b: w + _outer_sum(a, b),
                                      default=lambda w, a, b: w + _low_rank(a, b))


@_add_low_rank.defjvp
def _add_low_rank_jvp(primals, tangents):
    w, a, b = primals
    dw, da, db = tangents
    return _add_low_rank(w, a, b), dw + _low_rank(da, b) + _low_rank(a, db)


def _per_layer(x, ndim: int) -> jax.Array:
    """A scalar, or a per-layer vector broadcast against a stacked delta of `ndim` axes."""
    x = _f32(x)
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


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
    def additive(self) -> bool:
        """Whether `merge(w, s)` is `w + s * delta()` with a delta independent of `w` (then leaves sum)."""
        return True

    @property
    def invertible(self) -> bool:
        """Whether `unmerge` undoes `merge` (additive leaves, and multiplicative ones with an inverse)."""
        return self.additive

    def unmerge(self, w: jax.Array, scale) -> jax.Array:
        """The float32 weight `w0` with `merge(w0, scale) == w` (additive leaves: `merge(w, -scale)`)."""
        if not self.additive:
            raise TypeError(f"{type(self).__name__}: merging rescales the weight and cannot be undone")
        return self.merge(w, -_f32(scale))

    def partition_specs(self, spec: tuple):
        """This leaf with each array replaced by its PartitionSpec, given the weight's full spec.

        The default replicates every field; low-rank leaves shard like their weight.
        """
        return jax.tree.map(lambda _: P(), self)


DORA_STRENGTHS = ("peft", "comfyui", "lycoris")


def _renormalise(v: jax.Array, magnitude, eps: float = 0.0) -> jax.Array:
    """`magnitude * v / ||v||`, the norm over the axes where `magnitude` has size 1."""
    m = _f32(magnitude)
    axes = tuple(i for i, n in enumerate(m.shape) if n == 1)
    norm = jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True)) + eps
    return v * (m / norm)


def dora_merge(w, d, magnitude, scale, strength: str) -> jax.Array:
    """A DoRA weight from the base weight `w`, the delta at scale 1 `d` and the call `scale`.

    `strength` is one of `DORA_STRENGTHS` (see the module docstring).
    """
    w, s = _f32(w), _f32(scale)
    if strength == "peft":
        return _renormalise(w + s * d, magnitude)
    if strength == "comfyui":
        return w + s * (_renormalise(w + d, magnitude) - w)
    if strength == "lycoris":
        v = w + d
        return v + s * (_renormalise(v, magnitude, float(jnp.finfo(jnp.float32).eps)) - v)
    raise ValueError(f"DoRA strength {strength!r} is not one of {DORA_STRENGTHS}")


def _magnitude_spec(magnitude, spec: tuple):
    return None if magnitude is None else P(*(None if n == 1 else s for n, s in zip(magnitude.shape, spec)))


class _LowRank:
    """Rank and kernel shape of leaves with a down factor `a` and an up factor `b`."""

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the kernel this leaf modifies."""
        return tuple(self.a.shape[:-1]) + (self.b.shape[-1],)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraLeaf(_LowRank, AdapterLeaf):
    """LoRA factors for one kernel: `delta = (alpha / rank) * tensordot(a, b, 1)`.

    Attributes:
      a: down factor with the kernel's shape, last axis replaced by the rank:
        `(in, r)` for a Dense kernel, `(kh, kw, in, r)` for a Conv kernel.
      b: up factor `(r, out)`.
      alpha: scalar array; the scaling is `alpha / r` (alpha = r means 1).

    Stacked layers (a kernel `(L, in, out)` run under `scan`): `a` is `(L, in, r)`,
    `b` is `(L, r, out)` and `alpha` is `(L,)`, so slicing every field on axis 0
    gives the leaf of one layer.

    >>> leaf = LoraLeaf(jnp.ones((8, 4)), jnp.ones((4, 16)), jnp.float32(4.0))
    >>> leaf.delta().shape
    (8, 16)
    """

    a: jax.Array
    b: jax.Array
    alpha: jax.Array

    def delta(self) -> jax.Array:
        """The float32 weight delta `(alpha / r) * a @ b`, shaped like the kernel."""
        d = _low_rank(self.a, self.b)
        return d * (_per_layer(self.alpha, d.ndim) / self.rank)

    def merge(self, w: jax.Array, scale, *, single_pass: bool = False) -> jax.Array:
        """`w + scale * delta()`, with `scale * alpha / r` applied to the small factor `b`: the product is then
        the last op before the add, and no pass over a weight-sized array is spent on scaling.

        `single_pass=True` (what `jlora.fuse` uses): on a CPU, up to rank `OUTER_SUM_MAX_RANK`, the product
        and the add are one elementwise pass over `w` (float32 rounding differs from the dot's)."""
        b = _f32(self.b) * (_per_layer(self.alpha, jnp.ndim(self.b)) * (_f32(scale) / self.rank))
        if single_pass:
            return _add_low_rank(_f32(w), _f32(self.a), b)
        return _f32(w) + _low_rank(self.a, b)

    def partition_specs(self, spec: tuple):
        if jnp.ndim(self.b) == 3:  # stacked: layer axis first
            return LoraLeaf(a=P(*spec[:-1], None), b=P(spec[0], None, spec[-1]), alpha=P(spec[0]))
        return LoraLeaf(a=P(*spec[:-1], None), b=P(None, spec[-1]), alpha=P())




@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LohaLeaf(AdapterLeaf):
    """LyCORIS LoHa: `delta = (alpha / r) * (a1 @ b1) * (a2 @ b2)` (Hadamard product).

    Factors in Flax layout like `LoraLeaf`: `a1`, `a2` have the kernel's shape with the
    last axis replaced by the rank, `b1`, `b2` are `(r, out)`. With a `magnitude`
    (LyCORIS `dora_scale`) the merged weight is renormalised as in `DoraLeaf`, the call
    scale acting by `strength` (one of `DORA_STRENGTHS`).
    """

    a1: jax.Array
    b1: jax.Array
    a2: jax.Array
    b2: jax.Array
    alpha: jax.Array
    magnitude: jax.Array | None = None
    strength: str = dataclasses.field(default="comfyui", metadata=dict(static=True))

    @property
    def additive(self) -> bool:
        return self.magnitude is None

    def merge(self, w: jax.Array, scale) -> jax.Array:
        if self.magnitude is None:
            return super().merge(w, scale)
        return dora_merge(w, self.delta(), self.magnitude, scale, self.strength)

    @property
    def rank(self) -> int:
        return self.b1.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.a1.shape[:-1]) + (self.b1.shape[-1],)

    def delta(self) -> jax.Array:
        return _low_rank(self.a1, self.b1) * _low_rank(self.a2, self.b2) * (_f32(self.alpha) / self.rank)

    def partition_specs(self, spec: tuple):
        a, b = P(*spec[:-1], None), P(None, spec[-1])
        return LohaLeaf(a1=a, b1=b, a2=a, b2=b, alpha=P(), magnitude=_magnitude_spec(self.magnitude, spec),
                        strength=self.strength)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LokrLeaf(AdapterLeaf):
    """LyCORIS LoKr: `delta = factor * kron(w1, w2)` in Flax layout.

    `w1` is `(in1, out1)`; `w2` is `(..., in2, out2)` (conv: `(kh, kw, in2, out2)`); the
    kernel is `(..., in1 * in2, out1 * out2)`. `factor` is alpha / rank when a factor
    was stored decomposed, else 1 (the converter resolves it). An optional `magnitude`
    (LyCORIS `dora_scale`) makes it a DoRA weight, as for `LohaLeaf`.
    """

    w1: jax.Array
    w2: jax.Array
    factor: jax.Array
    magnitude: jax.Array | None = None
    strength: str = dataclasses.field(default="comfyui", metadata=dict(static=True))

    @property
    def additive(self) -> bool:
        return self.magnitude is None

    def merge(self, w: jax.Array, scale) -> jax.Array:
        if self.magnitude is None:
            return super().merge(w, scale)
        return dora_merge(w, self.delta(), self.magnitude, scale, self.strength)

    def partition_specs(self, spec: tuple):
        return LokrLeaf(w1=P(), w2=P(), factor=P(), magnitude=_magnitude_spec(self.magnitude, spec), strength=self.strength)

    @property
    def shape(self) -> tuple[int, ...]:
        i1, o1 = self.w1.shape
        *k, i2, o2 = self.w2.shape
        return tuple(k) + (i1 * i2, o1 * o2)

    def delta(self) -> jax.Array:
        w1, w2 = _f32(self.w1), _f32(self.w2)
        *k, i2, o2 = w2.shape
        i1, o1 = w1.shape
        d = jnp.einsum("ab,...cd->...acbd", w1, w2, precision=_HI)
        return d.reshape(tuple(k) + (i1 * i2, o1 * o2)) * _f32(self.factor)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiffLeaf(AdapterLeaf):
    """A full delta for one weight or bias: `delta = factor * diff` (`.diff`, `.diff_b`, `lora_B.bias`)."""

    diff: jax.Array
    factor: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def delta(self) -> jax.Array:
        return _f32(self.diff) * _f32(self.factor)

    def partition_specs(self, spec: tuple):
        return DiffLeaf(diff=P(*spec), factor=P())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SetLeaf(AdapterLeaf):
    """A replacement weight (`.set_weight`, Flux Control norm scales): `W' = value` where `mask`.

    The call scale does not apply (the file says what the weight is). `mask` broadcasts
    against the weight; for a stacked weight it is `(L, 1, ...)`, true for the layers set.
    """

    value: jax.Array
    mask: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def additive(self) -> bool:
        return False

    def delta(self) -> jax.Array:
        raise TypeError("a SetLeaf replaces its weight; it has no delta independent of the weight")

    def merge(self, w: jax.Array, scale) -> jax.Array:
        return jnp.where(jnp.asarray(self.mask, bool), _f32(self.value), _f32(w))

    def partition_specs(self, spec: tuple):
        return SetLeaf(value=P(*spec), mask=P(*(s if n > 1 else None for s, n in zip(spec, self.mask.shape))))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoraLeaf(_LowRank, AdapterLeaf):
    """DoRA: a LoRA whose merged weight is renormalised to a learned magnitude.

    `V = W + s * (alpha / r) * a @ b`, then `W' = magnitude * V / ||V||`, the norm taken
    over the axes where `magnitude` has size 1 (PEFT: per output channel; kohya/LyCORIS
    `dora_scale`: per output or per input channel, as the file stores it).

    `strength` says how the call scale acts (module docstring): `"peft"` (inside the
    norm; PEFT files), `"comfyui"` (the DoRA weight at scale 1 blended with `W`, as
    A1111 and ComfyUI do; the default for kohya `dora_scale` files) or `"lycoris"`
    (LyCORIS's own rule: the delta in full, only the renormalisation scaled). All three
    agree at scale 1. `jlora.apply(..., dora_strength=...)` overrides it per call.
    """

    a: jax.Array
    b: jax.Array
    alpha: jax.Array
    magnitude: jax.Array
    strength: str = dataclasses.field(default="peft", metadata=dict(static=True))

    @property
    def strength_inside(self) -> bool:
        """True for PEFT's rule (the call scale inside the norm)."""
        return self.strength == "peft"

    @property
    def additive(self) -> bool:
        return False

    def delta(self) -> jax.Array:
        """The low-rank part at scale 1 (before renormalisation)."""
        return _low_rank(self.a, self.b) * (_f32(self.alpha) / self.rank)

    def partition_specs(self, spec: tuple):
        return DoraLeaf(a=P(*spec[:-1], None), b=P(None, spec[-1]), alpha=P(),
                        magnitude=_magnitude_spec(self.magnitude, spec), strength=self.strength)

    def merge(self, w: jax.Array, scale) -> jax.Array:
        return dora_merge(w, self.delta(), self.magnitude, scale, self.strength)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SumLeaf(AdapterLeaf):
    """Several additive leaves on one weight: `delta = sum_i weights[i] * parts[i].delta()`."""

    parts: tuple
    weights: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.parts[0].shape

    def delta(self) -> jax.Array:
        w = _f32(self.weights)
        return sum(w[i] * p.delta() for i, p in enumerate(self.parts))

    def partition_specs(self, spec: tuple):
        return SumLeaf(parts=tuple(p.partition_specs(spec) for p in self.parts), weights=P())


def with_dora_strength(adapter, strength: str | None):
    """The adapter with every DoRA leaf (`DoraLeaf`, LoHa/LoKr with a magnitude) using `strength`.

    `strength` is one of `DORA_STRENGTHS` (module docstring); None leaves each leaf's own rule.

    >>> lycoris_like = with_dora_strength(adapter, "lycoris")
    """
    if strength is None:
        return adapter
    if strength not in DORA_STRENGTHS:
        from jlora.errors import InvalidAdapterError

        raise InvalidAdapterError(f"dora_strength must be one of {DORA_STRENGTHS} or None, got {strength!r}.")

    def one(leaf):
        if isinstance(leaf, DoraLeaf) or (isinstance(leaf, (LohaLeaf, LokrLeaf)) and leaf.magnitude is not None):
            return dataclasses.replace(leaf, strength=strength)
        return leaf

    return jax.tree.map(one, adapter, is_leaf=is_adapter_leaf)


def is_adapter_leaf(x) -> bool:
    """True for `None` (no adapter) and for adapter leaves; use as `is_leaf` in tree maps."""
    return x is None or isinstance(x, AdapterLeaf)


def _leaf_repr(leaf) -> str:
    """One line per leaf: field shapes and dtypes, scalars by value, never the arrays."""
    parts = []
    for f in dataclasses.fields(leaf):
        v = getattr(leaf, f.name)
        if isinstance(v, tuple) and f.name == "parts":
            parts.append(f"parts=[{', '.join(_leaf_repr(p) for p in v)}]")
        elif hasattr(v, "shape") and hasattr(v, "dtype"):
            if v.shape == () and not isinstance(v, jax.core.Tracer):
                parts.append(f"{f.name}={float(v):g}")
            else:
                parts.append(f"{f.name}={tuple(v.shape)} {v.dtype}")
        else:
            parts.append(f"{f.name}={v!r}")
    return f"{type(leaf).__name__}({', '.join(parts)})"


for _cls in (LoraLeaf, LohaLeaf, LokrLeaf, DiffLeaf, SetLeaf, DoraLeaf, SumLeaf):
    _cls.__repr__ = _leaf_repr
