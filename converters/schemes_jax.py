"""Naming schemes of third-party JAX diffusion codebases: diffusers module names -> their params trees.

`maxdiffusion_flux`: maxdiffusion's linen `FluxTransformer2DModel` (the tree its
`models/flux/util.py:load_flow_model` builds from a BFL checkpoint). Double and single
blocks run under `nn.scan`, so their weights carry a leading layer axis under
`scanned_double_blocks/FluxTransformerBlock_0` and
`scanned_single_blocks/FluxSingleTransformerBlock_0`. Each double-block stream fuses
q|k|v into one kernel (`attn/i_qkv`, `attn/e_qkv`); a single block keeps q|k|v in
`lin_qkv` and the MLP input in `mlp_and_out/lin_mlp` (BFL's `linear1` split in two).
The q/k RMSNorm scales (targets of full-weight diffs and `set_weight`s) sit under each
block's `attn`. `norm_out/Dense_0` is BFL's `final_layer.adaLN_modulation.1` loaded as is, so its
columns are (shift, scale): diffusers' `norm_out.linear` (scale, shift) with the halves
swapped.

`maxdiffusion_wan`: maxdiffusion's nnx `WanModel` with `scan_layers=True`, as its
`nnx.State` or as the pure dict `models/wan/wan_utils.py:load_wan_transformer` builds from
a diffusers checkpoint (same paths). Blocks are made under `nnx.vmap`, so every
`blocks/...` weight is stacked `(L, in, out)`; attention projections are renamed
`to_q/to_k/to_v/to_out.0 -> query/key/value/proj_attn` and the feed-forward
`ffn.net.0.proj/ffn.net.2 -> ffn/act_fn/proj, ffn/proj_out`; I2V adds `attn2/add_k_proj`,
`attn2/add_v_proj` and `condition_embedder/image_embedder/ff/net_0, net_2`; the Conv3d
`patch_embedding` keeps its name.

`maxdiffusion_wan_layers`: the same model with `scan_layers=False`: `blocks` is an
`nnx.List`, so each layer has its own weights at `blocks/<i>/...` with the names above.
"""

from __future__ import annotations

from typing import Iterable

from converters.naming import Path
from converters.naming import TargetRule as R
from converters.naming import register_naming_scheme, table_scheme

_SWAP_HALVES = ((0, 1, 1), (1, 2, 0))  # (scale, shift) -> (shift, scale)

_D = "transformer_blocks.{layer}"
_S = "single_transformer_blocks.{layer}"
_MD_D = "scanned_double_blocks/FluxTransformerBlock_0"
_MD_S = "scanned_single_blocks/FluxSingleTransformerBlock_0"
_TTE = "time_text_embed"

MAXDIFFUSION_FLUX_RULES = (
    R("x_embedder", "img_in"),
    R("context_embedder", "txt_in"),
    R(f"{_TTE}.timestep_embedder.linear_1", f"{_TTE}/FlaxTimestepEmbedding_0/linear_1"),
    R(f"{_TTE}.timestep_embedder.linear_2", f"{_TTE}/FlaxTimestepEmbedding_0/linear_2"),
    R(f"{_TTE}.guidance_embedder.linear_1", f"{_TTE}/FlaxTimestepEmbedding_1/linear_1"),
    R(f"{_TTE}.guidance_embedder.linear_2", f"{_TTE}/FlaxTimestepEmbedding_1/linear_2"),
    R(f"{_TTE}.text_embedder.linear_1", f"{_TTE}/PixArtAlphaTextProjection_0/linear_1"),
    R(f"{_TTE}.text_embedder.linear_2", f"{_TTE}/PixArtAlphaTextProjection_0/linear_2"),
    R(f"{_D}.norm1.linear", f"{_MD_D}/img_norm1/lin"),
    R(f"{_D}.norm1_context.linear", f"{_MD_D}/txt_norm1/lin"),
    R(f"{_D}.attn.to_q", f"{_MD_D}/attn/i_qkv", 3, ((0, 1, 0),)),
    R(f"{_D}.attn.to_k", f"{_MD_D}/attn/i_qkv", 3, ((0, 1, 1),)),
    R(f"{_D}.attn.to_v", f"{_MD_D}/attn/i_qkv", 3, ((0, 1, 2),)),
    R(f"{_D}.attn.add_q_proj", f"{_MD_D}/attn/e_qkv", 3, ((0, 1, 0),)),
    R(f"{_D}.attn.add_k_proj", f"{_MD_D}/attn/e_qkv", 3, ((0, 1, 1),)),
    R(f"{_D}.attn.add_v_proj", f"{_MD_D}/attn/e_qkv", 3, ((0, 1, 2),)),
    R(f"{_D}.attn.norm_q", f"{_MD_D}/attn/query_norm"),
    R(f"{_D}.attn.norm_k", f"{_MD_D}/attn/key_norm"),
    R(f"{_D}.attn.norm_added_q", f"{_MD_D}/attn/encoder_query_norm"),
    R(f"{_D}.attn.norm_added_k", f"{_MD_D}/attn/encoder_key_norm"),
    R(f"{_D}.attn.to_out.0", f"{_MD_D}/attn/i_proj"),
    R(f"{_D}.attn.to_add_out", f"{_MD_D}/attn/e_proj"),
    R(f"{_D}.ff.net.0.proj", f"{_MD_D}/img_mlp/layers_0"),
    R(f"{_D}.ff.net.2", f"{_MD_D}/img_mlp/layers_2"),
    R(f"{_D}.ff_context.net.0.proj", f"{_MD_D}/txt_mlp/layers_0"),
    R(f"{_D}.ff_context.net.2", f"{_MD_D}/txt_mlp/layers_2"),
    R(f"{_S}.norm.linear", f"{_MD_S}/norm/lin"),
    R(f"{_S}.attn.to_q", f"{_MD_S}/lin_qkv", 3, ((0, 1, 0),)),
    R(f"{_S}.attn.to_k", f"{_MD_S}/lin_qkv", 3, ((0, 1, 1),)),
    R(f"{_S}.attn.to_v", f"{_MD_S}/lin_qkv", 3, ((0, 1, 2),)),
    R(f"{_S}.proj_mlp", f"{_MD_S}/mlp_and_out/lin_mlp"),
    R(f"{_S}.proj_out", f"{_MD_S}/mlp_and_out/linear2"),
    R(f"{_S}.attn.norm_q", f"{_MD_S}/attn/query_norm"),
    R(f"{_S}.attn.norm_k", f"{_MD_S}/attn/key_norm"),
    R("norm_out.linear", "norm_out/Dense_0", 2, _SWAP_HALVES),
    R("proj_out", "proj_out"),
)


