"""T5 text encoder in Flax linen: the forward of transformers' torch `T5EncoderModel`.

Flux (and other diffusion pipelines) encode prompts with the encoder half of T5
(T5-XXL v1.1, `feed_forward_proj="gated-gelu"`). The math follows the torch model:
T5 RMS norms computed in float32, no `1/sqrt(d_kv)` attention scaling, a bidirectional
relative position bias owned by block 0 and shared by every block, the padding mask
added to the scores as `finfo.min`, softmax in float32 and no biases in the Dense layers.

The params tree has the names of transformers' Flax T5 (`FlaxT5EncoderModel`): the torch
state-dict keys with `.` as `/` and `weight` renamed to `kernel` for Dense layers (kernels
are the torch weights transposed, `(in, out)`) and to `embedding` for embeddings; the T5
layer norms keep `weight`. torch's `encoder.embed_tokens.weight` is `shared.weight`.
`I = num_heads * d_kv`; `i` runs over the blocks:

=======================================================================  ==========================
jlora path                                                               shape
=======================================================================  ==========================
shared/embedding                                                         (vocab_size, d_model)
encoder/block/i/layer/0/layer_norm/weight                                (d_model,)
encoder/block/i/layer/0/SelfAttention/{q,k,v}/kernel                     (d_model, I)
encoder/block/i/layer/0/SelfAttention/o/kernel                           (I, d_model)
encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding  (num_buckets, num_heads)
encoder/block/i/layer/1/layer_norm/weight                                (d_model,)
encoder/block/i/layer/1/DenseReluDense/wi/kernel                         (d_model, d_ff), not gated
encoder/block/i/layer/1/DenseReluDense/{wi_0,wi_1}/kernel                (d_model, d_ff), gated
encoder/block/i/layer/1/DenseReluDense/wo/kernel                         (d_ff, d_model)
encoder/final_layer_norm/weight                                          (d_model,)
=======================================================================  ==========================

>>> cfg = t5.T5Config.of(json.load(open("text_encoder_2/config.json")))
>>> hidden = jax.jit(t5.make_apply(cfg, jnp.bfloat16))(params, input_ids, attention_mask)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import UnsupportedModelError

_ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder fields of transformers' `T5Config`, with its defaults.

    `dense_act_fn` and `is_gated_act` default to what transformers derives from
    `feed_forward_proj` (`"gated-gelu"` means the tanh-approximated `gelu_new`, gated).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    is_gated_act: bool | None = None

    def __post_init__(self):
        act, gated = _parse_feed_forward_proj(self.feed_forward_proj)
        if self.dense_act_fn is None:
            object.__setattr__(self, "dense_act_fn", act)
        if self.is_gated_act is None:
            object.__setattr__(self, "is_gated_act", gated)
        object.__setattr__(self, "is_gated_act", bool(self.is_gated_act))
        if self.dense_act_fn not in _ACTIVATIONS:
            key = "dense_act_fn" if self.dense_act_fn != act else "feed_forward_proj"
            raise UnsupportedModelError(
                f"T5 config {key}={getattr(self, key)!r} asks for the activation {self.dense_act_fn!r}; "
                f"supported: {sorted(_ACTIVATIONS)} (feed_forward_proj 'ACT' or 'gated-ACT', e.g. 'gated-gelu')."
            )
        if self.relative_attention_num_buckets < 4:
            raise UnsupportedModelError(
                f"T5 config relative_attention_num_buckets={self.relative_attention_num_buckets}; "
                "supported: 4 or more (half per direction, half of those exact)."
            )

    @classmethod
    def of(cls, config: T5Config | Mapping[str, Any] | Any) -> T5Config:
        """A `T5Config` from itself, a transformers `config.json` dict or a transformers `T5Config`.

        Keys that do not affect the encoder (decoder, dropout, token ids, ...) are ignored.
        """
        if isinstance(config, T5Config):
            return config
        if not isinstance(config, Mapping) and hasattr(config, "to_dict"):
            config = config.to_dict()
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads, `num_heads * d_kv`."""
        return self.num_heads * self.d_kv


