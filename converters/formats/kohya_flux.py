"""Flux LoRAs in the original (BFL) module names: kohya sd-scripts and ComfyUI-saved files.

kohya: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`,
`lora_unet_single_blocks_0_linear1...`, `lora_te1_text_model_...` (CLIP-L).
ComfyUI: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` (or `lora_A/B`),
`text_encoders.clip_l.transformer.text_model...`; `text_encoders.t5xxl...` keys name a
component jlora's Flux pipeline has no params for, so they are reported, never dropped.

Records come out in diffusers' module names: a fused BFL projection becomes one record per
diffusers module, each with the same down factor and its rows of the up factor
(`SPLITS`); `final_layer.adaLN_modulation.1` has its (shift, scale) rows swapped into
diffusers' (scale, shift) order.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from converters.engine import Format, Rule, register_format
from converters.formats.kohya import ROLES
from converters.records import Record

# BFL module (underscored) -> [(diffusers module, first unit, end unit)], total units.
_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
SPLITS: tuple[tuple[str, tuple[tuple[str, int, int], ...], int], ...] = (
    (r"double_blocks_(?P<i>\d+)_img_attn_qkv", ((f"{_D}.attn.to_q", 0, 1), (f"{_D}.attn.to_k", 1, 2), (f"{_D}.attn.to_v", 2, 3)), 3),
    (r"double_blocks_(?P<i>\d+)_txt_attn_qkv", ((f"{_D}.attn.add_q_proj", 0, 1), (f"{_D}.attn.add_k_proj", 1, 2), (f"{_D}.attn.add_v_proj", 2, 3)), 3),
    (r"double_blocks_(?P<i>\d+)_img_attn_proj", ((f"{_D}.attn.to_out.0", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_txt_attn_proj", ((f"{_D}.attn.to_add_out", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_img_mlp_0", ((f"{_D}.ff.net.0.proj", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_img_mlp_2", ((f"{_D}.ff.net.2", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_txt_mlp_0", ((f"{_D}.ff_context.net.0.proj", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_txt_mlp_2", ((f"{_D}.ff_context.net.2", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_img_mod_lin", ((f"{_D}.norm1.linear", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_img_attn_norm_query_norm", ((f"{_D}.attn.norm_q", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_img_attn_norm_key_norm", ((f"{_D}.attn.norm_k", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_txt_attn_norm_query_norm", ((f"{_D}.attn.norm_added_q", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_txt_attn_norm_key_norm", ((f"{_D}.attn.norm_added_k", 0, 1),), 1),
    (r"single_blocks_(?P<i>\d+)_norm_query_norm", ((f"{_S}.attn.norm_q", 0, 1),), 1),
    (r"single_blocks_(?P<i>\d+)_norm_key_norm", ((f"{_S}.attn.norm_k", 0, 1),), 1),
    (r"double_blocks_(?P<i>\d+)_txt_mod_lin", ((f"{_D}.norm1_context.linear", 0, 1),), 1),
    (r"single_blocks_(?P<i>\d+)_linear1",
     ((f"{_S}.attn.to_q", 0, 1), (f"{_S}.attn.to_k", 1, 2), (f"{_S}.attn.to_v", 2, 3), (f"{_S}.proj_mlp", 3, 7)), 7),
    (r"single_blocks_(?P<i>\d+)_linear2", ((f"{_S}.proj_out", 0, 1),), 1),
    (r"single_blocks_(?P<i>\d+)_modulation_lin", ((f"{_S}.norm.linear", 0, 1),), 1),
    (r"img_in", (("x_embedder", 0, 1),), 1),
    (r"txt_in", (("context_embedder", 0, 1),), 1),
    (r"time_in_in_layer", (("time_text_embed.timestep_embedder.linear_1", 0, 1),), 1),
    (r"time_in_out_layer", (("time_text_embed.timestep_embedder.linear_2", 0, 1),), 1),
    (r"vector_in_in_layer", (("time_text_embed.text_embedder.linear_1", 0, 1),), 1),
    (r"vector_in_out_layer", (("time_text_embed.text_embedder.linear_2", 0, 1),), 1),
    (r"guidance_in_in_layer", (("time_text_embed.guidance_embedder.linear_1", 0, 1),), 1),
    (r"guidance_in_out_layer", (("time_text_embed.guidance_embedder.linear_2", 0, 1),), 1),
    (r"final_layer_linear", (("proj_out", 0, 1),), 1),
)
# BFL's final modulation is (shift, scale); diffusers' norm_out.linear is (scale, shift).
_SWAPPED = re.compile(r"final_layer_adaLN_modulation_1")
_COMPILED = [(re.compile(p), pieces, units) for p, pieces, units in SPLITS]
_ROW_ROLES = ("up", "up_bias", "diff", "diff_b")


def _rows(t: np.ndarray, units: int, start: int, stop: int) -> np.ndarray:
    n = t.shape[0] // units
    return t[start * n : stop * n]


def split_record(rec: Record) -> list[Record]:
    """Diffusers-named records for one BFL-named transformer record (others pass through)."""
    if rec.component != "transformer":
        return [rec]
    module = rec.module.replace(".", "_")
    if _SWAPPED.fullmatch(module):
        tensors = dict(rec.tensors)
        for role in _ROW_ROLES:
            if role in tensors:
                half = tensors[role].shape[0] // 2
                tensors[role] = np.concatenate([tensors[role][half:], tensors[role][:half]])
        return [dataclasses.replace(rec, module="norm_out.linear", tensors=tensors)]
    for regex, pieces, units in _COMPILED:
        m = regex.fullmatch(module)
        if not m:
            continue
        for role in _ROW_ROLES:
            if role in rec.tensors and rec.tensors[role].shape[0] % units:
                raise ValueError(f"{rec.sources[role]}: {rec.tensors[role].shape[0]} rows do not split into {units} units.")
        out = []
        for name, start, stop in pieces:
            tensors = {
                role: (_rows(t, units, start, stop) if role in _ROW_ROLES else t) for role, t in rec.tensors.items()
            }
            out.append(dataclasses.replace(rec, module=name.format(**m.groupdict()), tensors=tensors))
        return out
    return [rec]


def _split_checked(rec: Record) -> list[Record]:
    from converters.errors import InvalidAdapterError

    try:
        return split_record(rec)
    except ValueError as e:
        raise InvalidAdapterError(str(e)) from None


KOHYA_RULES = (
    Rule(r"(?P<component>lora_unet|lora_te1|lora_te3|lora_te)_(?P<module>[A-Za-z0-9_]+?)\.(?P<role>"
         + "|".join(re.escape(s) for s in sorted(ROLES, key=len, reverse=True)) + ")", "{role}"),
)
_COMFY_ROLES = dict(ROLES, **{"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias"})
COMFY_RULES = (
    Rule(r"(?P<component>diffusion_model)\.(?P<module>[A-Za-z0-9_.]+?)\.(?P<role>"
         + "|".join(re.escape(s) for s in sorted(_COMFY_ROLES, key=len, reverse=True)) + ")", "{role}"),
    Rule(r"text_encoders\.(?P<component>clip_l|t5xxl)\.transformer\.(?P<module>[A-Za-z0-9_.]+?)\.(?P<role>"
         + "|".join(re.escape(s) for s in sorted(_COMFY_ROLES, key=len, reverse=True)) + ")", "{role}"),
)

_FLUX_MARKERS = ("double_blocks", "single_blocks")


def _is_flux(keys) -> bool:
    return any(m in k for k in keys for m in _FLUX_MARKERS)


register_format(
    Format(
        name="kohya_flux",
        rules=KOHYA_RULES,
        detect=lambda keys: _is_flux(keys) and any(k.startswith("lora_unet_") for k in keys),
        components={"lora_unet": "transformer", "lora_te1": "text_encoder", "lora_te": "text_encoder",
                    "lora_te3": "text_encoder_2"},
        roles=ROLES,
        underscored=frozenset({"text_encoder"}),
        split=_split_checked,
        description="kohya sd-scripts Flux (BFL names, fused qkv / linear1)",
    )
)
register_format(
    Format(
        name="comfy_flux",
        supersedes=("peft",),  # ComfyUI also saves lora_A / lora_B suffixes
        rules=COMFY_RULES,
        detect=lambda keys: _is_flux(keys) and any(k.startswith("diffusion_model.") for k in keys),
        components={"diffusion_model": "transformer", "clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
        roles=_COMFY_ROLES,
        split=_split_checked,
        description="ComfyUI-saved Flux (diffusion_model. BFL names, text_encoders.clip_l)",
    )
)

# BFL's own LoRA files (Flux Control: Canny, Depth): BFL names, PEFT suffixes, q/k norm scales to set.
_BFL_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias", "scale": "set"}
_BFL_TOP = r"(?:double_blocks|single_blocks|final_layer|img_in|txt_in|time_in|vector_in|guidance_in)"
BFL_RULES = (
    Rule(r"(?P<module>" + _BFL_TOP + r"[A-Za-z0-9_.]*?)\.(?P<role>lora_A\.weight|lora_B\.weight|lora_B\.bias)", "{role}"),
    Rule(r"(?P<module>" + _BFL_TOP + r"[A-Za-z0-9_.]*?_norm)\.(?P<role>scale)", "{role}"),
)


def _is_bfl(keys) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.", "img_in.lora_")) and "processor" not in k
               and (".lora_A." in k or k.endswith("_norm.scale")) for k in keys)


register_format(
    Format(
        name="bfl_flux",
        rules=BFL_RULES,
        detect=_is_bfl,
        components={None: "transformer"},
        roles=_BFL_ROLES,
        split=_split_checked,
        supersedes=("peft",),
        description="BFL Flux LoRAs incl. Control (img_in.lora_A, double_blocks..., norm scales, lora_B.bias)",
    )
)
