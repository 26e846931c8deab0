"""`jlora.Adapters` and diffusers' verbs, against diffusers 0.35.2 + PEFT in torch.

Reference: two PEFT LoRA files loaded into one torch UNet / CLIP with diffusers' loaders under two
adapter names, then diffusers' own `UNet2DConditionModel.set_adapters` (block-wise scales expanded
by diffusers) and `set_adapters_for_text_encoder`, `disable_lora`, `fuse_lora(adapter_names=...)`.
"""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import reference as R
from jlora import errors


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def setup(request, tmp_path_factory):
    family = request.param
    unet = R.build_sd15_unet() if family == "sd" else R.build_sdxl_unet()
    clip = R.build_clip_text()
    tmp = tmp_path_factory.mktemp(f"adapters-{family}")
    paths = [R.make_peft_lora_file(tmp / n, [unet, clip], rank=r, alpha=a, seed=s, pipeline=family)
             for n, r, a, s in (("a", 4, 8.0, 0), ("b", 2, 2.0, 1))]
    loaded = {n: jlora.load_lora_weights(p, {"unet": unet.flax_params, "text_encoder": clip.flax_params})
              for n, p in zip("ab", paths)}
    return family, unet, clip, paths, jlora.Adapters.of(loaded)


def _torch(ref, paths, family):
    mixin = R._mixin(family)
    model = copy.deepcopy(ref.torch_model)
    for name, path in zip("ab", paths):
        sd, alphas, meta = mixin.lora_state_dict(os.path.dirname(path), weight_name=os.path.basename(path),
                                                 return_lora_metadata=True)
        if ref.is_unet:
            mixin.load_lora_into_unet(sd, alphas, model, adapter_name=name, metadata=meta)
        else:
            mixin.load_lora_into_text_encoder(sd, alphas, model, prefix=ref.component, adapter_name=name, metadata=meta)
    return model.eval()


def _block_scales(family):
    if family == "sd":  # attentions: down block 0 (1 layer), up block 1 (2 layers), mid
        return {"down": 0.5, "mid": 0.2, "up": {"block_1": [0.3, 0.6]}}
    return {"down": {"block_1": [0.4]}, "mid": 1.5, "up": {"block_0": [0.2, 0.9]}}  # SDXL-shaped


def _flax(ref, ad, component, scale=1.0):
    return R.flax_forward(ref, jlora.apply(ref.flax_params, jlora.resolve(ad, component), scale))


def test_set_adapters_with_list_and_block_weights_matches_diffusers(setup):
    family, unet, clip, paths, ad = setup
    weights = [0.7, {"unet": _block_scales(family), "text_encoder": 0.4}]
    ad = jlora.set_adapters(ad, ["a", "b"], weights)

    tu = _torch(unet, paths, family)
    tu.set_adapters(["a", "b"], weights=[0.7, _block_scales(family)])
    want = R.torch_forward(tu, unet, scale=0.8)
    base = R.torch_forward(unet.torch_model, unet)
    got = _flax(unet, ad, "unet", 0.8)
    effect = np.abs(want - base).max()
    assert effect > 0.1
    assert np.abs(got - want).max() <= 1e-3 * effect

    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    tc = _torch(clip, paths, family)
    set_adapters_for_text_encoder(["a", "b"], tc, [0.7, 0.4])
    want = R.torch_forward(tc, clip)
    got = _flax(clip, ad, "text_encoder")
    effect = np.abs(want - R.torch_forward(clip.torch_model, clip)).max()
    assert effect > 0.05 and np.abs(got - want).max() <= 1e-3 * effect


def test_block_scales_change_only_their_blocks(setup):
    """Zero weight on every block but the mid one: down/up attention kernels get no delta, the mid's full."""
    family, unet, _, _, ad = setup
    ad = jlora.set_adapters(ad, "a", {"unet": {"down": 0.0, "up": 0.0, "mid": 1.0}})
    merged = jlora.resolve(ad, "unet")
    d = jax.tree_util.tree_flatten_with_path(jlora.delta(merged), is_leaf=lambda x: x is None)[0]
    for kp, x in d:
        if x is None:
            continue
        path = "/".join(jlora.loading.path_of(kp))
        norm = float(jnp.abs(x).max())
        if "attentions" in path and path.startswith(("down_blocks", "up_blocks")):
            assert norm == 0.0, path
        if path.startswith("mid_block/attentions_0"):
            assert norm > 0.0, path


def test_disable_and_enable_match_diffusers_and_never_recompile(setup):
    family, unet, _, paths, ad = setup
    fn = R.flax_apply_fn(unet)
    step = jax.jit(lambda p, ad, inputs: fn(jlora.apply(p, jlora.resolve(ad, "unet")), **inputs))
    inputs = {k: jnp.asarray(v) for k, v in unet.inputs.items()}
    ad = jlora.set_adapters(ad, ["a", "b"], [0.5, 1.0])
    on = np.asarray(step(unet.flax_params, ad, inputs))
    off = np.asarray(step(unet.flax_params, jlora.disable_lora(ad), inputs))
    again = np.asarray(step(unet.flax_params, jlora.enable_lora(jlora.set_adapters(ad, ["a", "b"], [0.9, 0.1])), inputs))
    assert step._cache_size() == 1  # weights and the switch are traced
    np.testing.assert_allclose(off, R.torch_forward(unet.torch_model, unet), atol=1e-4)
    assert np.abs(on - again).max() > 1e-3
    tu = _torch(unet, paths, family)
    tu.set_adapters(["a", "b"], weights=[0.9, 0.1])
    want = R.torch_forward(tu, unet)
    assert np.abs(again - want).max() <= 1e-3 * np.abs(want - off).max()


