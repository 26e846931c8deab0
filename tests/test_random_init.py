"""random_params: the shapes, dtypes and spread of a Flax model's own init, without compiling it."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jlora.models import random_params


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(50, 64)(ids)
        x = nn.LayerNorm()(x)
        x = nn.Conv(256, (3, 3))(x[:, :, None, :].repeat(3, 2))
        return nn.Dense(128)(x)


def test_matches_flax_init_in_structure_and_spread():
    shapes = jax.eval_shape(lambda k: Net().init(k, jnp.zeros((2, 5), jnp.int32)), jax.random.key(0))["params"]
    flax_params = Net().init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]
    ours = random_params(shapes, seed=3)
    assert jax.tree.structure(ours) == jax.tree.structure(flax_params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_params)):
        assert a.shape == b.shape and a.dtype == b.dtype
    for name in ("Conv_0", "Dense_0"):  # flax's default kernel init is lecun-normal too
        k, ref = np.asarray(ours[name]["kernel"]), np.asarray(flax_params[name]["kernel"])
        assert abs(k.std() / ref.std() - 1) < 0.1
        np.testing.assert_array_equal(ours[name]["bias"], 0)
    np.testing.assert_array_equal(ours["LayerNorm_0"]["scale"], 1)


def test_deterministic_per_seed_and_per_leaf():
    shapes = {"a": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
              "b": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.bfloat16)}}
    one, again, other = random_params(shapes, 1), random_params(shapes, 1), random_params(shapes, 2)
    np.testing.assert_array_equal(one["a"]["kernel"], again["a"]["kernel"])
    assert not np.array_equal(one["a"]["kernel"], other["a"]["kernel"])
    assert not np.array_equal(np.asarray(one["a"]["kernel"]), np.asarray(one["b"]["kernel"], np.float32))
    assert one["b"]["kernel"].dtype == jnp.bfloat16
    alone = random_params({"a": shapes["a"]}, 1)  # adding a leaf leaves the others' values alone
    np.testing.assert_array_equal(alone["a"]["kernel"], one["a"]["kernel"])
