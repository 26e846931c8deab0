"""Flux transformer in Flax linen, in the original (BFL) param layout, stacked per block kind.

The forward matches diffusers' `FluxTransformer2DModel` (same arguments, same math);
the params use the names of the original Flux checkpoints, with fused projections,
and every block param carries a leading layer axis so the blocks run under `scan`.
`D = num_attention_heads * attention_head_dim`, `M = 4 * D`, `L2 = num_layers`,
`L1 = num_single_layers`. Kernels are `(in, out)`, stacked ones `(L, in, out)`;
biases `(out,)` / `(L, out)`; norm scales `(head_dim,)` / `(L, head_dim)`.

=========================================  ================================================================
jlora path                                 diffusers module (per block `i` where stacked)
=========================================  ================================================================
img_in                                     x_embedder
txt_in                                     context_embedder
time_in/in_layer, time_in/out_layer        time_text_embed.timestep_embedder.linear_1 / linear_2
vector_in/in_layer, vector_in/out_layer    time_text_embed.text_embedder.linear_1 / linear_2
guidance_in/in_layer, .../out_layer        time_text_embed.guidance_embedder.linear_1 / linear_2 (guidance_embeds)
double_blocks/img_mod/lin                  transformer_blocks.i.norm1.linear                  (L2, D, 6D)
double_blocks/txt_mod/lin                  transformer_blocks.i.norm1_context.linear          (L2, D, 6D)
double_blocks/img_attn/qkv                 attn.to_q | to_k | to_v (output columns)           (L2, D, 3D)
double_blocks/img_attn/norm/query_norm     attn.norm_q                                        (L2, head_dim)
double_blocks/img_attn/norm/key_norm       attn.norm_k
double_blocks/img_attn/proj                attn.to_out.0
double_blocks/txt_attn/qkv                 attn.add_q_proj | add_k_proj | add_v_proj          (L2, D, 3D)
double_blocks/txt_attn/norm/query_norm     attn.norm_added_q
double_blocks/txt_attn/norm/key_norm       attn.norm_added_k
double_blocks/txt_attn/proj                attn.to_add_out
double_blocks/img_mlp_0, img_mlp_2         ff.net.0.proj, ff.net.2
double_blocks/txt_mlp_0, txt_mlp_2         ff_context.net.0.proj, ff_context.net.2
single_blocks/modulation/lin               single_transformer_blocks.i.norm.linear            (L1, D, 3D)
single_blocks/linear1                      attn.to_q | to_k | to_v | proj_mlp                 (L1, D, 3D + M)
single_blocks/linear2                      proj_out                                           (L1, D + M, D)
single_blocks/norm/query_norm, key_norm    attn.norm_q, attn.norm_k                           (L1, head_dim)
final_layer/adaLN_modulation_1             norm_out.linear, output halves swapped: (shift, scale)
final_layer/linear                         proj_out
=========================================  ================================================================

>>> apply_fn, params = flux.from_diffusers(torch_model.state_dict(), torch_model.config)
>>> sample = jax.jit(apply_fn)(params, latents, t5_embeds, clip_pooled, t, img_ids, txt_ids, guidance)
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

from jlora.errors import JloraError

PyTree = Any

_ROPE_THETA = 10000.0
_TIME_CHANNELS = 256


class FluxInputError(JloraError, ValueError):
    """A Flux config or forward argument is inconsistent (guidance, RoPE axes, unknown config key)."""


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """The fields of diffusers' `FluxTransformer2DModel` config, with its defaults."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        axes = tuple(int(d) for d in self.axes_dims_rope)
        object.__setattr__(self, "axes_dims_rope", axes)
        if sum(axes) != self.attention_head_dim or any(d % 2 for d in axes):
            raise FluxInputError(
                f"axes_dims_rope {axes} must be even and sum to attention_head_dim ({self.attention_head_dim})."
            )

    @classmethod
    def of(cls, config: FluxConfig | Mapping[str, Any]) -> FluxConfig:
        """A `FluxConfig` from itself or a diffusers config dict (`_`-prefixed entries ignored)."""
        if isinstance(config, FluxConfig):
            return config
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in fields)
        if unknown:
            raise FluxInputError(
                f"config keys {unknown} are not FluxTransformer2DModel fields; known: {sorted(fields)}."
            )
        return cls(**{k: v for k, v in config.items() if k in fields})

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * 4.0)

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)


