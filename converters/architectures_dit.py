"""Shape indexes of Z-Image and LTX-2 as torch-mirror trees (diffusers module names, `(in, out)` kernels, norm
weights as `scale`, bare parameters by name), for `jlora inspect` / `convert` without weights.

`z_image_index(config)` is diffusers' `ZImageTransformer2DModel`, `ltx2_index(config)` its
`LTX2VideoTransformer3DModel` (LTX-2.0: no gated attention, prompt modulation or keyframe embedding) and
`ltx2_connectors_index(config)` its `LTX2TextConnectors`, each for a diffusers config dict; the defaults are the
released models' (Z-Image-Turbo 6B, LTX-2 19B).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from converters.errors import UnsupportedModelError

Index = dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]

Z_IMAGE_TURBO = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
    n_kv_heads=30, cap_feat_dim=2560,
)
LTX2_19B = dict(
    in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
    audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=32, audio_attention_head_dim=64,
    audio_cross_attention_dim=2048, num_layers=48, caption_channels=3840,
)
LTX2_19B_CONNECTORS = dict(
    caption_channels=3840, text_proj_in_factor=49, video_connector_num_attention_heads=30,
    video_connector_attention_head_dim=128, video_connector_num_layers=2, video_connector_num_learnable_registers=128,
    audio_connector_num_attention_heads=30, audio_connector_attention_head_dim=128, audio_connector_num_layers=2,
    audio_connector_num_learnable_registers=128,
)
_ADALN_EMBED_DIM = 256  # Z-Image's timestep embedding width (capped by dim)
# LTX-2.3 options that add modules this index does not describe.
_LTX2_UNSUPPORTED = ("gated_attn", "cross_attn_mod", "audio_gated_attn", "audio_cross_attn_mod", "perturbed_attn",
                     "use_keyframes_abs_pos_embedding")


class _Mirror:
    """Adds torch-mirror leaves by diffusers module name."""

    def __init__(self, dtype):
        self.index: Index = {}
        self.dtype = np.dtype(dtype)

    def param(self, name: str, shape) -> None:
        self.index[tuple(name.split("."))] = (tuple(int(s) for s in shape), self.dtype)

    def dense(self, module: str, n_in: int, n_out: int, bias: bool = True) -> None:
        self.param(f"{module}.kernel", (n_in, n_out))
        if bias:
            self.param(f"{module}.bias", (n_out,))

    def scale(self, module: str, n: int) -> None:
        self.param(f"{module}.scale", (n,))

    def attention(self, prefix: str, query_dim: int, kv_dim: int, inner: int, bias: bool, norm: int | None) -> None:
        for name, n_in in (("to_q", query_dim), ("to_k", kv_dim), ("to_v", kv_dim)):
            self.dense(f"{prefix}.{name}", n_in, inner, bias)
        self.dense(f"{prefix}.to_out.0", inner, query_dim, bias)
        if norm is not None:
            self.scale(f"{prefix}.norm_q", norm)
            self.scale(f"{prefix}.norm_k", norm)

    def feed_forward(self, prefix: str, dim: int) -> None:  # diffusers FeedForward, mult 4
        self.dense(f"{prefix}.net.0.proj", dim, 4 * dim)
        self.dense(f"{prefix}.net.2", 4 * dim, dim)


def z_image_index(config: Mapping = Z_IMAGE_TURBO, dtype=np.float32) -> Index:
    """The torch-mirror shape index of diffusers' `ZImageTransformer2DModel` for a config dict.

    >>> z_image_index()[("layers", "29", "feed_forward", "w1", "kernel")][0]
    (3840, 10240)
    """
    m = _Mirror(dtype)
    d, heads, ch = config["dim"], config["n_heads"], config.get("in_channels", 16)
    hidden, adaln = int(d / 3 * 8), min(d, _ADALN_EMBED_DIM)
    qk_norm = d // heads if config.get("qk_norm", True) else None
    for p, f in zip(config.get("all_patch_size", (2,)), config.get("all_f_patch_size", (1,))):
        m.dense(f"all_x_embedder.{p}-{f}", f * p * p * ch, d)
        m.dense(f"all_final_layer.{p}-{f}.linear", d, p * p * f * ch)
        m.dense(f"all_final_layer.{p}-{f}.adaLN_modulation.1", adaln, d)
    blocks = [(f"layers.{i}", True) for i in range(config["n_layers"])]
    for i in range(config.get("n_refiner_layers", 2)):
        blocks += [(f"noise_refiner.{i}", True), (f"context_refiner.{i}", False)]
    if config.get("siglip_feat_dim") is not None:  # the Omni variant
        blocks += [(f"siglip_refiner.{i}", False) for i in range(config.get("n_refiner_layers", 2))]
        m.scale("siglip_embedder.0", config["siglip_feat_dim"])
        m.dense("siglip_embedder.1", config["siglip_feat_dim"], d)
        m.param("siglip_pad_token", (1, d))
    for block, modulated in blocks:
        m.attention(f"{block}.attention", d, d, d, bias=False, norm=qk_norm)
        m.dense(f"{block}.feed_forward.w1", d, hidden, bias=False)
        m.dense(f"{block}.feed_forward.w2", hidden, d, bias=False)
        m.dense(f"{block}.feed_forward.w3", d, hidden, bias=False)
        for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            m.scale(f"{block}.{norm}", d)
        if modulated:
            m.dense(f"{block}.adaLN_modulation.0", adaln, 4 * d)
    m.dense("t_embedder.mlp.0", 256, 1024)
    m.dense("t_embedder.mlp.2", 1024, adaln)
    m.scale("cap_embedder.0", config.get("cap_feat_dim", 2560))
    m.dense("cap_embedder.1", config.get("cap_feat_dim", 2560), d)
    m.param("x_pad_token", (1, d))
    m.param("cap_pad_token", (1, d))
    return m.index


def _ada_single(m: _Mirror, prefix: str, dim: int, params: int) -> None:  # LTX2AdaLayerNormSingle
    m.dense(f"{prefix}.emb.timestep_embedder.linear_1", 256, dim)
    m.dense(f"{prefix}.emb.timestep_embedder.linear_2", dim, dim)
    m.dense(f"{prefix}.linear", dim, params * dim)


def ltx2_index(config: Mapping = LTX2_19B, dtype=np.float32) -> Index:
    """The torch-mirror shape index of diffusers' `LTX2VideoTransformer3DModel` (LTX-2.0) for a config dict.

    Raises:
      UnsupportedModelError: the config turns on an LTX-2.3 option (gated attention, prompt modulation, ...).

    >>> ltx2_index()[("transformer_blocks", "0", "audio_to_video_attn", "to_q", "kernel")][0]
    (4096, 2048)
    """
    on = [k for k in _LTX2_UNSUPPORTED if config.get(k)]
    if on or not config.get("use_prompt_embeddings", True):
        raise UnsupportedModelError(
            f"ltx2_index describes LTX-2.0 transformers; this config sets {on or ['use_prompt_embeddings=False']}. "
            "Check the file against the model's own params (load_lora_weights) instead."
        )
    m = _Mirror(dtype)
    heads, hd = config.get("num_attention_heads", 32), config.get("attention_head_dim", 128)
    a_heads, a_hd = config.get("audio_num_attention_heads", 32), config.get("audio_attention_head_dim", 64)
    d, ad = heads * hd, a_heads * a_hd
    ch, a_ch = config.get("in_channels", 128), config.get("audio_in_channels", 128)
    out, a_out = config.get("out_channels") or ch, config.get("audio_out_channels") or a_ch
    caption, bias = config.get("caption_channels", 3840), config.get("attention_bias", True)
    norm = config.get("qk_norm", "rms_norm_across_heads") is not None
    m.dense("proj_in", ch, d)
    m.dense("audio_proj_in", a_ch, ad)
    for prefix, width in (("caption_projection", d), ("audio_caption_projection", ad)):
        m.dense(f"{prefix}.linear_1", caption, width)
        m.dense(f"{prefix}.linear_2", width, width)
    for prefix, width, params in (("time_embed", d, 6), ("audio_time_embed", ad, 6),
                                  ("av_cross_attn_video_scale_shift", d, 4), ("av_cross_attn_audio_scale_shift", ad, 4),
                                  ("av_cross_attn_video_a2v_gate", d, 1), ("av_cross_attn_audio_v2a_gate", ad, 1)):
        _ada_single(m, prefix, width, params)
    m.param("scale_shift_table", (2, d))
    m.param("audio_scale_shift_table", (2, ad))
    for i in range(config.get("num_layers", 48)):
        b = f"transformer_blocks.{i}"
        for name, q, kv, inner in (("attn1", d, d, d), ("audio_attn1", ad, ad, ad),
                                   ("attn2", d, config.get("cross_attention_dim", 4096), d),
                                   ("audio_attn2", ad, config.get("audio_cross_attention_dim", 2048), ad),
                                   ("audio_to_video_attn", d, ad, ad), ("video_to_audio_attn", ad, d, ad)):
            m.attention(f"{b}.{name}", q, kv, inner, bias, inner if norm else None)
        m.feed_forward(f"{b}.ff", d)
        m.feed_forward(f"{b}.audio_ff", ad)
        m.param(f"{b}.scale_shift_table", (6, d))
        m.param(f"{b}.audio_scale_shift_table", (6, ad))
        m.param(f"{b}.video_a2v_cross_attn_scale_shift_table", (5, d))
        m.param(f"{b}.audio_a2v_cross_attn_scale_shift_table", (5, ad))
    m.dense("proj_out", d, out)
    m.dense("audio_proj_out", ad, a_out)
    return m.index


def ltx2_connectors_index(config: Mapping = LTX2_19B_CONNECTORS, dtype=np.float32) -> Index:
    """The torch-mirror shape index of diffusers' `LTX2TextConnectors` (LTX-2's `connectors` component).

    >>> ltx2_connectors_index()[("text_proj_in", "kernel")][0]
    (188160, 3840)
    """
    if config.get("per_modality_projections") or config.get("video_gated_attn") or config.get("audio_gated_attn"):
        raise UnsupportedModelError("ltx2_connectors_index describes LTX-2.0 connectors (one text_proj_in, no gated "
                                    "attention); check the file against the model's own params instead.")
    m = _Mirror(dtype)
    caption = config.get("caption_channels", 3840)
    m.dense("text_proj_in", caption * config.get("text_proj_in_factor", 49), caption, bias=config.get("proj_bias", False))
    for side in ("video", "audio"):
        heads = config.get(f"{side}_connector_num_attention_heads", 30)
        d = heads * config.get(f"{side}_connector_attention_head_dim", 128)
        registers = config.get(f"{side}_connector_num_learnable_registers", 128)
        if registers is not None:
            m.param(f"{side}_connector.learnable_registers", (registers, d))
        for i in range(config.get(f"{side}_connector_num_layers", 2)):
            b = f"{side}_connector.transformer_blocks.{i}"
            m.attention(f"{b}.attn1", d, d, d, True, d)
            m.feed_forward(f"{b}.ff", d)
    return m.index
