"""Serving many LoRAs: hotswap into a compiled step, and a different LoRA per sample in one batch.

Reference: diffusers + PEFT in PyTorch. Each LoRA file is written by PEFT/diffusers
(tests/reference.py) and loaded by diffusers' own loaders into the torch model, one file per run,
with the call scale through `cross_attention_kwargs` (UNet) or `scale_lora_layers` (CLIP).
jlora loads the same files onto the Flax ports of the same weights. Stacked (layer-scanned)
padding is checked against numpy's per-layer `alpha / r * a @ b`.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
import reference as R
from jlora import errors
from jlora.models import flux
from jlora import NO_LORA, hotswap_template, pad_adapter, per_sample, per_sample_apply, stack_adapters
from jlora.errors import UnsupportedModuleError
from untouched import untouched

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_REGEX = r"attn[12]/to_(q|k|v|out_0)|ff/net_(0/proj|2)|proj_(in|out)|resnets_\d+/(conv1|conv2|conv_shortcut|time_emb_proj)"
# name: (make_peft_lora_file options, components); different ranks, alphas and target subsets
FILES = {
    "full": (dict(rank=4, alpha=8, seed=1), ("unet", "text_encoder")),
    "attn": (dict(rank=2, alpha=3, seed=2, init_scale=4.0, target_modules={"unet": ATTENTION, "text_encoder": ("q_proj", "v_proj", "fc2")}),
             ("unet", "text_encoder")),
    "mixed": (dict(rank=8, alpha=4, seed=3, rank_pattern={"conv2": 5}, target_modules={"unet": ("to_q", "to_v", "ff.net.0.proj", "proj_in", "conv2")}),
              ("unet",)),
}
TEMPLATE_RANK = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory, unet, clip):
    refs = {"unet": unet, "text_encoder": clip}
    return {
        name: R.make_peft_lora_file(tmp_path_factory.mktemp(name), [refs[c] for c in comps], pipeline="sd", **opts)
        for name, (opts, comps) in FILES.items()
    }


@pytest.fixture(scope="module")
def adapters(files, unet, clip):
    """{name: {component: adapter}} loaded by jlora."""
    out = {}
    for name, path in files.items():
        params = {c: {"unet": unet, "text_encoder": clip}[c].flax_params for c in FILES[name][1]}
        out[name] = jlora.load_lora_weights(path, params, family="sd")
    return out


@pytest.fixture(scope="module")
def torch_lora(files, unet, clip):
    """Cached diffusers+PEFT torch models with one file loaded: (name, component) -> model."""
    cache = {}

    def get(name, ref):
        if (name, ref.component) not in cache:
            cache[name, ref.component] = R.torch_model_with_lora(ref, files[name])
        return cache[name, ref.component]

    return get


def _with_inputs(ref, **inputs):
    """The same models with other inputs (a new Ref; the cached one is not modified)."""
    return dataclasses.replace(ref, inputs={**ref.inputs, **inputs})


def _unet_batch(unet, n, seed=7):
    rng = np.random.default_rng(seed)
    return _with_inputs(
        unet,
        sample=rng.standard_normal((n, 4, 16, 16)).astype(np.float32),
        timesteps=np.linspace(5.0, 900.0, n).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((n, 7, 32)).astype(np.float32),
    )


def _layout(tree):
    """Tree structure plus (shape, dtype) of every array: what a jitted function compiles for."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(tuple(x.shape), jnp.result_type(x)) for x in leaves]


def _modules(path, component):
    keys = jlora.lora_state_dict(path)
    return {k.split(".lora_")[0] for k in keys if k.startswith(component + ".")}


def _close(got, expected, base, what):
    effect = np.abs(expected - base).max()
    assert effect > 0.3 * np.abs(base).max(), (what, "the LoRA effect must be large for the test to mean anything")
    err = np.abs(got - expected).max()
    assert err <= 1e-3 * effect, (what, err, effect)


# --------------------------------------------------------------------------------------------
# 1. hotswap: one compilation, every swapped LoRA matches diffusers
# --------------------------------------------------------------------------------------------