# ---------------------------------------------------------------------------- math


def _layer_norm(x, eps=1e-6):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x, shift, scale):
    return _layer_norm(x) * (1 + scale) + shift


def _timestep_embedding(t):
    """diffusers `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos, sin]."""
    half = _TIME_CHANNELS // 2
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _rope(ids, axes_dims):
    """cos and sin `(S, head_dim // 2)` of the angles `pos_axis * theta ** (-2j / dim_axis)`, axes concatenated."""
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise FluxInputError(
            f"position ids must be (S, {len(axes_dims)}), one column per axes_dims_rope entry; got {ids.shape}."
        )
    pos = ids.astype(jnp.float32)
    freqs = [1.0 / _ROPE_THETA ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dims]
    angles = jnp.concatenate(
        [pos[:, i, None] * jnp.asarray(f, jnp.float32)[None] for i, f in enumerate(freqs)], axis=-1
    )
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x, pe):
    """Rotate each interleaved pair `(x[2j], x[2j+1])` of `x` `(B, S, H, hd)` by the angle of slot `j`."""
    cos, sin = (p[None, :, None, :] for p in pe)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([re * cos - im * sin, im * cos + re * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _attention(q, k, v):
    """Softmax attention over `(B, S, H, hd)` with scale `hd ** -0.5`; returns `(B, S, H * hd)`."""
    b, s, h, hd = q.shape
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd**-0.5)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, h * hd)


def _heads(x, n, heads):
    """Split the last axis of `x` into `n` chunks of `heads` heads: `n` arrays `(B, S, H, hd)`."""
    x = x.reshape(*x.shape[:-1], n, heads, -1)
    return [x[..., i, :, :] for i in range(n)]


# ---------------------------------------------------------------------------- modules


class _RMSNorm(nn.Module):
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


class _QKNorm(nn.Module):
    def setup(self):
        self.query_norm = _RMSNorm()
        self.key_norm = _RMSNorm()

    def __call__(self, q, k):
        return self.query_norm(q), self.key_norm(k)


class _Modulation(nn.Module):
    chunks: int
    dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, vec):
        out = nn.Dense(self.chunks * self.dim, dtype=self.dtype, name="lin")(nn.silu(vec))
        return jnp.split(out[:, None, :], self.chunks, axis=-1)


class _StreamAttention(nn.Module):
    """One stream of a double block: fused `qkv`, q/k RMSNorm, output `proj`."""

    heads: int
    dim: int
    dtype: Any = None

    def setup(self):
        self.qkv = nn.Dense(3 * self.dim, dtype=self.dtype)
        self.norm = _QKNorm()
        self.proj = nn.Dense(self.dim, dtype=self.dtype)

    def qkv_heads(self, x):
        q, k, v = _heads(self.qkv(x), 3, self.heads)
        q, k = self.norm(q, k)
        return q, k, v


class _MLPEmbedder(nn.Module):
    dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, name="in_layer")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="out_layer")(nn.silu(x))


