"""jlora.models.flux against diffusers' torch FluxTransformer2DModel on a tiny config (fp32, CPU)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora.errors import KeyMismatchError, ShapeMismatchError
from jlora.models import flux

CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)
D, M, HD = 32, 128, 16
B, H, W, S_TXT = 2, 4, 4, 8


def _build(guidance_embeds: bool) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG, guidance_embeds=guidance_embeds).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ".norm_" in name:  # RMSNorm weights of q/k
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:  # every linear, including the zero-initialised AdaLN ones
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["no-guidance", "guidance"])
def model(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def guided():
    return _build(True)


def _grid_ids(offset=0, frame=0):
    """`_prepare_latent_image_ids` of FluxPipeline: (frame, row, col) per latent token, row-major."""
    ids = np.zeros((H, W, 3), np.float32)
    ids[..., 0] = frame
    ids[..., 1] = offset + np.arange(H)[:, None]
    ids[..., 2] = offset + np.arange(W)[None, :]
    return ids.reshape(H * W, 3)


def _inputs(guidance_embeds, ids="grid", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = dict(
        hidden_states=torch.randn(B, H * W, CONFIG["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(B, S_TXT, CONFIG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(B, CONFIG["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.25, 0.9]),
        img_ids=torch.from_numpy(_grid_ids()),
        txt_ids=torch.zeros(S_TXT, 3),
        guidance=torch.tensor([3.5, 1.5]) if guidance_embeds else None,
    )
    if ids == "offset":  # Kontext-like: another frame index, far positions, non-zero text ids
        x["img_ids"] = torch.from_numpy(_grid_ids(offset=40, frame=1))
        x["txt_ids"] = torch.randint(0, 9, (S_TXT, 3), generator=g).float()
    return x


def _torch_forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample.numpy()


def _jax_args(inputs):
    return {k: None if v is None else v.numpy() for k, v in inputs.items()}


@pytest.mark.parametrize("ids", ["grid", "offset"])
def test_forward_matches_diffusers(model, ids):
    guidance = model.config.guidance_embeds
    inputs = _inputs(guidance, ids)
    ref = _torch_forward(model, inputs)
    apply_fn, params = flux.from_diffusers(model.state_dict(), model.config)
    out = np.asarray(jax.jit(apply_fn)(params, **_jax_args(inputs)))
    assert out.shape == ref.shape == (B, H * W, CONFIG["in_channels"])
    tol = 1e-4 * np.abs(ref).max()
    assert np.abs(ref).max() > 0.5
    assert np.abs(out - ref).max() <= tol, (np.abs(out - ref).max(), tol)

    # The conditioning paths move the output far beyond the tolerance, so a bug in them fails above.
    moved = {"timestep": inputs["timestep"] * 0.9, "txt_ids": inputs["txt_ids"] + 1}
    if guidance:
        moved["guidance"] = inputs["guidance"] + 0.5
    for name, value in moved.items():
        assert np.abs(_torch_forward(model, {**inputs, name: value}) - ref).max() > 100 * tol, name


def test_params_are_stacked_in_bfl_layout(guided):
    _, params = flux.from_diffusers(guided.state_dict(), guided.config)
    paths = {
        "/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    linear = lambda name, i, o, lead=(): {f"{name}/kernel": (*lead, i, o), f"{name}/bias": (*lead, o)}  # noqa: E731
    want = {
        **linear("img_in", 16, D),
        **linear("txt_in", 32, D),
        **linear("time_in/in_layer", 256, D),
        **linear("time_in/out_layer", D, D),
        **linear("guidance_in/in_layer", 256, D),
        **linear("guidance_in/out_layer", D, D),
        **linear("vector_in/in_layer", 32, D),
        **linear("vector_in/out_layer", D, D),
        **linear("final_layer/adaLN_modulation_1", D, 2 * D),
        **linear("final_layer/linear", D, 16),
        **linear("single_blocks/modulation/lin", D, 3 * D, (2,)),
        **linear("single_blocks/linear1", D, 3 * D + M, (2,)),
        **linear("single_blocks/linear2", D + M, D, (2,)),
        "single_blocks/norm/query_norm/scale": (2, HD),
        "single_blocks/norm/key_norm/scale": (2, HD),
    }
    for s in ("img", "txt"):
        want.update(linear(f"double_blocks/{s}_mod/lin", D, 6 * D, (2,)))
        want.update(linear(f"double_blocks/{s}_attn/qkv", D, 3 * D, (2,)))
        want.update(linear(f"double_blocks/{s}_attn/proj", D, D, (2,)))
        want.update(linear(f"double_blocks/{s}_mlp_0", D, M, (2,)))
        want.update(linear(f"double_blocks/{s}_mlp_2", M, D, (2,)))
        want[f"double_blocks/{s}_attn/norm/query_norm/scale"] = (2, HD)
        want[f"double_blocks/{s}_attn/norm/key_norm/scale"] = (2, HD)
    assert paths == want
    assert all(type(node) is dict for node in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, dict)))


def test_fused_columns_and_final_swap(guided):
    sd = {k: v.numpy() for k, v in guided.state_dict().items()}
    _, params = flux.from_diffusers(sd, guided.config)
    b = "single_transformer_blocks.1."
    linear1 = np.concatenate([sd[b + n + ".weight"].T for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")], 1)
    np.testing.assert_array_equal(params["single_blocks"]["linear1"]["kernel"][1], linear1)
    b = "transformer_blocks.0.attn."
    txt_qkv = np.concatenate([sd[b + n + ".bias"] for n in ("add_q_proj", "add_k_proj", "add_v_proj")])
    np.testing.assert_array_equal(params["double_blocks"]["txt_attn"]["qkv"]["bias"][0], txt_qkv)
    ada = params["final_layer"]["adaLN_modulation_1"]
    w, bias = sd["norm_out.linear.weight"], sd["norm_out.linear.bias"]  # diffusers rows: scale, then shift
    np.testing.assert_array_equal(ada["kernel"][:, :D], w[D:].T)  # BFL columns: shift, then scale
    np.testing.assert_array_equal(ada["kernel"][:, D:], w[:D].T)
    np.testing.assert_array_equal(ada["bias"], np.concatenate([bias[D:], bias[:D]]))


def test_round_trip_to_diffusers_is_exact(model):
    sd = model.state_dict()
    keys = list(sd)
    _, params = flux.from_diffusers(sd, model.config)
    assert list(sd) == keys  # caller's dict untouched
    back = flux.to_diffusers_state_dict(params, model.config)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert not missing and not unexpected


def test_param_shapes_and_init_params(model):
    _, params = flux.from_diffusers(model.state_dict(), model.config)
    shapes = flux.param_shapes(model.config)
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(lambda s, p: s.shape == p.shape and s.dtype == p.dtype, shapes, params)))
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(shapes))
    init = flux.init_params(model.config, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)
    stacked = init["double_blocks"]["img_attn"]["qkv"]["kernel"]
    assert not np.array_equal(stacked[0], stacked[1])  # each layer drawn separately
    args = _jax_args(_inputs(model.config.guidance_embeds))
    out = jax.jit(flux.make_apply(model.config))(init, **args)
    assert out.shape == (B, H * W, 16) and bool(jnp.isfinite(out).all())


def test_sharded_forward_matches_single_device(guided):
    apply_fn, params = flux.from_diffusers(guided.state_dict(), guided.config)
    args = _jax_args(_inputs(True))
    single = np.asarray(jax.jit(apply_fn)(params, **args))

    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    n = mesh.shape["model"]

    def spec(path, x):
        if path[-1].key == "kernel" and x.shape[-1] % n == 0:  # output axis
            return PartitionSpec(*([None] * (x.ndim - 1)), "model")
        return PartitionSpec()

    specs = jax.tree_util.tree_map_with_path(spec, params)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731
    n_sharded = sum(s != PartitionSpec() for s in jax.tree.leaves(specs, is_leaf=is_spec))
    assert n_sharded == 23  # every kernel (16 output features divide by 8 too)
    assert len(sharded["single_blocks"]["linear1"]["kernel"].sharding.device_set) == 8
    out = np.asarray(jax.jit(apply_fn)(sharded, **args))
    np.testing.assert_allclose(out, single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_numpy_state_dict_and_errors(guided):
    sd = {k: v.numpy() for k, v in guided.state_dict().items()}
    _, params = flux.from_diffusers(sd, guided.config)
    _, from_torch = flux.from_diffusers(guided.state_dict(), guided.config)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params, from_torch)))

    key = "single_transformer_blocks.1.attn.to_k.weight"
    with pytest.raises(KeyMismatchError, match="to_k.weight"):
        flux.from_diffusers({k: v for k, v in sd.items() if k != key}, guided.config)
    with pytest.raises(ShapeMismatchError, match=r"to_k.weight.*single_blocks/linear1/kernel"):
        flux.from_diffusers({**sd, key: sd[key][:, :-1]}, guided.config)
    extra = {**sd, "transformer_blocks.2.norm1.linear.weight": sd["transformer_blocks.0.norm1.linear.weight"]}
    with pytest.raises(KeyMismatchError, match="transformer_blocks.2"):
        flux.from_diffusers(extra, guided.config)
    flux.from_diffusers(extra, guided.config, strict=False)
    with pytest.raises(KeyMismatchError, match="guidance_embedder"):
        flux.from_diffusers(sd, {**guided.config, "guidance_embeds": False})

    apply_fn = flux.make_apply(guided.config)
    args = _jax_args(_inputs(True))
    with pytest.raises(flux.FluxInputError, match="guidance"):
        apply_fn(params, **{**args, "guidance": None})
    with pytest.raises(flux.FluxInputError, match="guidance"):
        flux.make_apply({**guided.config, "guidance_embeds": False})(params, **args)
    with pytest.raises(flux.FluxInputError, match="axes_dims_rope"):
        flux.FluxConfig.of({**CONFIG, "axes_dims_rope": (4, 6, 8)})
    with pytest.raises(flux.FluxInputError, match="num_blocks"):
        flux.FluxConfig.of({**CONFIG, "num_blocks": 3})


def test_import_needs_no_torch():
    code = "import sys, jlora.models.flux; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