SWAPS = (("full", 1.0), ("attn", 0.7), ("mixed", 1.0), ("full", -0.5))  # also the per-sample (LoRA, scale) pairs


@pytest.fixture(scope="module")
def batch(unet):
    """The tiny UNet with a 5-sample batch."""
    return _unet_batch(unet, 5)


@pytest.fixture(scope="module")
def torch_out(batch, torch_lora):
    """diffusers+PEFT forward of the batch with one file loaded at one scale (None: the base model), cached."""
    cache = {}

    def get(name, scale=1.0):
        if (name, scale) not in cache:
            model = batch.torch_model if name is None else torch_lora(name, batch)
            cache[name, scale] = R.torch_forward(model, batch, scale=scale)
        return cache[name, scale]

    return get


@pytest.fixture(scope="module")
def hotswapped(batch, adapters):
    """One jitted step run on the template, then on each file padded to it: (outputs, traces, cache size)."""
    params, fn = batch.flax_params, R.flax_apply_fn(batch)
    template = hotswap_template(params, TEMPLATE_RANK, targets=UNET_REGEX)
    traces = []

    def step(p, adapter, scale, inputs):
        traces.append(1)
        return fn(jlora.apply(p, adapter, scale), **inputs)

    step = jax.jit(step)
    outputs = {(None, 1.0): np.asarray(step(params, template, 1.0, batch.inputs))}
    for name, scale in SWAPS:
        padded = pad_adapter(adapters[name]["unet"], template)
        assert _layout(padded) == _layout(template)
        outputs[name, scale] = np.asarray(step(params, padded, scale, batch.inputs))
    return outputs, len(traces), step._cache_size()


def test_hotswap_compiles_once_and_matches_diffusers(batch, hotswapped, torch_out):
    outputs, traces, cache_size = hotswapped
    assert traces == 1 and cache_size == 1
    np.testing.assert_allclose(outputs[None, 1.0], R.flax_forward(batch, batch.flax_params), atol=1e-6)
    for name, scale in SWAPS:
        _close(outputs[name, scale], torch_out(name, scale), torch_out(None), (name, scale))


def test_template_from_adapters_is_the_union_of_their_targets(unet, files, adapters):
    loaded = [adapters[n]["unet"] for n in FILES]
    template = hotswap_template(unet.flax_params, TEMPLATE_RANK, targets=loaded)
    union = set().union(*(_modules(files[n], "unet") for n in FILES))
    assert jlora.count(template) == len(union) == jlora.count(adapters["full"]["unet"])  # "full" covers the others
    leaves = [l for l in jax.tree.leaves(template, is_leaf=jlora.is_adapter_leaf) if l is not None]
    assert {l.rank for l in leaves} == {TEMPLATE_RANK} and not any(np.any(np.asarray(l.b)) for l in leaves)
    for name in FILES:
        assert _layout(pad_adapter(adapters[name]["unet"], template)) == _layout(template)


@pytest.mark.parametrize("name", list(FILES))
def test_padded_fused_weights_equal_unpadded(unet, adapters, name):
    params, adapter = unet.flax_params, adapters[name]["unet"]
    padded = pad_adapter(adapter, hotswap_template(params, TEMPLATE_RANK, targets=UNET_REGEX))
    fused, fused_padded = jlora.fuse(params, adapter, 0.8), jlora.fuse(params, padded, 0.8)
    for w, got, want in zip(jax.tree.leaves(params), jax.tree.leaves(fused_padded), jax.tree.leaves(fused)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7 * np.abs(np.asarray(w)).max())
    changed = sum(not np.array_equal(np.asarray(w), np.asarray(f)) for w, f in zip(jax.tree.leaves(params), jax.tree.leaves(fused_padded)))
    assert changed == jlora.count(adapter)


