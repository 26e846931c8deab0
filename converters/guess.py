"""Which model family a LoRA file is for, from its records (for messages and `jlora inspect`)."""

from __future__ import annotations

import re
from typing import Iterable

from converters.records import Record

_CROSS_DIMS = {768: "sd", 1024: "sd2", 2048: "sdxl"}
# (family, pattern over "component:module" names); the first family with a hit wins.
_MARKERS = (
    # the newest DiTs, in their original and diffusers names (before the older families whose names they share)
    ("flux3", re.compile(r"transformer:(content_mode_blocks|mode_blocks|txt_mode_blocks)\.|"
                         r"transformer:single_blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|mlp_in|mlp_out)$")),
    ("krea2", re.compile(r"transformer:(text_fusion|txtfusion)\.|transformer:blocks\.\d+\.attn\.w[qkvo]$")),
    ("ideogram4", re.compile(r"transformer:(layers\.\d+\.(attention\.o|adaln_modulation)|llm_cond_proj|adaln_proj)$")),
    ("minimax_h3", re.compile(r"transformer(_ref)?:(token_refiner[._](refiner_)?blocks|(transformer_)?blocks[._]\d+[._]"
                              r"(attn[._]qkv_proj|adaln_proj))")),
    ("anima", re.compile(r"text_conditioner:|transformer:blocks\.\d+\.(adaln_modulation_|mlp\.layer)")),
    ("cosmos", re.compile(r"transformer:transformer_blocks\.\d+\.norm[123]\.linear_[12]$")),
    ("ace_step", re.compile(r"transformer:layers\.\d+\.(self_attn|cross_attn)\.")),
    ("z_image", re.compile(r"transformer:((layers|noise_refiner|context_refiner)[._]\d+[._]attention[._]|all_(x_embedder|final_layer)[._])")),
    ("ltx2", re.compile(r"connectors:|transformer:(transformer_blocks\.\d+\.(audio_attn[12]|audio_to_video_attn|video_to_audio_attn|audio_ff)\.|audio_proj_in$|audio_time_embed\.)")),
    ("hunyuan_video", re.compile(r"transformer:context_embedder\.token_refiner\.")),
    ("hidream", re.compile(r"transformer:(double|single)_stream_blocks\.")),
    ("qwen_image", re.compile(r"transformer:transformer_blocks\.\d+\.(img_mlp|txt_mlp|img_mod|txt_mod)\.")),
    ("lumina2", re.compile(r"transformer:(layers|noise_refiner|context_refiner)\.\d+\.(feed_forward|attn)\.")),
    ("flux2", re.compile(r"transformer:(single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj|(double|single)_stream_modulation)")),
    ("flux", re.compile(r"transformer:(single_transformer_blocks\.\d+\.|.*single_blocks[._]\d+)")),
    ("sd3", re.compile(r"transformer:transformer_blocks\.\d+\.attn\.add_q_proj")),
    ("wan", re.compile(r"transformer:blocks\.\d+\.(attn1|attn2|ffn)\.")),
    ("sdxl", re.compile(r"text_encoder_2:|unet:.*(add_embedding|input_blocks[._][78])")),
    ("sd", re.compile(r"unet:")),
)


def guess_family(records: Iterable[Record]) -> str | None:
    """The family (`sd`, `sd2`, `sdxl`, `flux`, `sd3`, `wan`, ...) or None, from records' module names and shapes."""
    records = list(records)
    for rec in records:
        name = rec.module.replace("_", ".")
        if rec.component == "unet" and name.endswith("attn2.to.k") and "down" in rec.tensors:
            found = _CROSS_DIMS.get(int(rec.tensors["down"].shape[1]))
            if found:
                return found
    names = [f"{r.component}:{r.module}" for r in records]
    for family, pattern in _MARKERS:
        if any(pattern.match(n) for n in names):
            return family
    return None