class _DoubleBlock(nn.Module):
    cfg: FluxConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, carry, vec, pe):
        img, txt = carry
        cfg, dense = self.cfg, functools.partial(nn.Dense, dtype=self.dtype)
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = _Modulation(6, cfg.dim, self.dtype, name="img_mod")(vec)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = _Modulation(6, cfg.dim, self.dtype, name="txt_mod")(vec)
        img_attn = _StreamAttention(cfg.num_attention_heads, cfg.dim, self.dtype, name="img_attn")
        txt_attn = _StreamAttention(cfg.num_attention_heads, cfg.dim, self.dtype, name="txt_attn")
        iq, ik, iv = img_attn.qkv_heads(_modulate(img, i_shift, i_scale))
        tq, tk, tv = txt_attn.qkv_heads(_modulate(txt, t_shift, t_scale))
        q = _apply_rope(jnp.concatenate([tq, iq], axis=1), pe)
        k = _apply_rope(jnp.concatenate([tk, ik], axis=1), pe)
        out = _attention(q, k, jnp.concatenate([tv, iv], axis=1))
        n_txt = txt.shape[1]
        img = img + i_gate * img_attn.proj(out[:, n_txt:])
        txt = txt + t_gate * txt_attn.proj(out[:, :n_txt])
        mlp = dense(cfg.mlp_dim, name="img_mlp_0")(_modulate(img, i_shift2, i_scale2))
        img = img + i_gate2 * dense(cfg.dim, name="img_mlp_2")(nn.gelu(mlp, approximate=True))
        mlp = dense(cfg.mlp_dim, name="txt_mlp_0")(_modulate(txt, t_shift2, t_scale2))
        txt = txt + t_gate2 * dense(cfg.dim, name="txt_mlp_2")(nn.gelu(mlp, approximate=True))
        return (img, txt), None


class _SingleBlock(nn.Module):
    cfg: FluxConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, x, vec, pe):
        cfg = self.cfg
        shift, scale, gate = _Modulation(3, cfg.dim, self.dtype, name="modulation")(vec)
        h = nn.Dense(3 * cfg.dim + cfg.mlp_dim, dtype=self.dtype, name="linear1")(_modulate(x, shift, scale))
        q, k, v = _heads(h[..., : 3 * cfg.dim], 3, cfg.num_attention_heads)
        q, k = _QKNorm(name="norm")(q, k)
        attn = _attention(_apply_rope(q, pe), _apply_rope(k, pe), v)
        h = jnp.concatenate([attn, nn.gelu(h[..., 3 * cfg.dim :], approximate=True)], axis=-1)
        return x + gate * nn.Dense(cfg.dim, dtype=self.dtype, name="linear2")(h), None


def _stack(block, length):
    return nn.scan(
        block,
        variable_axes={"params": 0, "lora": 0},  # "lora": per-sample LoRAs (jlora.per_sample)
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
    )


class _FinalLayer(nn.Module):
    dim: int
    out_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x, vec):
        mod = nn.Dense(2 * self.dim, dtype=self.dtype, name="adaLN_modulation_1")(nn.silu(vec))
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="linear")(_modulate(x, shift, scale))


class FluxTransformer(nn.Module):
    """diffusers' `FluxTransformer2DModel` forward over the BFL-layout params (see the module docstring)."""

    config: FluxConfig
    dtype: Any = None

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        cfg, dense = self.config, functools.partial(nn.Dense, dtype=self.dtype)
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        batch = hidden_states.shape[0]

        img = dense(cfg.dim, name="img_in")(hidden_states)
        time_dtype = pooled_projections.dtype
        t = jnp.broadcast_to(jnp.asarray(timestep).astype(img.dtype).reshape(-1), (batch,)) * 1000
        vec = _MLPEmbedder(cfg.dim, self.dtype, name="time_in")(_timestep_embedding(t).astype(time_dtype))
        if cfg.guidance_embeds:
            g = jnp.broadcast_to(jnp.asarray(guidance).astype(img.dtype).reshape(-1), (batch,)) * 1000
            vec = vec + _MLPEmbedder(cfg.dim, self.dtype, name="guidance_in")(_timestep_embedding(g).astype(time_dtype))
        vec = vec + _MLPEmbedder(cfg.dim, self.dtype, name="vector_in")(pooled_projections)
        txt = dense(cfg.dim, name="txt_in")(encoder_hidden_states)
        pe = _rope(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)

        double = _stack(_DoubleBlock, cfg.num_layers)(cfg, self.dtype, name="double_blocks")
        (img, txt), _ = double((img, txt), vec, pe)
        single = _stack(_SingleBlock, cfg.num_single_layers)(cfg, self.dtype, name="single_blocks")
        x, _ = single(jnp.concatenate([txt, img], axis=1), vec, pe)
        img = x[:, txt.shape[1] :]

        final = _FinalLayer(cfg.dim, cfg.out_dim, self.dtype, name="final_layer")
        return final(img, vec)