def test_padded_fused_weights_match_diffusers_fuse_lora(unet, files, adapters):
    """The rank-pattern file (ranks 8 and 5) padded to 8, fused, against diffusers' fuse_lora."""
    padded = pad_adapter(adapters["mixed"]["unet"], hotswap_template(unet.flax_params, 12, targets=UNET_REGEX))
    fused = jlora.fuse(unet.flax_params, padded, 0.8)
    expected = R.torch_fused_flax_params(unet, files["mixed"], scale=0.8)
    for (kp, want), got in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(fused)):
        assert np.abs(np.asarray(got) - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-6), jax.tree_util.keystr(kp)


def test_donated_pad_lands_in_the_templates_buffers(unet, files, adapters):
    """Swapping with donate=True: every factor of the result occupies the previous adapter's buffers, the
    values equal the host padding (itself checked against diffusers' fuse_lora above), and kernels the
    new LoRA leaves out are zero again."""
    loaded = [adapters[n]["unet"] for n in ("full", "mixed", "attn")]
    template = hotswap_template(unet.flax_params, TEMPLATE_RANK, targets=loaded)
    expected = [pad_adapter(a, template) for a in loaded]
    current = jax.tree.map(jnp.copy, template)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(current)]
    for adapter, want in zip(loaded, expected):
        before = jax.tree.leaves(current)
        current = pad_adapter(adapter, current, donate=True)
        assert all(x.is_deleted() for x in before)
        assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(current)] == pointers
        assert _layout(current) == _layout(template)
        for got, ref in zip(jax.tree.leaves(current), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    with pytest.raises(errors.ShapeMismatchError, match="rank"):
        pad_adapter(adapters["full"]["unet"], hotswap_template(unet.flax_params, 2, targets=UNET_REGEX), donate=True)


def test_hotswap_lora_swaps_files_into_the_template_and_matches_diffusers(batch, files, torch_out):
    """`hotswap_lora` (file -> the previous adapter's buffers in one donated call), one compiled step for every
    swapped file, each output against diffusers+PEFT with that file loaded at that scale."""
    params, fn = batch.flax_params, R.flax_apply_fn(batch)
    current = hotswap_template(params, TEMPLATE_RANK, targets=UNET_REGEX)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(current)]
    traces = []

    def step(p, adapter, scale, inputs):
        traces.append(1)
        return fn(jlora.apply(p, adapter, scale), **inputs)

    step = jax.jit(step)
    for name, scale in SWAPS:
        before = jax.tree.leaves(current)
        current, report = jlora.hotswap_lora(files[name], params, current, "unet", return_report=True)
        assert all(x.is_deleted() for x in before) and report.format == "peft"
        assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(current)] == pointers
        _close(np.asarray(step(params, current, scale, batch.inputs)), torch_out(name, scale), torch_out(None), (name, scale))
    assert len(traces) == 1 and step._cache_size() == 1


def test_hotswap_lora_from_a_state_dict_copies_it_and_refuses_what_pad_adapter_refuses(unet, files, adapters):
    """A state dict is left as it was and shares no memory with the swapped adapter; a rank above the template's
    or a LoRA outside its targets raises before the template is consumed."""
    params = unet.flax_params
    tensors, metadata = jlora.lora_state_dict(files["mixed"], return_lora_metadata=True)
    state = {k: np.array(v) for k, v in tensors.items()}
    current = hotswap_template(params, TEMPLATE_RANK, targets=UNET_REGEX)
    with untouched(state, params):
        current = jlora.hotswap_lora(state, params, current, "unet", metadata=metadata)
    want = pad_adapter(adapters["mixed"]["unet"], hotswap_template(params, TEMPLATE_RANK, targets=UNET_REGEX))
    snapshot = jax.tree.map(np.asarray, current)
    for v in state.values():
        v[...] = 7
    for got, kept, ref in zip(jax.tree.leaves(current), jax.tree.leaves(snapshot), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), kept)
        np.testing.assert_array_equal(kept, np.asarray(ref))
    small = hotswap_template(params, 4, targets=UNET_REGEX)
    with pytest.raises(errors.ShapeMismatchError, match=r"rank 8 .*rank 4"):
        jlora.hotswap_lora(files["mixed"], params, small, "unet")
    narrow = hotswap_template(params, TEMPLATE_RANK, targets=r"attn[12]/to_(q|k|v|out_0)")
    with pytest.raises(errors.KeyMismatchError, match=r"wider regex"):
        jlora.hotswap_lora(files["full"], params, narrow, "unet")
    source = pathlib.Path(files["mixed"])
    source = source if source.is_file() else next(source.glob("*.safetensors"))
    truncated = source.with_name("truncated.safetensors")
    truncated.write_bytes(source.read_bytes()[:-100])
    with pytest.raises(errors.CorruptFileError):
        jlora.hotswap_lora(str(truncated), params, narrow, "unet")
    assert not any(x.is_deleted() for x in jax.tree.leaves(small) + jax.tree.leaves(narrow))


FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def flux_params():
    """Random params of a tiny jlora Flux (blocks stacked for nn.scan), built on the host."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), flux.param_shapes(FLUX))


def _stacked_lora(params, path, rank, seed):
    """A random layer-stacked LoRA on one `(L, in, out)` kernel of the Flux params, alpha per layer."""
    layers, n_in, n_out = params[path[0]][path[1]][path[2]]["kernel"].shape
    rng = np.random.default_rng(seed)
    leaf = jlora.LoraLeaf(
        a=jnp.asarray(rng.standard_normal((layers, n_in, rank)), jnp.float32),
        b=jnp.asarray(rng.standard_normal((layers, rank, n_out)), jnp.float32),
        alpha=jnp.asarray(rng.uniform(1, 4, layers), jnp.float32),
    )
    return jax.tree_util.tree_map_with_path(lambda kp, _: leaf if jlora.loading.path_of(kp) == path + ("kernel",) else None, params)


def test_pad_stacked_flux_leaves_keeps_every_layers_delta(flux_params):
    params = flux_params
    template = hotswap_template(params, 6, targets=r"double_blocks/img_attn/qkv|single_blocks/linear1")
    assert jlora.count(template) == 2
    path = ("double_blocks", "img_attn", "qkv")
    adapter = _stacked_lora(params, path, 3, seed=0)
    padded = pad_adapter(adapter, template)
    assert _layout(padded) == _layout(template) and _layout(pad_adapter(_stacked_lora(params, path, 2, 1), template)) == _layout(template)
    leaf = adapter[path[0]][path[1]][path[2]]["kernel"]
    a, b, alpha = (np.asarray(x, np.float64) for x in (leaf.a, leaf.b, leaf.alpha))
    want = np.asarray(params[path[0]][path[1]][path[2]]["kernel"], np.float64) + 0.7 * np.stack(
        [alpha[l] / 3 * a[l] @ b[l] for l in range(a.shape[0])])
    fused = jlora.fuse(params, padded, 0.7)
    np.testing.assert_allclose(np.asarray(fused[path[0]][path[1]][path[2]]["kernel"]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fused["single_blocks"]["linear1"]["kernel"]), np.asarray(params["single_blocks"]["linear1"]["kernel"]))


def test_pad_keeps_a_sharded_templates_placement(flux_params):
    """A template sharded next to its kernels (jlora.shard_adapter): padded adapters land on the same shardings."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(*(None,) * (x.ndim - 1), "model") if x.shape[-1] % 8 == 0 else P())), flux_params)
    template = jlora.shard_adapter(hotswap_template(params, 4, targets=r"double_blocks/img_attn/qkv|img_in"), params)
    padded = pad_adapter(_stacked_lora(flux_params, ("double_blocks", "img_attn", "qkv"), 3, seed=2), template)
    shardings = lambda tree: [x.sharding for x in jax.tree.leaves(tree)]
    assert shardings(padded) == shardings(template) and _layout(padded) == _layout(template)
    assert any(not s.is_fully_replicated for s in shardings(padded))


# --------------------------------------------------------------------------------------------
# 2. a different LoRA per sample in one jitted call
# --------------------------------------------------------------------------------------------

NAMES = list(FILES)  # adapter id k is NAMES[k]
PER_SAMPLE = [SWAPS[0], SWAPS[1], (None, 1.0), SWAPS[2], SWAPS[3]]  # sample i: (LoRA, scale); None: no LoRA


