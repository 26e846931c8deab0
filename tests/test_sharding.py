"""Sharded application: NamedSharding meshes, shard_map and pmap give the single-device result.

Reference for the outputs is the diffusers torch forward (via the single-device
jlora path, itself checked against diffusers in test_parity.py) and, for the
torch-backed check here, diffusers' loaded model directly.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
import reference as R

ROW_PARALLEL = ("to_out_0", "proj_out", "net_2", "conv2")  # split the input axis, the rest the output axis


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    unet, te = R.build_sd15_unet(), R.build_clip_text()
    path = R.make_peft_lora_file(tmp_path_factory.mktemp("shard"), [unet, te], rank=4, alpha=8, pipeline="sd")
    adapters = jlora.load_lora_weights(path, {"unet": unet.flax_params, "text_encoder": te.flax_params}, family="sd")
    return unet, adapters["unet"], path


def _mesh():
    assert len(jax.devices()) == 8, "conftest sets 8 host devices"
    return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def _param_specs(params):
    def spec(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if x.ndim < 2:
            return P()
        axis = x.ndim - 2 if any(r in name for r in ROW_PARALLEL) else x.ndim - 1
        if x.shape[axis] % 4:
            return P()
        entries = [None] * x.ndim
        entries[axis] = "model"
        return P(*entries)

    return jax.tree_util.tree_map_with_path(spec, params)


def test_adapter_shardings_follow_kernels(sd):
    unet, adapter, _ = sd
    mesh = _mesh()
    specs = _param_specs(unet.flax_params)
    params = jax.device_put(unet.flax_params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    placed = jlora.shard_adapter(adapter, params)
    leaves = jax.tree_util.tree_flatten_with_path(placed, is_leaf=jlora.is_adapter_leaf)[0]
    kernels = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    checked = 0
    for path, leaf in leaves:
        if leaf is None:
            continue
        kspec = tuple(kernels[path].sharding.spec) + (None,) * 4
        nd = kernels[path].ndim
        aspec = tuple(leaf.a.sharding.spec) + (None,) * 4  # specs carry no trailing Nones
        assert aspec[: nd - 1] == kspec[: nd - 1]
        assert all(s is None for s in aspec[nd - 1 :])
        assert (tuple(leaf.b.sharding.spec) + (None, None))[:2] == (None, kspec[nd - 1])
        checked += 1
    assert checked == jlora.count(adapter) > 50
    # both layouts occur: row-parallel (a split) and column-parallel (b split)
    a_split = sum(any(s is not None for s in l.a.sharding.spec) for _, l in leaves if l is not None)
    b_split = sum(any(s is not None for s in l.b.sharding.spec) for _, l in leaves if l is not None)
    assert a_split > 0 and b_split > 0


def test_sharded_jit_forward_equals_single_device_and_diffusers(sd):
    unet, adapter, path = sd
    mesh = _mesh()
    specs = _param_specs(unet.flax_params)
    params = jax.device_put(unet.flax_params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    sharded_adapter = jlora.shard_adapter(adapter, params)
    inputs = dict(unet.inputs)
    inputs = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in inputs.items()}
    fn = R.flax_apply_fn(unet)
    step = jax.jit(lambda p, a, s, inp: fn(jlora.apply(p, a, s), **inp))
    y_sharded = np.asarray(step(params, sharded_adapter, 0.7, inputs))
    y_single = np.asarray(jax.jit(lambda p, a, s, inp: fn(jlora.apply(p, a, s), **inp))(unet.flax_params, adapter, 0.7, unet.inputs))
    assert np.abs(y_sharded - y_single).max() <= 1e-5 * np.abs(y_single).max()
    expected = R.torch_forward(R.torch_model_with_lora(unet, path), unet, scale=0.7)
    effect = np.abs(expected - R.torch_forward(unet.torch_model, unet)).max()
    assert np.abs(y_sharded - expected).max() <= 1e-3 * effect


def test_apply_inside_shard_map_needs_no_gather(sd):
    unet, adapter, _ = sd
    mesh = _mesh()
    specs = _param_specs(unet.flax_params)
    a_specs = jlora.adapter_specs(adapter, specs)
    params = jax.device_put(unet.flax_params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    local = jax.jit(
        jax.shard_map(lambda p, a, s: jlora.apply(p, a, s), mesh=mesh, in_specs=(specs, a_specs, P()), out_specs=specs)
    )
    merged = local(params, jlora.shard_adapter(adapter, params), 0.9)
    want = jlora.apply(unet.flax_params, adapter, 0.9)
    for g, w in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_pmap_replicated_params_per_device_batch(sd):
    unet, adapter, _ = sd
    n = jax.device_count()
    rng = np.random.default_rng(3)
    inputs = {
        "sample": rng.standard_normal((n, 1, 4, 16, 16)).astype(np.float32),
        "timesteps": rng.integers(0, 1000, (n, 1)).astype(np.int32),
        "encoder_hidden_states": rng.standard_normal((n, 1, 7, 32)).astype(np.float32),
    }
    assert set(inputs) == set(unet.inputs)
    fn = R.flax_apply_fn(unet)
    per_device = jax.pmap(lambda p, a, s, inp: fn(jlora.apply(p, a, s), **inp), in_axes=(None, None, None, 0))
    y = np.asarray(per_device(unet.flax_params, adapter, 0.5, inputs))
    flat = {k: v.reshape((n,) + v.shape[2:]) for k, v in inputs.items()}
    want = np.asarray(jax.jit(lambda p, a, inp: fn(jlora.apply(p, a, 0.5), **inp))(unet.flax_params, adapter, flat))
    assert np.abs(y.reshape(want.shape) - want).max() <= 1e-5 * np.abs(want).max()
