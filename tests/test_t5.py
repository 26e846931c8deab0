"""jlora.models.t5 against transformers' torch T5EncoderModel on tiny configs (fp32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from converters.errors import UnsupportedModelError
from jlora.models import t5

CONFIG = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=37,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
B, L = 2, 24  # L > max_distance: every bucket, including the clipped ones, is used
DENSE = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


def _torch_model(feed_forward_proj):
    torch.manual_seed(0)
    cfg = transformers.T5Config(**CONFIG, feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
    model = transformers.T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def _flax_path(key):
    """A torch state-dict key as a Flax path: Dense `weight` -> `kernel`, embedding `weight` -> `embedding`."""
    path = tuple(key.split("."))
    if path[-2] in DENSE:
        return path[:-1] + ("kernel",)
    if path[-2] in ("shared", "relative_attention_bias"):
        return path[:-1] + ("embedding",)
    return path


def _to_flax(state_dict):
    """torch state dict -> flat Flax tree, Dense weights transposed; the tied `encoder.embed_tokens` left out."""
    flat = {}
    for key, value in state_dict.items():
        if key != "encoder.embed_tokens.weight":
            array = value.detach().numpy()
            flat[_flax_path(key)] = array.T if key.split(".")[-2] in DENSE else array
    return flat


def _inputs():
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, CONFIG["vocab_size"], size=(B, L)).astype(np.int64)
    mask = np.ones((B, L), np.int64)
    mask[1, 15:] = 0
    return input_ids, mask


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_matches_torch(feed_forward_proj):
    model = _torch_model(feed_forward_proj)
    state_dict = model.state_dict()
    assert torch.equal(state_dict["encoder.embed_tokens.weight"], state_dict["shared.weight"])
    cfg = t5.T5Config.of(model.config.to_dict())
    assert cfg.is_gated_act == (feed_forward_proj == "gated-gelu")
    assert cfg.dense_act_fn == ("gelu_new" if cfg.is_gated_act else "relu")

    flat = _to_flax(state_dict)
    shapes = flatten_dict(t5.param_shapes(cfg))
    assert sorted(flat) == sorted(shapes)
    assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in shapes.items()}
    assert all(v.dtype == jnp.float32 for v in shapes.values())
    params = {}
    for path, value in flat.items():
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value)

    input_ids, mask = _inputs()
    apply = jax.jit(t5.make_apply(cfg))
    got = np.asarray(apply(params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32)))
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    want = want.numpy()
    assert got.shape == (B, L, CONFIG["d_model"])
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4, rtol=0)
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    module = t5.T5Encoder(cfg)
    unmasked = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(input_ids, jnp.int32)))
    with torch.no_grad():
        want_unmasked = model(input_ids=torch.from_numpy(input_ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(unmasked, want_unmasked, atol=1e-4, rtol=0)
    assert not np.allclose(unmasked[1], got[1], atol=1e-3)


def test_param_names_gated():
    cfg = t5.T5Config(**CONFIG, feed_forward_proj="gated-gelu")
    names = {"/".join(k) for k in flatten_dict(t5.param_shapes(cfg))}
    torch_cfg = transformers.T5Config(**CONFIG, feed_forward_proj="gated-gelu")
    torch_keys = set(transformers.T5EncoderModel(torch_cfg).state_dict()) - {"encoder.embed_tokens.weight"}
    renamed = {"/".join(_flax_path(key)) for key in torch_keys}
    assert names == renamed
    assert "encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding" in names
    assert not any("block/1/layer/0/SelfAttention/relative_attention_bias" in n for n in names)
    assert "encoder/block/1/layer/1/DenseReluDense/wi_1/kernel" in names


def test_relative_position_buckets_match_torch():
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 300
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for buckets, distance in [(32, 128), (8, 16)]:
        want = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
        np.testing.assert_array_equal(t5.relative_position_buckets(length, length, buckets, distance), want)


def test_init_params_and_dtypes():
    cfg = t5.T5Config(**CONFIG, feed_forward_proj="gated-gelu")
    params = t5.init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
    shapes = t5.param_shapes(cfg, dtype=jnp.bfloat16)
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == jax.tree.map(lambda s: (s.shape, s.dtype), shapes)
    input_ids, mask = _inputs()
    out = jax.jit(t5.make_apply(cfg, jnp.bfloat16))(params, jnp.asarray(input_ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16 and out.shape == (B, L, CONFIG["d_model"])
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_config_of_flux_t5_xxl():
    cfg = t5.T5Config.of({
        "architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "dense_act_fn": "gelu_new",
        "feed_forward_proj": "gated-gelu", "is_gated_act": True, "layer_norm_epsilon": 1e-06, "num_heads": 64,
        "num_layers": 24, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
        "vocab_size": 32128, "num_decoder_layers": 24, "dropout_rate": 0.1, "model_type": "t5",
    })
    assert cfg == t5.T5Config(d_ff=10240, d_model=4096, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
    assert (cfg.dense_act_fn, cfg.is_gated_act, cfg.inner_dim) == ("gelu_new", True, 4096)
    shapes = flatten_dict(t5.param_shapes(cfg, jnp.bfloat16))
    assert len(shapes) == 1 + 24 * 9 + 1 + 1
    assert shapes[("encoder", "block", "23", "layer", "1", "DenseReluDense", "wi_0", "kernel")].shape == (4096, 10240)


@pytest.mark.parametrize(
    "config, key",
    [
        (dict(feed_forward_proj="gated-foo"), "feed_forward_proj"),
        (dict(feed_forward_proj="swiglu-gelu"), "feed_forward_proj"),
        (dict(feed_forward_proj="gated-gelu-x"), "feed_forward_proj"),
        (dict(feed_forward_proj="relu", dense_act_fn="mish"), "dense_act_fn"),
    ],
)
def test_unsupported_config(config, key):
    with pytest.raises(UnsupportedModelError, match=key) as info:
        t5.T5Config.of({**CONFIG, **config})
    assert "gated-gelu" in str(info.value) and "relu" in str(info.value)


def test_config_of_transformers_config():
    torch_cfg = transformers.T5Config(**CONFIG, feed_forward_proj="gated-gelu")
    assert t5.T5Config.of(torch_cfg) == t5.T5Config(**CONFIG, feed_forward_proj="gated-gelu")
    assert t5.T5Config.of(t5.T5Config.of(torch_cfg)) == t5.T5Config.of(torch_cfg.to_dict())


def test_clamp_float16():
    """The clamp torch T5 applies in float16 (its value rounds to 64512 in float16)."""
    values = [1.0, -float("inf"), float("inf"), 65000.0]
    h = torch.tensor(values, dtype=torch.float16)
    limit = torch.where(torch.isinf(h).any(), torch.finfo(h.dtype).max - 1000, torch.finfo(h.dtype).max)
    want = torch.clamp(h, min=-limit, max=limit).float().numpy()
    got = t5.clamp_float16(jnp.array(values, jnp.float16))
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
    y = jnp.array([1.0, jnp.inf], jnp.float32)
    assert t5.clamp_float16(y) is y
