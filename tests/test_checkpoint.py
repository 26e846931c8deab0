"""Base weights from `save_pretrained` folders (safetensors, no torch on jlora's side) onto devices.

References: diffusers' and transformers' own torch -> Flax converters (tests/reference.py) on the
same weights, and the torch models' forwards where no converter exists (Flux-style VAE, Flux).
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh

import reference as R
from jlora import errors
from jlora.models import checkpoint as C


def _flat_np(tree):
    return {k: np.asarray(v) for k, v in flatten_dict(tree).items()}


def _assert_trees_equal(got, want, atol=0.0):
    a, b = _flat_np(got), _flat_np(want)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].shape == b[k].shape, k
        np.testing.assert_allclose(a[k].astype(np.float32), b[k].astype(np.float32), atol=atol, rtol=0, err_msg=str(k))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny SD-1.5 UNet, SDXL UNet, CLIP and CLIP-with-projection saved by diffusers/transformers."""
    root = tmp_path_factory.mktemp("ckpt")
    refs = {"unet": R.build_sd15_unet(), "unet_xl": R.build_sdxl_unet(), "text_encoder": R.build_clip_text(),
            "text_encoder_2": R.build_clip_text_proj()}
    for name, ref in refs.items():
        ref.torch_model.save_pretrained(root / name)
    return root, refs


@pytest.mark.parametrize("name", ["unet", "unet_xl", "text_encoder", "text_encoder_2"])
def test_equals_the_libraries_own_conversion(saved, name):
    root, refs = saved
    model, params = C.load_component(root, name)
    _assert_trees_equal(params, refs[name].flax_params)
    out = R.flax_forward(refs[name], params)
    np.testing.assert_array_equal(out, R.flax_forward(refs[name], refs[name].flax_params))
    assert type(model).__name__ == type(refs[name].flax_module).__name__


def test_index_json_shards_and_bf16(saved, tmp_path):
    root, refs = saved
    ref = refs["unet_xl"]
    copy.deepcopy(ref.torch_model).to(torch.bfloat16).save_pretrained(tmp_path / "unet", max_shard_size="200KB")
    files = os.listdir(tmp_path / "unet")
    assert "diffusion_pytorch_model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _, params = C.load_component(tmp_path, "unet", dtype=jnp.bfloat16)
    want = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), ref.flax_params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    _assert_trees_equal(params, want)
    _, kept = C.load_component(tmp_path / "unet")  # dtype=None keeps the stored dtype
    assert {x.dtype for x in jax.tree.leaves(kept)} == {jnp.dtype(jnp.bfloat16)}


def test_fsdp_sharded_load_reads_each_block_once_and_matches(saved):
    root, refs = saved
    ref = refs["unet"]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    spec = C.component_spec(root, "unet")
    shardings = C.fsdp_shardings(spec.shapes, mesh, "model", min_size=64)
    stats = {}
    _, params = C.load_component(root, "unet", shardings=shardings, stats=stats)
    split = [x for x in jax.tree.leaves(params) if x.sharding.spec != jax.sharding.PartitionSpec(*[None] * x.ndim)]
    assert len(split) > 50
    assert all(x.sharding == s for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)))
    _assert_trees_equal(params, ref.flax_params)
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(ref.flax_params))
    assert stats["bytes_read"] == total  # 8 devices, 4 distinct blocks per split weight: each read once
    out = R.flax_forward(ref, params)
    np.testing.assert_allclose(out, R.flax_forward(ref, ref.flax_params), atol=1e-5)


def _tiny_vae(**kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                        sample_size=32, **kw).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


@pytest.mark.parametrize("flux_style", [False, True], ids=["sd", "flux-no-quant-conv"])
def test_vae_decode_and_encode_match_torch(tmp_path, flux_style):
    kw = dict(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5035, shift_factor=0.0609) if flux_style else {}
    vae = _tiny_vae(**kw)
    vae.save_pretrained(tmp_path / "vae")
    model, params = C.load_component(tmp_path / "vae")
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want_img = vae.decode(torch.from_numpy(z)).sample.numpy()
        want_mean = vae.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    got_img = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode).sample)(params, z)
    got_post = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode).latent_dist.mean)(params, x)
    assert np.abs(want_img).max() > 0.1
    np.testing.assert_allclose(np.asarray(got_img), want_img, atol=2e-4)
    np.testing.assert_allclose(np.asarray(got_post).transpose(0, 3, 1, 2), want_mean, atol=2e-4)
    if not flux_style:
        from diffusers import FlaxAutoencoderKL
        from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

        flax_vae = FlaxAutoencoderKL(**{k: v for k, v in vae.config.items() if k in ("block_out_channels", "down_block_types", "up_block_types", "latent_channels", "sample_size")})
        sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        _assert_trees_equal(params, convert_pytorch_state_dict_to_flax(sd, flax_vae))


def test_flux_transformer_matches_torch(tmp_path):
    import test_flux_model as F

    torch_model = F._build(True)
    torch_model.save_pretrained(tmp_path / "transformer")
    model, params = C.load_component(tmp_path, "transformer")
    inputs = F._inputs(True)
    want = F._torch_forward(torch_model, inputs)
    np_inputs = {k: (v.numpy() if v is not None else None) for k, v in inputs.items()}
    got = jax.jit(lambda p, kw: model.apply({"params": p}, **kw))(params, np_inputs)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_t5_encoder_matches_torch(tmp_path, dtype):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                    feed_forward_proj="gated-gelu")).eval()
    model.save_pretrained(tmp_path / "text_encoder_2")
    flax_model, params = C.load_component(tmp_path, "text_encoder_2", dtype=dtype)
    ids = np.random.default_rng(0).integers(0, 64, (2, 12))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    got = np.asarray(jax.jit(lambda p, x: flax_model.apply({"params": p}, x))(params, ids), np.float32)
    tol = 1e-5 if dtype is None else 5e-2
    np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)


def test_errors_are_typed(saved, tmp_path):
    root, _ = saved
    with pytest.raises(errors.ModelFileNotFoundError, match="no config.json"):
        C.load_component(tmp_path)
    with pytest.raises(errors.ModelFileNotFoundError, match="no such model folder"):
        C.load_component(tmp_path / "nope", "unet")
    (tmp_path / "unet").mkdir()
    config = json.loads((root / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.ModelFileNotFoundError, match="no .safetensors weights"):
        C.load_component(tmp_path, "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(config, resnet_time_scale_shift="scale_shift")))
    with pytest.raises(errors.UnsupportedModelError, match="resnet_time_scale_shift"):
        C.load_component(tmp_path, "unet")
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(config, _class_name="UNet3DConditionModel")))
    with pytest.raises(errors.UnsupportedModelError, match="UNet3DConditionModel"):
        C.load_component(tmp_path, "unet")
    # weights of another size: the key and both shapes are named
    (tmp_path / "unet" / "config.json").write_text(json.dumps(dict(config, cross_attention_dim=48)))
    os.symlink(root / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(errors.ShapeMismatchError, match=r"attn2\.to_k\.weight.*\(32, 32\).*\(48, 32\)|attn2\.to_k\.weight"):
        C.load_component(tmp_path, "unet")