@pytest.mark.parametrize("method", ["concat", "gather"])
def test_per_sample_unet_matches_diffusers_per_lora(batch, adapters, hotswapped, torch_out, method):
    ids = jnp.array([NO_LORA if n is None else NAMES.index(n) for n, _ in PER_SAMPLE])
    scales = jnp.array([s for _, s in PER_SAMPLE])
    stacked = stack_adapters([adapters[n]["unet"] for n in NAMES])
    fn = R.flax_apply_fn(batch)
    record = []

    def step(stacked, ids, scales, p, inputs):
        with per_sample(stacked, ids, scales, method=method) as used:
            out = fn(p, **inputs)
        record.append(used)
        return out

    step = jax.jit(step)
    got = np.asarray(step(stacked, ids, scales, batch.flax_params, batch.inputs))
    (used,) = record
    assert len(used) == jlora.count(stacked) == jlora.count(adapters["full"]["unet"])
    assert {p[-1] for p in used} >= {"conv1", "conv2", "conv_shortcut", "proj_in", "to_q", "time_emb_proj"}
    merged, base = hotswapped[0], torch_out(None)
    effects = []
    for i, (name, scale) in enumerate(PER_SAMPLE):
        if name is not None:
            _close(got[i], torch_out(name, scale)[i], base[i], (i, name, scale))
            effects.append(np.abs(torch_out(name, scale)[i] - base[i]).max())
            np.testing.assert_allclose(got[i], merged[name, scale][i], atol=1e-5 * effects[-1])
    i = PER_SAMPLE.index((None, 1.0))
    assert np.abs(got[i] - base[i]).max() <= 1e-3 * min(effects)
    np.testing.assert_allclose(got[i], merged[None, 1.0][i], atol=1e-6)
    # new ids and scales reuse the compiled step: with no LoRA anywhere it is the base forward
    none = np.asarray(step(stacked, jnp.array([NO_LORA] * 5), jnp.ones(5), batch.flax_params, batch.inputs))
    np.testing.assert_allclose(none, merged[None, 1.0], atol=1e-6)
    assert step._cache_size() == 1 and len(record) == 1


def test_per_sample_clip_matches_diffusers_per_lora(clip, adapters, torch_lora):
    ids_in = np.asarray(clip.inputs["input_ids"])
    ref = _with_inputs(clip, input_ids=np.concatenate([ids_in, ids_in[:1]]))  # rows 0 and 2: same prompt, other LoRA
    names = ["full", "attn"]
    stacked = stack_adapters([adapters[n]["text_encoder"] for n in names])
    ids, scales = [1, NO_LORA, 0], [0.8, 1.0, 1.0]
    step = jax.jit(per_sample_apply(R.flax_apply_fn(ref)))
    got = np.asarray(step(stacked, jnp.array(ids), jnp.array(scales), clip.flax_params, ref.inputs["input_ids"]))
    base = R.torch_forward(clip.torch_model, ref)
    for i, (k, s) in enumerate(zip(ids, scales)):
        if k == NO_LORA:
            assert np.abs(got[i] - base[i]).max() <= 1e-4 * np.abs(base[i]).max()
            continue
        expected = R.torch_forward(torch_lora(names[k], clip), ref, scale=s)[i]
        _close(got[i], expected, base[i], (i, names[k], s))


# --------------------------------------------------------------------------------------------
# 3. errors: typed, naming the path and the fix, caller's data untouched
# --------------------------------------------------------------------------------------------


def _snapshot(adapter):
    return [np.array(x, copy=True) for x in jax.tree.leaves(adapter)]


def _unchanged(adapter, before):
    return all(np.array_equal(np.asarray(x), b) for x, b in zip(jax.tree.leaves(adapter), before))


