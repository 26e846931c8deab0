"""Forward and fused-weight parity with diffusers + PEFT (PyTorch) on tiny SD / SDXL models.

Reference: the same LoRA file loaded by diffusers' own loaders into the torch models
(tests/reference.py); jlora loads it onto the Flax ports of the same weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import reference as R

PIPELINES = {
    "sd": ["sd15_unet", "clip_text"],
    "sdxl": ["sdxl_unet", "clip_text", "clip_text_proj"],
}
PATTERNS = dict(rank_pattern={"to_q": 2, "conv1": 8, "fc1": 6}, alpha_pattern={"to_k": 3, "proj_in": 16, "q_proj": 5})


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    files = {}
    for pipeline, names in PIPELINES.items():
        refs = [R.ALL_BUILDERS[n]() for n in names]
        files[pipeline] = R.make_peft_lora_file(tmp_path_factory.mktemp(pipeline), refs, rank=4, alpha=8, pipeline=pipeline)
        files[pipeline + "-patterns"] = R.make_peft_lora_file(
            tmp_path_factory.mktemp(pipeline + "p"), refs, rank=4, alpha=8, pipeline=pipeline, seed=1, **PATTERNS
        )
    return files


def _load(path, pipeline):
    refs = [R.ALL_BUILDERS[n]() for n in PIPELINES[pipeline.split("-")[0]]]
    params = {ref.component: ref.flax_params for ref in refs}
    adapters, report = jlora.load_lora_weights(path, params, family=pipeline.split("-")[0], return_report=True)
    return refs, adapters, report


def _jitted(ref):
    fn = R.flax_apply_fn(ref)
    return jax.jit(lambda p, a, s, inputs: fn(jlora.apply(p, a, s), **inputs))


CASES = [(p, n) for p in ("sd", "sdxl", "sd-patterns", "sdxl-patterns") for n in PIPELINES[p.split("-")[0]]]


@pytest.mark.parametrize("pipeline,name", CASES)
def test_forward_matches_diffusers(lora_files, pipeline, name):
    refs, adapters, report = _load(lora_files[pipeline], pipeline)
    ref = next(r for r in refs if r.name == name)
    torch_model = R.torch_model_with_lora(ref, lora_files[pipeline])
    base = R.torch_forward(ref.torch_model, ref)
    step = _jitted(ref)
    for scale in (1.0, 0.6):
        expected = R.torch_forward(torch_model, ref, scale=scale)
        effect = np.abs(expected - base).max()
        assert effect > 0.3 * np.abs(base).max(), "the LoRA effect must be large for the test to mean anything"
        got = np.asarray(step(ref.flax_params, adapters[ref.component], scale, ref.inputs))
        assert np.abs(got - expected).max() <= 1e-3 * effect, (scale, np.abs(got - expected).max(), effect)


@pytest.mark.parametrize("pipeline", ["sd", "sdxl"])
def test_every_module_of_the_file_is_placed(lora_files, pipeline):
    refs, adapters, report = _load(lora_files[pipeline], pipeline)
    sd = jlora.lora_state_dict(lora_files[pipeline])
    assert report.loaded_keys == sorted(sd) and not report.unmatched and not report.unplaced
    for ref in refs:
        n_modules = len({k.rsplit(".lora_", 1)[0] for k in sd if k.startswith(ref.component + ".")})
        assert jlora.count(adapters[ref.component]) == n_modules > 0
    # every kind of target is present: attention, feed-forward, proj_in/out, resnet convs
    unet_paths = {p.path for p in report.placed if p.component == "unet"}
    for part in ("attn1/to_q", "attn2/to_out_0", "ff/net_0/proj", "ff/net_2", "proj_in", "proj_out", "resnets_0/conv1"):
        assert any(part in p for p in unet_paths), part


@pytest.mark.parametrize("pipeline,name", CASES)
def test_fused_weights_match_diffusers_fuse_lora(lora_files, pipeline, name):
    refs, adapters, _ = _load(lora_files[pipeline], pipeline)
    ref = next(r for r in refs if r.name == name)
    scale = 0.8
    fused = jlora.fuse(ref.flax_params, adapters[ref.component], scale=scale, safe_fusing=True)
    expected = R.torch_fused_flax_params(ref, lora_files[pipeline], scale=scale)
    got_flat = dict(jax.tree_util.tree_flatten_with_path(fused)[0])
    exp_flat = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert got_flat.keys() == exp_flat.keys()
    changed = 0
    for k, want in exp_flat.items():
        got = np.asarray(got_flat[k])
        assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-6), jax.tree_util.keystr(k)
        base = np.asarray(dict(jax.tree_util.tree_flatten_with_path(ref.flax_params)[0])[k])
        changed += not np.array_equal(base, want)
    assert changed == jlora.count(adapters[ref.component])


def test_unfuse_restores_params(lora_files):
    refs, adapters, _ = _load(lora_files["sd"], "sd")
    for ref in refs:
        adapter = adapters[ref.component]
        fused = jlora.fuse(ref.flax_params, adapter, scale=0.8)
        restored = jlora.unfuse(fused, adapter, scale=0.8)
        for w, r in zip(jax.tree.leaves(ref.flax_params), jax.tree.leaves(restored)):
            np.testing.assert_allclose(np.asarray(r), np.asarray(w), rtol=0, atol=1e-6)
        assert jax.tree.structure(restored) == jax.tree.structure(ref.flax_params)


def test_safe_fusing_rejects_nonfinite_and_leaves_params(lora_files):
    refs, adapters, _ = _load(lora_files["sd"], "sd")
    ref = refs[0]
    adapter = adapters["unet"]
    leaves, treedef = jax.tree_util.tree_flatten(adapter, is_leaf=jlora.is_adapter_leaf)
    i = next(i for i, l in enumerate(leaves) if l is not None)
    leaves[i] = jlora.LoraLeaf(a=leaves[i].a.at[0, 0].set(jnp.nan), b=leaves[i].b, alpha=leaves[i].alpha)
    bad = jax.tree_util.tree_unflatten(treedef, leaves)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(ref.flax_params)]
    with pytest.raises(jlora.errors.UnsafeFusingError, match="NaN"):
        jlora.fuse(ref.flax_params, bad, scale=1.0, safe_fusing=True)
    for b, x in zip(before, jax.tree.leaves(ref.flax_params)):
        np.testing.assert_array_equal(b, np.asarray(x))
    # without safe_fusing the NaN goes through (diffusers' default too)
    fused = jlora.fuse(ref.flax_params, bad, scale=1.0)
    assert not np.isfinite(np.asarray(jax.tree.leaves(fused)[0])).all() or any(
        not np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(fused)
    )


@pytest.mark.parametrize("name", ["sd15_unet", "clip_text"])
def test_scale_is_traced_one_compilation(lora_files, name):
    refs, adapters, _ = _load(lora_files["sd"], "sd")
    ref = next(r for r in refs if r.name == name)
    step = _jitted(ref)
    outs = {s: np.asarray(step(ref.flax_params, adapters[ref.component], s, ref.inputs)) for s in (0.0, 0.5, 1.0)}
    assert step._cache_size() == 1
    base = R.flax_forward(ref, ref.flax_params)
    np.testing.assert_array_equal(outs[0.0], base)
    assert np.abs(outs[1.0] - base).max() > 0.1


def test_combine_weights_like_set_adapters(lora_files):
    """Two adapters with weights equal the weighted sum of their deltas (diffusers' set_adapters)."""
    ref = R.build_sd15_unet()
    a1 = jlora.load_lora(lora_files["sd"], ref.flax_params, "unet")
    a2 = jlora.load_lora(lora_files["sd-patterns"], ref.flax_params, "unet")
    both = jlora.combine({"style": a1, "detail": a2}, {"style": 0.7, "detail": -0.4})
    got = jlora.apply(ref.flax_params, both, 0.5)
    want = jlora.apply(jlora.apply(ref.flax_params, a1, 0.5 * 0.7), a2, 0.5 * -0.4)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