def _detect_maxdiffusion_flux(paths: Iterable[Path]) -> bool:
    return any(p[:2] == ("scanned_double_blocks", "FluxTransformerBlock_0") for p in paths)


MAXDIFFUSION_FLUX = register_naming_scheme(
    table_scheme("maxdiffusion_flux", MAXDIFFUSION_FLUX_RULES, detect=_detect_maxdiffusion_flux)
)


_B = "blocks.{layer}"
_CE = "condition_embedder"
_WAN_ATTN = (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn"))

MAXDIFFUSION_WAN_RULES = (
    *(R(f"{_B}.{attn}.{torch}", f"blocks/{attn}/{flax}") for attn in ("attn1", "attn2") for torch, flax in _WAN_ATTN),
    R(f"{_B}.attn2.add_k_proj", "blocks/attn2/add_k_proj"),
    R(f"{_B}.attn2.add_v_proj", "blocks/attn2/add_v_proj"),
    R(f"{_B}.ffn.net.0.proj", "blocks/ffn/act_fn/proj"),
    R(f"{_B}.ffn.net.2", "blocks/ffn/proj_out"),
    R(f"{_CE}.time_embedder.linear_1", f"{_CE}/time_embedder/linear_1"),
    R(f"{_CE}.time_embedder.linear_2", f"{_CE}/time_embedder/linear_2"),
    R(f"{_CE}.time_proj", f"{_CE}/time_proj"),
    R(f"{_CE}.text_embedder.linear_1", f"{_CE}/text_embedder/linear_1"),
    R(f"{_CE}.text_embedder.linear_2", f"{_CE}/text_embedder/linear_2"),
    R(f"{_CE}.image_embedder.ff.net.0.proj", f"{_CE}/image_embedder/ff/net_0"),
    R(f"{_CE}.image_embedder.ff.net.2", f"{_CE}/image_embedder/ff/net_2"),
    R("proj_out", "proj_out"),
    R("patch_embedding", "patch_embedding"),  # Conv3d kernel (kt, kh, kw, in, out)
)

# scan_layers=False: `blocks` is an `nnx.List`, one subtree per layer at `blocks/<i>/...`.
MAXDIFFUSION_WAN_LAYERS_RULES = tuple(
    R(rule.module, rule.path.replace("blocks/", "blocks/{layer}/", 1)) if rule.path.startswith("blocks/") else rule
    for rule in MAXDIFFUSION_WAN_RULES
)


def _detect_maxdiffusion_wan(paths: Iterable[Path]) -> bool:
    paths = list(paths)
    return any(p[:4] == ("blocks", "attn1", "query", "kernel") for p in paths) and any(
        p[:1] == (_CE,) for p in paths
    )


def _detect_maxdiffusion_wan_layers(paths: Iterable[Path]) -> bool:
    paths = list(paths)
    return any(
        len(p) >= 5 and p[0] == "blocks" and p[1].isdigit() and p[2:5] == ("attn1", "query", "kernel") for p in paths
    ) and any(p[:1] == (_CE,) for p in paths)


MAXDIFFUSION_WAN = register_naming_scheme(
    table_scheme("maxdiffusion_wan", MAXDIFFUSION_WAN_RULES, detect=_detect_maxdiffusion_wan)
)
MAXDIFFUSION_WAN_LAYERS = register_naming_scheme(
    table_scheme("maxdiffusion_wan_layers", MAXDIFFUSION_WAN_LAYERS_RULES, detect=_detect_maxdiffusion_wan_layers)
)