def test_rank_above_template_is_a_shape_error(unet, adapters):
    adapter, params = adapters["mixed"]["unet"], unet.flax_params
    template = hotswap_template(params, 4, targets=UNET_REGEX)
    before = _snapshot(adapter)
    with untouched(params, adapter), pytest.raises(errors.ShapeMismatchError, match=r"rank 8 .*rank 4.*hotswap_template\(params, 8"):
        pad_adapter(adapter, template)
    with pytest.raises(errors.ShapeMismatchError, match=r"/kernel has rank 8"):
        hotswap_template(params, 4, targets=[adapter])
    assert _unchanged(adapter, before)


def test_target_outside_template_is_a_key_error(unet, adapters):
    adapter = adapters["full"]["unet"]
    template = hotswap_template(unet.flax_params, 8, targets=r"attn[12]/to_(q|k|v|out_0)")
    with untouched(unet.flax_params, adapter), pytest.raises(errors.KeyMismatchError, match=r"resnets_0/conv1/kernel.*wider regex"):
        pad_adapter(adapter, template)
    with pytest.raises(errors.KeyMismatchError, match="no kernel path matches"):
        hotswap_template(unet.flax_params, 8, targets=r"no_such_layer")


def test_non_lora_leaves_cannot_be_padded_or_stacked(unet, adapters):
    adapter = adapters["attn"]["unet"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=jlora.is_adapter_leaf)
    i = next(i for i, (_, l) in enumerate(flat) if l is not None)
    leaf = flat[i][1]
    leaves = [l for _, l in flat]
    leaves[i] = jlora.LohaLeaf(a1=leaf.a, b1=leaf.b, a2=leaf.a, b2=leaf.b, alpha=leaf.alpha)
    loha = jax.tree_util.tree_unflatten(treedef, leaves)
    name = "/".join(jlora.loading.path_of(flat[i][0]))
    template = hotswap_template(unet.flax_params, 8, targets=UNET_REGEX)
    with untouched(unet.flax_params, loha), pytest.raises(errors.InvalidAdapterError, match=f"{name} holds a LohaLeaf.*jlora.fuse"):
        pad_adapter(loha, template)
    with pytest.raises(errors.InvalidAdapterError, match="LohaLeaf"):
        stack_adapters([adapter, loha])


def test_per_sample_batch_mismatch_names_the_module_and_cfg(unet, adapters):
    ref = _unet_batch(unet, 4)
    stacked = stack_adapters([adapters["full"]["unet"]])
    fn = R.flax_apply_fn(ref)
    step = jax.jit(per_sample_apply(lambda p, inputs: fn(p, **inputs)))
    with pytest.raises(errors.ShapeMismatchError, match=r"(time_emb_proj|conv1)/kernel.*batch of 2 ids.*concatenate\(\[ids, ids\]\)"):
        step(stacked, jnp.array([0, 0]), 1.0, unet.flax_params, ref.inputs)
    with pytest.raises(errors.ShapeMismatchError, match=r"must be in \[0, 1\)"):
        with per_sample(stacked, jnp.array([0, 1, 0, 0]), 1.0):
            pass


def test_per_sample_with_concrete_ids_under_jit_is_an_error(unet, adapters):
    stacked = stack_adapters([adapters["full"]["unet"]])
    fn = R.flax_apply_fn(unet)
    ids = jnp.array([0, NO_LORA])  # made outside the jitted function: it would be baked in

    def baked(p, inputs):
        with per_sample(stacked, ids, 1.0):
            return fn(p, **inputs)

    with pytest.raises(errors.InvalidAdapterError, match="concrete.*per_sample_apply"):
        jax.jit(baked)(unet.flax_params, unet.inputs)


