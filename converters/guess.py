"""Which model family a LoRA file is for, from its records (for messages and `jlora inspect`)."""

from __future__ import annotations

import re
from typing import Iterable

from converters.records import Record

_CROSS_DIMS = {768: "sd", 1024: "sd2", 2048: "sdxl"}
# (family, pattern over "component:module" names); the first family with a hit wins.
_MARKERS = (
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
