"""Table naming schemes for JAX models with stacked layers and fused kernels.

`jlora_flux`: jlora's own Flax Flux (`jlora.models.flux`), in the original BFL layout:
double and single blocks stacked on a leading layer axis, q|k|v fused per stream,
single blocks' q|k|v|mlp fused into `linear1`, and `final_layer/adaLN_modulation_1`
holding diffusers' `norm_out.linear` with its (scale, shift) halves swapped.
"""

from __future__ import annotations

from converters.naming import TargetRule as R
from converters.naming import register_naming_scheme, table_scheme

_DOUBLE = "transformer_blocks.{layer}"
_SINGLE = "single_transformer_blocks.{layer}"
_MLP_UNITS = 4  # Flux's MLP is 4x the hidden size: linear1 = q | k | v | mlp = 7 units

FLUX_RULES = (
    R("x_embedder", "img_in"),
    R("context_embedder", "txt_in"),
    R("time_text_embed.timestep_embedder.linear_1", "time_in/in_layer"),
    R("time_text_embed.timestep_embedder.linear_2", "time_in/out_layer"),
    R("time_text_embed.text_embedder.linear_1", "vector_in/in_layer"),
    R("time_text_embed.text_embedder.linear_2", "vector_in/out_layer"),
    R("time_text_embed.guidance_embedder.linear_1", "guidance_in/in_layer"),
    R("time_text_embed.guidance_embedder.linear_2", "guidance_in/out_layer"),
    R(f"{_DOUBLE}.norm1.linear", "double_blocks/img_mod/lin"),
    R(f"{_DOUBLE}.norm1_context.linear", "double_blocks/txt_mod/lin"),
    R(f"{_DOUBLE}.attn.to_q", "double_blocks/img_attn/qkv", 3, ((0, 1, 0),)),
    R(f"{_DOUBLE}.attn.to_k", "double_blocks/img_attn/qkv", 3, ((0, 1, 1),)),
    R(f"{_DOUBLE}.attn.to_v", "double_blocks/img_attn/qkv", 3, ((0, 1, 2),)),
    R(f"{_DOUBLE}.attn.add_q_proj", "double_blocks/txt_attn/qkv", 3, ((0, 1, 0),)),
    R(f"{_DOUBLE}.attn.add_k_proj", "double_blocks/txt_attn/qkv", 3, ((0, 1, 1),)),
    R(f"{_DOUBLE}.attn.add_v_proj", "double_blocks/txt_attn/qkv", 3, ((0, 1, 2),)),
    R(f"{_DOUBLE}.attn.norm_q", "double_blocks/img_attn/norm/query_norm"),
    R(f"{_DOUBLE}.attn.norm_k", "double_blocks/img_attn/norm/key_norm"),
    R(f"{_DOUBLE}.attn.norm_added_q", "double_blocks/txt_attn/norm/query_norm"),
    R(f"{_DOUBLE}.attn.norm_added_k", "double_blocks/txt_attn/norm/key_norm"),
    R(f"{_DOUBLE}.attn.to_out.0", "double_blocks/img_attn/proj"),
    R(f"{_DOUBLE}.attn.to_add_out", "double_blocks/txt_attn/proj"),
    R(f"{_DOUBLE}.ff.net.0.proj", "double_blocks/img_mlp_0"),
    R(f"{_DOUBLE}.ff.net.2", "double_blocks/img_mlp_2"),
    R(f"{_DOUBLE}.ff_context.net.0.proj", "double_blocks/txt_mlp_0"),
    R(f"{_DOUBLE}.ff_context.net.2", "double_blocks/txt_mlp_2"),
    R(f"{_SINGLE}.norm.linear", "single_blocks/modulation/lin"),
    R(f"{_SINGLE}.attn.to_q", "single_blocks/linear1", 3 + _MLP_UNITS, ((0, 1, 0),)),
    R(f"{_SINGLE}.attn.to_k", "single_blocks/linear1", 3 + _MLP_UNITS, ((0, 1, 1),)),
    R(f"{_SINGLE}.attn.to_v", "single_blocks/linear1", 3 + _MLP_UNITS, ((0, 1, 2),)),
    R(f"{_SINGLE}.proj_mlp", "single_blocks/linear1", 3 + _MLP_UNITS, ((0, _MLP_UNITS, 3),)),
    R(f"{_SINGLE}.proj_out", "single_blocks/linear2"),
    R(f"{_SINGLE}.attn.norm_q", "single_blocks/norm/query_norm"),
    R(f"{_SINGLE}.attn.norm_k", "single_blocks/norm/key_norm"),
    R("norm_out.linear", "final_layer/adaLN_modulation_1", 2, ((0, 1, 1), (1, 2, 0))),
    R("proj_out", "final_layer/linear"),
)

JLORA_FLUX = register_naming_scheme(
    table_scheme(
        "jlora_flux",
        FLUX_RULES,
        detect=lambda paths: any(p[:1] == ("double_blocks",) for p in paths) and any(p[:1] == ("final_layer",) for p in paths),
    )
)