def test_per_sample_on_scanned_layers_needs_the_lora_collection(flux_params):
    """Scanned modules get their layer's LoRA from the `lora` collection; without it the error says how."""
    params = flux_params
    path = ("double_blocks", "img_attn", "qkv")
    stacked = stack_adapters([_stacked_lora(params, path, 2, 0), _stacked_lora(params, path, 3, 1)])
    args = (jnp.ones((2, 4, 16)), jnp.ones((2, 3, 32)), jnp.ones((2, 32)), jnp.ones(2), jnp.zeros((4, 3)), jnp.zeros((3, 3)))
    apply_fn = flux.make_apply(FLUX)

    def without_collection(stacked, ids, p, *a):
        with per_sample(stacked, ids, 1.0):
            return apply_fn(p, *a)

    with pytest.raises(UnsupportedModuleError, match="double_blocks/img_attn/qkv/kernel.*nn.scan.*per_sample_variables"):
        jax.jit(without_collection)(stacked, jnp.array([0, 1]), params, *args)
    assert issubclass(UnsupportedModuleError, errors.JloraError)
    out = jax.jit(per_sample_apply(apply_fn))(stacked, jnp.array([0, 1]), 1.0, params, *args)  # with it: runs
    assert out.shape == (2, 4, 16)


def test_per_sample_rejects_other_modules_and_unvisited_leaves(clip, adapters):
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(6, name="proj")(x) + nn.Dense(6, name="head")(x)

    params = Model().init(jax.random.key(0), jnp.ones((2, 4)))["params"]
    adapter = jax.tree_util.tree_map_with_path(
        lambda kp, w: jlora.LoraLeaf(jnp.ones((4, 2)), jnp.ones((2, 6)), jnp.float32(2)) if jlora.loading.path_of(kp) == ("proj", "kernel") else None,
        params,
    )
    with pytest.raises(UnsupportedModuleError, match="proj/kernel belongs to a DenseGeneral"):
        jax.jit(per_sample_apply(Model().apply))(stack_adapters([adapter]), jnp.array([0, 0]), 1.0, {"params": params}, jnp.ones((2, 4)))
    unet_stacked = stack_adapters([adapters["attn"]["unet"]])  # paths the CLIP model does not have
    with pytest.raises(errors.KeyMismatchError, match="never called"):
        jax.jit(per_sample_apply(R.flax_apply_fn(clip)))(unet_stacked, jnp.array([0, 0]), 1.0, clip.flax_params, clip.inputs["input_ids"])


def test_dense_sources_restore_every_host_view():
    """The host views hotswap_lora sends in the file's layout come back exactly after the device transpose."""
    from jlora.hotswap import _dense_source, _restored

    base = np.arange(2 * 3 * 4 * 5, dtype=np.float16).reshape(2, 3, 4, 5)
    views = [base, base.T, base.transpose(2, 3, 1, 0), base[:, 1:].transpose(1, 0, 2, 3), base[..., ::-1],
             base[:1].transpose(3, 0, 2, 1), base.reshape(6, 20).T, base.reshape(6, 20)[:, ::2].T, np.float32(3.0)]
    for x in views:
        dense, perm = _dense_source(x)
        assert perm is None or dense.flags.c_contiguous
        np.testing.assert_array_equal(np.asarray(_restored(jnp.asarray(dense), perm)), np.asarray(x))
    assert _dense_source(base.T)[1] is not None and _dense_source(base)[1] is None


def test_hotswap_lora_keeps_a_sharded_templates_placement(unet, files, adapters):
    """A template sharded next to its kernels (jlora.shard_adapter): the swapped factors keep its shardings and
    buffers, and equal the host padding of the same file."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    spec = lambda x: P(*(None,) * (x.ndim - 1), "model") if x.ndim and x.shape[-1] % 8 == 0 else P()
    params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), unet.flax_params)
    current = jlora.shard_adapter(hotswap_template(params, TEMPLATE_RANK, targets=UNET_REGEX), params)
    current = jax.tree.map(jnp.copy, current)
    shardings = lambda tree: [x.sharding for x in jax.tree.leaves(tree)]
    before, pointers = shardings(current), [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in jax.tree.leaves(current)]
    assert any(not s.is_fully_replicated for s in before)
    want = pad_adapter(adapters["full"]["unet"], hotswap_template(unet.flax_params, TEMPLATE_RANK, targets=UNET_REGEX))
    current = jlora.hotswap_lora(files["full"], params, current, "unet")
    assert shardings(current) == before
    assert [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in jax.tree.leaves(current)] == pointers
    for got, ref in zip(jax.tree.leaves(current), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
