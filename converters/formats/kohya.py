"""kohya / A1111 / LyCORIS format: `lora_unet_<module_with_underscores>.<tensor>`.

One rule table reads LoRA and LoCon (`lora_down`/`lora_up`/`lora_mid`, `alpha`),
DoRA (`dora_scale`, also on LoHa and LoKr), LyCORIS LoHa (`hada_*`), LoKr (`lokr_*`),
IA3 (`weight`, `on_input`), GLoRA (`a1.weight` ... `bm.weight`), diagonal OFT and BOFT
(`oft_blocks` of 3 or 4 dims, `rescale`, `alpha` = constraint), trained norms (`w_norm`,
`b_norm`, read as diffs of the norm's scale and bias) and full diffs (`diff`, `diff_b`). Module names have dots replaced by underscores; the converter
resolves them against the target model's modules. SDXL files from sd-scripts use
the original (sgm) UNet block names, `input_blocks_4_1_...`, which `sgm_to_diffusers`
maps to diffusers blocks using the UNet's layers per block.
"""

from __future__ import annotations

import re
from typing import Mapping

from converters.engine import Format, Rule, register_format

COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}

ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "lora_up.bias": "up_bias",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "hada_w1_a": "w1a",
    "hada_w1_b": "w1b",
    "hada_w2_a": "w2a",
    "hada_w2_b": "w2b",
    "hada_t1": "t1",
    "hada_t2": "t2",
    "lokr_w1": "lokr_w1",
    "lokr_w1_a": "lokr_w1a",
    "lokr_w1_b": "lokr_w1b",
    "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2a",
    "lokr_w2_b": "lokr_w2b",
    "lokr_t2": "lokr_t2",
    "weight": "ia3_w",
    "on_input": "on_input",
    "a1.weight": "glora_a1",
    "a2.weight": "glora_a2",
    "b1.weight": "glora_b1",
    "b2.weight": "glora_b2",
    "bm.weight": "glora_bm",
    "oft_blocks": "oft_blocks",
    "rescale": "rescale",
    "q_layer.weight": "tlora_q",
    "p_layer.weight": "tlora_p",
    "lambda_layer": "tlora_lambda",
    "w_norm": "diff",
    "b_norm": "diff_b",
    "diff": "diff",
    "diff_b": "diff_b",
    "set_weight": "set",
}

_SUFFIX = "|".join(re.escape(s) for s in sorted(ROLES, key=len, reverse=True))
RULES = (
    Rule(r"(?P<component>lora_unet|lora_te[12]?)_(?P<module>[A-Za-z0-9_]+?)\.(?P<role>" + _SUFFIX + ")", "{role}"),
)

# sgm (original Stable Diffusion) names inside a resnet block -> diffusers names.
_RESNET = (
    ("in_layers_0", "norm1"),
    ("in_layers_2", "conv1"),
    ("out_layers_0", "norm2"),
    ("out_layers_3", "conv2"),
    ("emb_layers_1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
_FIXED = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
}
_SGM = re.compile(r"(?P<part>input_blocks|output_blocks)_(?P<i>\d+)_(?P<j>\d+)_(?P<rest>.+)")
_SGM_MID = re.compile(r"middle_block_(?P<i>\d+)_(?P<rest>.+)")
_MID = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}


def _resnet(rest: str) -> str:
    for sgm, name in _RESNET:
        if rest == sgm:
            return name
    return rest


def layers_per_block(modules: Mapping[str, str | None], default: int = 2) -> int:
    """Resnets per down block of the target UNet, read off its module names."""
    found = [int(m) for v in modules.values() if v and (m := _first(r"^down_blocks\.0\.resnets\.(\d+)\.", v))]
    return max(found) + 1 if found else default


def _first(pattern: str, text: str) -> str | None:
    m = re.match(pattern, text)
    return m.group(1) if m else None


def sgm_to_diffusers(module: str, n_layers: int) -> str:
    """An sgm UNet module name (underscored) as a diffusers name (underscored)."""
    if module in _FIXED:
        return _FIXED[module]
    m = _SGM_MID.fullmatch(module)
    if m:
        i, rest = int(m["i"]), m["rest"]
        return f"mid_block_{_MID[i]}_{_resnet(rest) if i != 1 else rest}" if i in _MID else module
    m = _SGM.fullmatch(module)
    if not m:
        return module
    part, i, j, rest = m["part"], int(m["i"]), int(m["j"]), m["rest"]
    per = n_layers + 1
    if part == "input_blocks":
        block, layer = (i - 1) // per, (i - 1) % per
        if rest == "op":
            return f"down_blocks_{block}_downsamplers_0_conv"
        kind = "resnets" if j == 0 else "attentions"
        return f"down_blocks_{block}_{kind}_{layer}_{_resnet(rest) if j == 0 else rest}"
    block, layer = i // per, i % per
    if j == 0:
        return f"up_blocks_{block}_resnets_{layer}_{_resnet(rest)}"
    if rest == "conv":
        return f"up_blocks_{block}_upsamplers_0_conv"
    return f"up_blocks_{block}_attentions_{layer}_{rest}"


def _context(modules: Mapping[str, str | None]) -> dict:
    return {"layers_per_block": layers_per_block(modules)}


def _rename(component: str | None, module: str, context: Mapping) -> str:
    if component == "unet":
        return sgm_to_diffusers(module, context["layers_per_block"])
    return module


def _detect(keys: frozenset[str]) -> bool:
    if any("double_blocks" in k or "single_blocks" in k for k in keys):
        return False  # Flux in BFL names: converters.formats.kohya_flux
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


FORMAT = register_format(
    Format(
        name="kohya",
        rules=RULES,
        detect=_detect,
        components=COMPONENTS,
        roles=ROLES,
        underscored=True,
        context=_context,
        rename=_rename,
        description="kohya / A1111 / LyCORIS (lora_down, LoCon, LoHa, LoKr, IA3, GLoRA, OFT, BOFT, DoRA, norms, diff)",
    )
)
