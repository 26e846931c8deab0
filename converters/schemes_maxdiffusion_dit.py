"""Naming schemes of maxdiffusion's nnx Z-Image and LTX-2 models: diffusers module names -> their params trees.

`maxdiffusion_z_image`: maxdiffusion's `ZImageTransformer2DModel` with `scan_layers=True`, the tree its
`models/z_image/z_image_utils.py:load_z_image_transformer` builds from a diffusers checkpoint. `layers`,
`noise_refiner` and `context_refiner` each carry a leading layer axis; `attention.to_out.0` is
`attention/to_out`, `adaLN_modulation.0` is `adaln_modulation`; the patch-size keyed modules
`all_x_embedder.2-1` / `all_final_layer.2-1` are `x_embedder` / `final_layer` (with `final_layer/adaln_modulation`);
`t_embedder.mlp.0/2` are `t_embedder/mlp_in`, `mlp_out`; `cap_embedder.0/1` are `cap_embedder_norm`, `cap_embedder`.
`maxdiffusion_z_image_layers`: the same with `scan_layers=False` (`layers/<i>/...`).

`maxdiffusion_ltx2`: maxdiffusion's `LTX2VideoTransformer3DModel` with `scan_layers=True` (the paths its LTX-2 LoRA
loader, `loaders/lora_conversion_utils.py:translate_ltx2_nnx_path_to_diffusers_lora`, names): `transformer_blocks/...`
stacked, attention outputs `to_out`, feed-forwards `ff/net_0`, `ff/net_2` (and `audio_ff`); every other module keeps
its diffusers name. `maxdiffusion_ltx2_layers`: `scan_layers=False` (`transformer_blocks/<i>/...`).

`maxdiffusion_ltx2_connectors`: the text connectors of its `LTX2AudioVideoGemmaTextEncoder`
(`models/ltx2/ltx2_utils.py:load_connector_weights`): `text_proj_in` is `feature_extractor/linear`;
`video_connector` / `audio_connector` blocks are stacked under `video_embeddings_connector/stacked_blocks`,
`audio_embeddings_connector/stacked_blocks`.
"""

from __future__ import annotations

from typing import Iterable

from converters.naming import Path
from converters.naming import TargetRule as R
from converters.naming import register_naming_scheme, table_scheme

# ---- Z-Image -------------------------------------------------------------------------------------

