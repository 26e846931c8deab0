"""The two ways a LoRA leaf adds `a @ b` into a weight: the matrix product (inside model calls), and for
`jlora.fuse` / `unfuse` (on a CPU, ranks up to `jlora.leaf.OUTER_SUM_MAX_RANK`) one elementwise pass
summing rank-1 outer products.

Reference: the same arithmetic in float64 numpy. Fusing a diffusers-written file against diffusers'
`fuse_lora` runs through this path in tests/test_parity.py and tests/test_serving.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core import _merge_list
from jlora.leaf import OUTER_SUM_MAX_RANK, LoraLeaf, _add_low_rank

SCALE = 0.8

# (kernel shape, rank): Dense, Conv (kh, kw, in, out) and stacked layers (L, in, out), at ranks on both
# sides of the threshold.
CASES = [((24, 40), 1), ((24, 40), 4), ((24, 40), OUTER_SUM_MAX_RANK), ((24, 40), OUTER_SUM_MAX_RANK + 1),
         ((3, 3, 8, 16), 4), ((3, 3, 8, 16), 48), ((2, 24, 40), 6), ((2, 24, 40), 40)]


def _leaf(shape, rank, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape[:-1] + (rank,)).astype(np.float32)
    b_shape = (shape[0], rank, shape[-1]) if len(shape) == 3 else (rank, shape[-1])
    b = rng.standard_normal(b_shape).astype(np.float32)
    alpha = np.full((shape[0],), 2.0 * rank, np.float32) if len(shape) == 3 else np.float32(2.0 * rank)
    w = rng.standard_normal(shape).astype(np.float32)
    return w, LoraLeaf(jnp.asarray(a), jnp.asarray(b), jnp.asarray(alpha)), (a, b, alpha)


def _reference_merge(w, a, b, alpha, scale):
    a, b = a.astype(np.float64), b.astype(np.float64)
    rank = a.shape[-1]
    if b.ndim == 3:
        d = np.einsum("lir,lro->lio", a, b) * (np.asarray(alpha, np.float64) / rank)[:, None, None]
    else:
        d = np.tensordot(a, b, axes=1) * (float(alpha) / rank)
    return w.astype(np.float64) + scale * d


@pytest.mark.parametrize("shape,rank", CASES)
def test_merge_equals_the_float64_product(shape, rank):
    w, leaf, (a, b, alpha) = _leaf(shape, rank)
    got = np.asarray(jax.jit(lambda w, l, s: l.merge(w, s, single_pass=True))(w, leaf, SCALE))
    want = _reference_merge(w, a, b, alpha, SCALE)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("rank", [4, OUTER_SUM_MAX_RANK + 8])
def test_cpu_lowering_chooses_by_rank(rank):
    """The choice is visible in the lowered program: no matrix product up to the threshold on a CPU,
    the matrix product above it and on every other platform."""
    w, leaf, _ = _leaf((24, 40), rank)
    fn = jax.jit(lambda w, l: l.merge(w, SCALE, single_pass=True))
    cpu = fn.trace(w, leaf).lower(lowering_platforms=("cpu",)).as_text()
    cuda = fn.trace(w, leaf).lower(lowering_platforms=("cuda",)).as_text()
    assert ("dot_general" in cpu) == (rank > OUTER_SUM_MAX_RANK)
    assert "dot_general" in cuda


@pytest.mark.parametrize("shape,rank", [((24, 40), 4), ((3, 3, 8, 16), 4), ((2, 24, 40), 6), ((24, 40), 48)])
def test_gradients_and_jvp_are_the_products(shape, rank):
    """d/dw, d/da, d/db of <g, merge(w)> against the float64 formulas, and a forward-mode jvp."""
    w, leaf, (a, b, alpha) = _leaf(shape, rank)
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)

    def loss(w, a, b):
        return jnp.sum(LoraLeaf(a, b, leaf.alpha).merge(w, SCALE, single_pass=True) * g)

    gw, ga, gb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(w, leaf.a, leaf.b)
    g64 = g.astype(np.float64)
    if len(shape) == 3:
        c = SCALE * np.asarray(alpha, np.float64)[:, None, None] / rank
        want_a = np.einsum("lio,lro->lir", g64 * c, b)
        want_b = np.einsum("lir,lio->lro", a, g64 * c)
    else:
        c = SCALE * float(alpha) / rank
        g2 = g64.reshape(-1, shape[-1])
        want_a = (g2 @ b.T.astype(np.float64) * c).reshape(a.shape)
        want_b = a.reshape(-1, rank).T.astype(np.float64) @ g2 * c
    np.testing.assert_allclose(np.asarray(gw), g64, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ga), want_a, rtol=1e-5, atol=1e-5 * np.abs(want_a).max())
    np.testing.assert_allclose(np.asarray(gb), want_b, rtol=1e-5, atol=1e-5 * np.abs(want_b).max())

    da = np.random.default_rng(2).standard_normal(a.shape).astype(np.float32)
    _, tangent = jax.jvp(lambda a: LoraLeaf(a, leaf.b, leaf.alpha).merge(w, SCALE, single_pass=True), (leaf.a,), (da,))
    want_t = _reference_merge(np.zeros_like(w), da, b, alpha, SCALE)
    np.testing.assert_allclose(np.asarray(tangent), want_t, rtol=1e-5, atol=1e-5 * np.abs(want_t).max())


def test_zero_padded_rank_adds_bit_for_bit():
    """Hotswap pads factors with zeros on the rank axis: up to the threshold the sum added into the weight
    does not change in any bit, from rank 2 (at rank 1 the single product may be fused into the add, one
    rounding fewer; across the threshold the two paths agree to float32 rounding)."""
    for rank, padded_rank in ((5, 16), (2, OUTER_SUM_MAX_RANK)):
        w, leaf, _ = _leaf((24, 40), rank)
        pad = padded_rank - rank
        a, b = jnp.pad(leaf.a, ((0, 0), (0, pad))), jnp.pad(leaf.b, ((0, pad), (0, 0)))
        add = jax.jit(_add_low_rank)
        assert np.array_equal(np.asarray(add(w, a, b)), np.asarray(add(w, leaf.a, leaf.b))), (rank, padded_rank)


def test_fuse_then_unfuse_restores_the_weights():
    w, leaf, _ = _leaf((24, 40), 8)
    params = {"dense": {"kernel": jnp.asarray(w)}}
    adapter = {"dense": {"kernel": leaf}}
    restored = jlora.unfuse(jlora.fuse(params, adapter, SCALE), adapter, SCALE)
    np.testing.assert_allclose(np.asarray(restored["dense"]["kernel"]), w, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("shape,rank", [((24, 40), 8), ((3, 3, 8, 16), 4), ((24, 40), 48)])
def test_fuse_and_apply_agree_and_use_their_paths(shape, rank):
    """`fuse` (single pass up to the threshold) and `apply` (the matrix product, inside model calls) give
    the float64 merge; lowered for a CPU, only `apply` and ranks above the threshold hold a dot."""
    w, leaf, (a, b, alpha) = _leaf(shape, rank)
    params, adapter = {"layer": {"kernel": jnp.asarray(w)}}, {"layer": {"kernel": leaf}}
    want = _reference_merge(w, a, b, alpha, SCALE)
    fused = np.asarray(jlora.fuse(params, adapter, SCALE)["layer"]["kernel"])
    applied = np.asarray(jax.jit(jlora.apply)(params, adapter, SCALE)["layer"]["kernel"])
    for got in (fused, applied):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    lowered = {name: jax.jit(fn).trace(params, adapter, SCALE).lower(lowering_platforms=("cpu",)).as_text()
               for name, fn in (("fuse", lambda p, a, s: _merge_list([p["layer"]["kernel"]], [a["layer"]["kernel"]], s)),
                                ("apply", jlora.apply))}
    assert ("dot_general" in lowered["fuse"]) == (rank > OUTER_SUM_MAX_RANK)
    assert "dot_general" in lowered["apply"]