# ---------------------------------------------------------------------------- entry points


def _call(model: FluxTransformer, params, hidden_states, encoder_hidden_states, pooled_projections, timestep,
          img_ids, txt_ids, guidance=None):
    if model.config.guidance_embeds and guidance is None:
        raise FluxInputError("this Flux model has guidance_embeds=True: pass `guidance` (B,), e.g. 3.5 per sample.")
    if not model.config.guidance_embeds and guidance is not None:
        raise FluxInputError("this Flux model has guidance_embeds=False: pass guidance=None.")
    variables = params if "params" in params else {"params": params}  # {"params", "lora"}: jlora.per_sample_apply
    return model.apply(variables, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                       img_ids, txt_ids, guidance)


def make_apply(config: FluxConfig | Mapping[str, Any], dtype=None) -> Callable:
    """The pure, jittable forward `apply_fn(params, hidden_states, encoder_hidden_states,
    pooled_projections, timestep, img_ids, txt_ids, guidance=None) -> sample`.

    Arguments and result are those of diffusers' forward: `timestep` and `guidance`
    are `(B,)` in `[0, 1]`-ish units and are multiplied by 1000 inside, as diffusers does.
    `dtype` is the computation dtype (None: from inputs and params).

    >>> sample = jax.jit(flux.make_apply(config))(params, x, txt, pooled, t, img_ids, txt_ids)
    """
    return functools.partial(_call, FluxTransformer(FluxConfig.of(config), dtype))


def init_params(config: FluxConfig | Mapping[str, Any], key, dtype=jnp.float32) -> dict:
    """Random params (lecun-normal kernels, zero biases, unit norm scales) in the layout above."""
    cfg = FluxConfig.of(config)
    x = jnp.zeros((1, 1, cfg.in_channels), dtype)
    txt = jnp.zeros((1, 1, cfg.joint_attention_dim), dtype)
    pooled = jnp.zeros((1, cfg.pooled_projection_dim), dtype)
    ids = jnp.zeros((1, 3), dtype)
    t = jnp.zeros((1,), dtype)
    g = t if cfg.guidance_embeds else None

    def init(key):
        params = FluxTransformer(cfg).init(key, x, txt, pooled, t, ids, ids, g)["params"]
        return jax.tree.map(lambda p: p.astype(dtype), _plain(params))

    return jax.jit(init)(key)


def param_shapes(config: FluxConfig | Mapping[str, Any], dtype=jnp.float32) -> dict:
    """The params tree as `jax.ShapeDtypeStruct` leaves, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, FluxConfig.of(config), dtype=dtype), jax.random.key(0))


def _plain(tree):
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def expand_input_channels(params: dict, in_channels: int) -> dict:
    """Params whose `img_in` takes `in_channels` features: the new input rows are zeros.

    Flux Control LoRAs (Canny, Depth) widen the image input from 64 to 128 channels
    (latents concatenated with the control latents); this is diffusers' expansion of
    `x_embedder`. The result is a new tree: the original params are unchanged, so going
    back (diffusers' `reset_to_overwritten_params`) is using them again.

    >>> wide = flux.expand_input_channels(params, 128)
    """
    kernel = params["img_in"]["kernel"]
    extra = in_channels - kernel.shape[0]
    if extra < 0:
        raise FluxInputError(f"img_in already has {kernel.shape[0]} input channels; cannot expand to {in_channels}.")
    if extra == 0:
        return params
    wide = jnp.concatenate([kernel, jnp.zeros((extra, kernel.shape[1]), kernel.dtype)], axis=0)
    return {**params, "img_in": {**params["img_in"], "kernel": wide}}



__all__ = [
    "FluxConfig",
    "FluxInputError",
    "FluxTransformer",
    "expand_input_channels",
    "from_diffusers",
    "init_params",
    "make_apply",
    "param_shapes",
    "to_diffusers_state_dict",
]

from jlora.models.flux_weights import from_diffusers, to_diffusers_state_dict  # noqa: E402,F401  (uses the model above)