_Z_BLOCK_MODULES = (
    *((f"attention.{p}", f"attention/{p}") for p in ("to_q", "to_k", "to_v", "norm_q", "norm_k")),
    ("attention.to_out.0", "attention/to_out"),
    *((f"feed_forward.w{n}", f"feed_forward/w{n}") for n in (1, 2, 3)),
    *((n, n) for n in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2")),
    ("adaLN_modulation.0", "adaln_modulation"),
)
_Z_TOP = (
    R("all_x_embedder.2-1", "x_embedder"),
    R("all_final_layer.2-1.linear", "final_layer/linear"),
    R("all_final_layer.2-1.adaLN_modulation.1", "final_layer/adaln_modulation"),
    R("t_embedder.mlp.0", "t_embedder/mlp_in"),
    R("t_embedder.mlp.2", "t_embedder/mlp_out"),
    R("cap_embedder.0", "cap_embedder_norm"),
    R("cap_embedder.1", "cap_embedder"),
)
_Z_PARTS = ("layers", "noise_refiner", "context_refiner")


def _z_image_rules(layer: str) -> tuple[R, ...]:
    """`layer`: `""` for stacked blocks, `"{layer}/"` for one subtree per block."""
    blocks = tuple(R(f"{part}.{{layer}}.{torch}", f"{part}/{layer}{flax}") for part in _Z_PARTS for torch, flax in _Z_BLOCK_MODULES)
    return blocks + _Z_TOP


MAXDIFFUSION_Z_IMAGE_RULES = _z_image_rules("")
MAXDIFFUSION_Z_IMAGE_LAYERS_RULES = _z_image_rules("{layer}/")


def _z_image_top(paths: list[Path]) -> bool:
    return any(p[:1] == ("x_embedder",) for p in paths) and any(p[:1] == ("final_layer",) for p in paths)


def _detect_z_image(paths: Iterable[Path]) -> bool:
    paths = list(paths)
    return any(p[:3] == ("layers", "attention", "to_q") for p in paths) and _z_image_top(paths)


def _detect_z_image_layers(paths: Iterable[Path]) -> bool:
    paths = list(paths)
    return any(len(p) > 3 and p[0] == "layers" and p[1].isdigit() and p[2:4] == ("attention", "to_q") for p in paths) \
        and _z_image_top(paths)


MAXDIFFUSION_Z_IMAGE = register_naming_scheme(
    table_scheme("maxdiffusion_z_image", MAXDIFFUSION_Z_IMAGE_RULES, detect=_detect_z_image)
)
MAXDIFFUSION_Z_IMAGE_LAYERS = register_naming_scheme(
    table_scheme("maxdiffusion_z_image_layers", MAXDIFFUSION_Z_IMAGE_LAYERS_RULES, detect=_detect_z_image_layers)
)

# ---- LTX-2 ---------------------------------------------------------------------------------------

_LTX2_ATTNS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
_ATTN_MODULES = (
    *((p, p) for p in ("to_q", "to_k", "to_v", "to_gate_logits", "norm_q", "norm_k")),
    ("to_out.0", "to_out"),
)
_FF_MODULES = (("ff.net.0.proj", "ff/net_0"), ("ff.net.2", "ff/net_2"))
_EMBEDDERS = ("time_embed", "audio_time_embed", "prompt_adaln", "audio_prompt_adaln", "av_cross_attn_video_scale_shift",
              "av_cross_attn_video_a2v_gate", "av_cross_attn_audio_scale_shift", "av_cross_attn_audio_v2a_gate")
_LTX2_TOP = (
    *(R(m, m) for m in ("proj_in", "audio_proj_in", "proj_out", "audio_proj_out")),
    *(R(f"{c}.linear_{n}", f"{c}/linear_{n}") for c in ("caption_projection", "audio_caption_projection") for n in (1, 2)),
    *(R(f"{e}.linear", f"{e}/linear") for e in _EMBEDDERS),
    *(R(f"{e}.emb.timestep_embedder.linear_{n}", f"{e}/emb/timestep_embedder/linear_{n}") for e in _EMBEDDERS for n in (1, 2)),
)


def _ltx2_rules(layer: str) -> tuple[R, ...]:
    t = "transformer_blocks"
    attn = tuple(R(f"{t}.{{layer}}.{a}.{torch}", f"{t}/{layer}{a}/{flax}") for a in _LTX2_ATTNS for torch, flax in _ATTN_MODULES)
    ff = tuple(R(f"{t}.{{layer}}.{p}{torch}", f"{t}/{layer}{p}{flax}") for p in ("", "audio_") for torch, flax in _FF_MODULES)
    return attn + ff + _LTX2_TOP


MAXDIFFUSION_LTX2_RULES = _ltx2_rules("")
MAXDIFFUSION_LTX2_LAYERS_RULES = _ltx2_rules("{layer}/")

MAXDIFFUSION_LTX2_CONNECTORS_RULES = (
    R("text_proj_in", "feature_extractor/linear"),
    R("video_text_proj_in", "video_text_proj_in"),
    R("audio_text_proj_in", "audio_text_proj_in"),
    *(R(f"{c}_connector.transformer_blocks.{{layer}}.attn1.{torch}", f"{c}_embeddings_connector/stacked_blocks/attn1/{flax}")
      for c in ("video", "audio") for torch, flax in _ATTN_MODULES),
    *(R(f"{c}_connector.transformer_blocks.{{layer}}.{torch}", f"{c}_embeddings_connector/stacked_blocks/{flax}")
      for c in ("video", "audio") for torch, flax in _FF_MODULES),
)


def _ltx2_top(paths: list[Path]) -> bool:
    return any(p[:1] == ("audio_proj_in",) for p in paths) and any(p[:1] == ("time_embed",) for p in paths)


def _detect_ltx2(paths: Iterable[Path]) -> bool:
    paths = list(paths)
    return any(p[:4] == ("transformer_blocks", "attn1", "to_out", "kernel") for p in paths) and _ltx2_top(paths)


def _detect_ltx2_layers(paths: Iterable[Path]) -> bool:
    paths = list(paths)
    # `to_out/kernel`, not the torch mirror's `to_out/0/kernel`
    return any(len(p) > 4 and p[0] == "transformer_blocks" and p[1].isdigit() and p[2:5] == ("attn1", "to_out", "kernel")
               for p in paths) and _ltx2_top(paths)


def _detect_ltx2_connectors(paths: Iterable[Path]) -> bool:
    return any(p[:2] in (("video_embeddings_connector", "stacked_blocks"), ("audio_embeddings_connector", "stacked_blocks"))
               for p in paths)


MAXDIFFUSION_LTX2 = register_naming_scheme(table_scheme("maxdiffusion_ltx2", MAXDIFFUSION_LTX2_RULES, detect=_detect_ltx2))
MAXDIFFUSION_LTX2_LAYERS = register_naming_scheme(
    table_scheme("maxdiffusion_ltx2_layers", MAXDIFFUSION_LTX2_LAYERS_RULES, detect=_detect_ltx2_layers)
)
MAXDIFFUSION_LTX2_CONNECTORS = register_naming_scheme(
    table_scheme("maxdiffusion_ltx2_connectors", MAXDIFFUSION_LTX2_CONNECTORS_RULES, detect=_detect_ltx2_connectors)
)