def test_fuse_by_adapter_names_matches_diffusers_fuse_lora(setup):
    family, unet, _, paths, ad = setup
    ad = jlora.set_adapters(ad, ["a", "b"], [0.6, 0.3])
    tu = _torch(unet, paths, family)
    tu.set_adapters(["a", "b"], weights=[0.6, 0.3])
    tu.fuse_lora(lora_scale=0.8, adapter_names=["b"])
    want = R.torch_state_dict_to_flax(unet, {k.replace(".base_layer", ""): v for k, v in tu.state_dict().items()
                                             if "lora_" not in k})
    only_b = jlora.set_adapters(ad, ["b"], [0.3])
    got = jlora.fuse(unet.flax_params, jlora.resolve(only_b, "unet"), 0.8)
    for (kp, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=str(kp))


def test_verbs(setup):
    _, _, _, _, ad = setup
    assert jlora.get_list_adapters(ad) == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}
    ad = jlora.set_adapters(ad, "b")
    assert jlora.get_active_adapters(ad) == ["b"]
    gone = jlora.delete_adapters(ad, "b")
    assert jlora.get_active_adapters(gone) == [] and jlora.resolve(gone, "unet") is None
    assert "a" in repr(gone) and "Array" not in repr(gone)
    with pytest.raises(errors.KeyMismatchError, match="'c'"):
        jlora.set_adapters(ad, ["c"])
    with pytest.raises(errors.InvalidAdapterError, match="2 adapter names but 3 weights"):
        jlora.set_adapters(ad, ["a", "b"], [1, 2, 3])
    with pytest.raises(errors.InvalidAdapterError, match="block_9"):
        jlora.set_adapters(ad, "a", {"unet": {"up": {"block_9": 1.0}}})
    with pytest.raises(errors.InvalidAdapterError, match="expected"):
        jlora.set_adapters(ad, "a", {"unet": {"up": {"block_" + str(_up_block(ad)): [1.0, 2.0, 3.0, 4.0]}}})
    with pytest.raises(errors.InvalidAdapterError, match="finite"):
        jlora.set_adapters(ad, "a", float("nan"))


def _up_block(ad):
    from jlora.adapters import _module_names, _unet_layout

    blocks, _ = _unet_layout(_module_names(ad.trees["a"]["unet"]))
    return blocks["up"][0]


def test_set_lora_device_moves_to_host_memory_and_back(setup):
    _, _, _, _, ad = setup
    device = jax.devices()[0]
    kinds = {m.kind for m in device.addressable_memories()}
    host = "pinned_host" if "pinned_host" in kinds else "unpinned_host" if "unpinned_host" in kinds else None
    if host is None:
        pytest.skip(f"this backend has no host memory kind ({sorted(kinds)})")
    parked = jlora.set_lora_device(ad, ["a"], jax.sharding.SingleDeviceSharding(device, memory_kind=host))
    leaves = [x for x in jax.tree.leaves(parked.trees["a"])]
    assert leaves and all(x.sharding.memory_kind == host for x in leaves)
    back = jlora.set_lora_device(parked, ["a"], jax.sharding.SingleDeviceSharding(device))
    assert all(x.sharding.memory_kind == device.default_memory().kind for x in jax.tree.leaves(back.trees["a"]))
    for x, y in zip(jax.tree.leaves(back.trees["a"]), jax.tree.leaves(ad.trees["a"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_apply_and_fuse_take_the_collection(setup):
    _, unet, _, _, ad = setup
    ad = jlora.set_adapters(ad, ["a", "b"], [0.6, 0.3])
    want = jlora.apply(unet.flax_params, jlora.resolve(ad, "unet"), 0.8)
    for got in (jlora.apply(unet.flax_params, ad, 0.8, component="unet"),
                jlora.fuse(unet.flax_params, ad, 0.8, component="unet")):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    with pytest.raises(errors.InvalidAdapterError, match="component="):
        jlora.apply(unet.flax_params, ad, 0.8)


def test_unfuse_knows_what_was_fused(setup):
    _, unet, _, _, ad = setup
    a = jlora.resolve(jlora.set_adapters(ad, "a"), "unet")
    b = jlora.resolve(jlora.set_adapters(ad, "b"), "unet")
    fused, record = jlora.fuse(unet.flax_params, a, 0.8, return_record=True)
    restored = jlora.unfuse(fused, record)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(unet.flax_params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    with pytest.raises(errors.InvalidAdapterError, match="not the one that was fused"):
        jlora.unfuse(fused, b, 0.8, record=record)
    with pytest.raises(errors.InvalidAdapterError, match="differs from the fused scale 0.8"):
        jlora.unfuse(fused, a, 0.5, record=record)
    with pytest.raises(errors.InvalidAdapterError, match="differs"):
        jlora.unfuse(fused, record, 0.5)


def test_leaf_repr_is_one_line_of_shapes(setup):
    _, _, _, _, ad = setup
    leaf = next(x for x in jax.tree.leaves(ad.trees["a"]["unet"], is_leaf=jlora.is_adapter_leaf) if x is not None)
    text = repr(leaf)
    assert "\n" not in text and "Array(" not in text and text.startswith("LoraLeaf(a=(")


def test_summary_is_one_line(setup):
    _, unet, _, _, ad = setup
    text = jlora.summary(ad.trees["b"]["unet"])
    n = jlora.count(ad.trees["b"]["unet"])
    assert text == f"adapter: {n} weights (lora {n}), ranks [2], float32"
    assert jlora.summary(jax.tree.map(lambda l: None, ad.trees["b"]["unet"], is_leaf=jlora.is_adapter_leaf)) == \
        "adapter: no weights"