def _parse_feed_forward_proj(value: str) -> tuple[str, bool]:
    """`(dense_act_fn, is_gated_act)` as transformers derives them from `feed_forward_proj`."""
    parts = str(value).split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise UnsupportedModelError(
            f"T5 config feed_forward_proj={value!r} is not 'ACT' or 'gated-ACT'; supported ACT: "
            f"{sorted(_ACTIVATIONS)}, e.g. 'relu' (T5 v1.0) or 'gated-gelu' (T5 v1.1, Flux's T5-XXL)."
        )
    if value == "gated-gelu":
        return "gelu_new", True
    return parts[-1], parts[0] == "gated"


# ---------------------------------------------------------------------------- math


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 relative-position buckets `(query_length, key_length)` (int32).

    Half the buckets are for keys after the query; in each half, distances below a quarter
    of `num_buckets` get their own bucket and larger ones share log-spaced buckets up to
    `max_distance`. Computed on the host in float32 as torch computes it, so that the
    bucket edges (distances 16, 32, 64 for T5's 32/128) fall where torch puts them.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(exact)
    scaled = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    buckets = (relative > 0) * half + np.where(distance < exact, distance, large)
    return buckets.astype(np.int32)


def rms_norm(x, weight, eps: float, dtype):
    """T5 layer norm: `x * rsqrt(mean(x^2) + eps) * weight`, statistics in float32, result in `dtype`."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * y.astype(dtype)


def padding_bias(attention_mask, dtype):
    """`(B, L)` mask of 1 (token) / 0 (padding) as the additive score bias `(B, 1, 1, L)`: 0 or `finfo.min`."""
    mask = attention_mask[:, None, None, :].astype(dtype)
    return (1.0 - mask) * jnp.finfo(dtype).min


def clamp_float16(x):
    """In float16, `x` clipped to the finite range (less 1000 when it has an inf), as torch T5 does; else `x`."""
    if x.dtype != jnp.float16:
        return x
    top = jnp.finfo(jnp.float16).max
    limit = jnp.where(jnp.isinf(x).any(), top - 1000, top).astype(x.dtype)
    return jnp.clip(x, min=-limit, max=limit)


def attention(q, k, v, bias):
    """Unscaled softmax attention of `(B, L, H, d)` heads with additive `bias` `(B|1, H, L, L)`; `(B, L, H * d)`."""
    b, length, h, d = q.shape
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias.astype(q.dtype)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, h * d)


# ---------------------------------------------------------------------------- modules


def _normal(std: float):
    return jax.nn.initializers.normal(std)


class _LayerNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        return rms_norm(x, weight, self.eps, self.dtype)


class _Attention(nn.Module):
    config: T5Config
    dtype: Any
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x, mask_bias, position_bias):
        cfg = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
        q = dense(cfg.inner_dim, kernel_init=_normal((cfg.d_model * cfg.d_kv) ** -0.5), name="q")(x)
        k = dense(cfg.inner_dim, kernel_init=_normal(cfg.d_model**-0.5), name="k")(x)
        v = dense(cfg.inner_dim, kernel_init=_normal(cfg.d_model**-0.5), name="v")(x)
        if position_bias is None:
            position_bias = self._position_bias(x.shape[1])
            if mask_bias is not None:
                position_bias = position_bias + mask_bias
        heads = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)
        out = attention(heads(q), heads(k), heads(v), position_bias)
        out = dense(cfg.d_model, kernel_init=_normal(cfg.inner_dim**-0.5), name="o")(out)
        return out, position_bias

    def _position_bias(self, length):
        cfg = self.config
        if not self.has_relative_attention_bias:
            return jnp.zeros((1, cfg.num_heads, length, length), self.dtype)
        buckets = relative_position_buckets(
            length, length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        table = nn.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            embedding_init=_normal(cfg.d_model**-0.5),
            dtype=self.dtype,
            name="relative_attention_bias",
        )
        return table(jnp.asarray(buckets)).transpose(2, 0, 1)[None]


class _SelfAttentionLayer(nn.Module):
    config: T5Config
    dtype: Any
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x, mask_bias, position_bias):
        normed = _LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        attention_module = _Attention(self.config, self.dtype, self.has_relative_attention_bias, name="SelfAttention")
        out, position_bias = attention_module(normed, mask_bias, position_bias)
        return clamp_float16(x + out), position_bias


class _DenseReluDense(nn.Module):
    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
        wi_init, wo_init = _normal(cfg.d_model**-0.5), _normal(cfg.d_ff**-0.5)
        act = _ACTIVATIONS[cfg.dense_act_fn]
        if cfg.is_gated_act:
            gate = act(dense(cfg.d_ff, kernel_init=wi_init, name="wi_0")(x))
            h = gate * dense(cfg.d_ff, kernel_init=wi_init, name="wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, kernel_init=wi_init, name="wi")(x))
        return dense(cfg.d_model, kernel_init=wo_init, name="wo")(h)


class _FeedForwardLayer(nn.Module):
    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x):
        normed = _LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="layer_norm")(x)
        return clamp_float16(x + _DenseReluDense(self.config, self.dtype, name="DenseReluDense")(normed))


class _BlockLayers(nn.Module):
    """torch `T5Block.layer`: `0` self-attention, `1` feed-forward."""

    config: T5Config
    dtype: Any
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x, mask_bias, position_bias):
        x, position_bias = _SelfAttentionLayer(self.config, self.dtype, self.has_relative_attention_bias, name="0")(
            x, mask_bias, position_bias
        )
        return _FeedForwardLayer(self.config, self.dtype, name="1")(x), position_bias


class _Block(nn.Module):
    """torch `T5Block`."""

    config: T5Config
    dtype: Any
    has_relative_attention_bias: bool

    @nn.compact
    def __call__(self, x, mask_bias, position_bias):
        layers = _BlockLayers(self.config, self.dtype, self.has_relative_attention_bias, name="layer")
        return layers(x, mask_bias, position_bias)


class _Blocks(nn.Module):
    """torch `T5Stack.block`: blocks `0 .. num_layers - 1`; block 0 owns the relative position bias."""

    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x, mask_bias):
        position_bias = None
        for i in range(self.config.num_layers):
            x, position_bias = _Block(self.config, self.dtype, i == 0, name=str(i))(x, mask_bias, position_bias)
        return x


class _Stack(nn.Module):
    """torch `T5Stack` (encoder): the blocks and the final layer norm."""

    config: T5Config
    dtype: Any

    @nn.compact
    def __call__(self, x, mask_bias):
        x = _Blocks(self.config, self.dtype, name="block")(x, mask_bias)
        return _LayerNorm(self.config.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)


class T5Encoder(nn.Module):
    """transformers' `T5EncoderModel` forward; `__call__` returns `last_hidden_state` `(B, L, d_model)`.

    `dtype` is the computation dtype; params may be stored in any float dtype.
    """

    config: T5Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """`last_hidden_state` for `input_ids` `(B, L)`; `attention_mask` `(B, L)` is 1 for tokens, 0 for padding."""
        cfg = self.config
        shared = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(1.0), dtype=self.dtype, name="shared")
        mask_bias = None if attention_mask is None else padding_bias(attention_mask, self.dtype)
        return _Stack(cfg, self.dtype, name="encoder")(shared(input_ids), mask_bias)


# ---------------------------------------------------------------------------- entry points


def _call(model: T5Encoder, params, input_ids, attention_mask=None):
    variables = params if "params" in params else {"params": params}
    return model.apply(variables, input_ids, attention_mask)


def make_apply(config: T5Config | Mapping[str, Any], dtype=jnp.float32) -> Callable:
    """The pure, jittable forward `apply_fn(params, input_ids, attention_mask=None) -> last_hidden_state`.

    `dtype` is the computation dtype. `params` is the tree of `param_shapes` (or `{"params": ...}`).

    >>> prompt_embeds = jax.jit(t5.make_apply(cfg, jnp.bfloat16))(params, input_ids)
    """
    return functools.partial(_call, T5Encoder(T5Config.of(config), dtype))


def _plain(tree):
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def init_params(config: T5Config | Mapping[str, Any], key, dtype=jnp.float32) -> dict:
    """Random params in `dtype` (normal, with the standard deviations of torch T5's init; unit norm weights)."""
    cfg = T5Config.of(config)
    ids = jnp.zeros((1, 1), jnp.int32)

    def init(key):
        params = T5Encoder(cfg).init(key, ids)["params"]
        return jax.tree.map(lambda p: p.astype(dtype), _plain(params))

    return jax.jit(init)(key)


def param_shapes(config: T5Config | Mapping[str, Any], dtype=jnp.float32) -> dict:
    """The params tree as nested dicts of `jax.ShapeDtypeStruct` leaves, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, T5Config.of(config), dtype=dtype), jax.random.key(0))
