"""Old diffusers attention-processor LoRA files (before PEFT).

`unet.<block>.attn1.processor.to_q_lora.down.weight`, `...to_out_lora.up.weight`,
`unet.<module>.lora.down.weight` (proj_in, ff), and for text encoders
`text_encoder.<layer>.self_attn.to_q_lora.down.weight` and
`text_encoder.<layer>.mlp.fc1.lora_linear_layer.down.weight`.

The first `save_attn_procs` files have no `unet.` prefix (`down_blocks.0...attn1.processor.to_q_lora.down.weight`);
keys that start with a UNet block name (`down_blocks`, `mid_block`, `up_blocks`) are the UNet's, and
unprefixed `text_model.` keys belong to the one text encoder being loaded (`component=`).
"""

from __future__ import annotations

from converters.engine import Format, Rule, register_format

_UNET = r"(?P<component>unet(?=\.)|(?=(?:down_blocks|mid_block|up_blocks)\.))\.?"
_TE = r"(?:(?P<component>text_encoder|text_encoder_2)\.|(?=text_model\.))"
_ROLE = r"(?P<role>down|up)\.weight"

RULES = (
    Rule(_UNET + r"(?P<module>.+?)(?:\.processor)?\.to_(?P<p>q|k|v)_lora\." + _ROLE, "{role}", "{module}.to_{p}"),
    Rule(_UNET + r"(?P<module>.+?)(?:\.processor)?\.to_out_lora\." + _ROLE, "{role}", "{module}.to_out.0"),
    Rule(_UNET + r"(?P<module>.+?)\.lora\." + _ROLE, "{role}"),
    Rule(_TE + r"(?P<module>.+?)\.to_(?P<p>q|k|v)_lora\." + _ROLE, "{role}", "{module}.{p}_proj"),
    Rule(_TE + r"(?P<module>.+?)\.to_out_lora\." + _ROLE, "{role}", "{module}.out_proj"),
    Rule(_TE + r"(?P<module>.+?)\.lora_linear_layer\." + _ROLE, "{role}"),
    Rule(r"(?P<component>unet|text_encoder|text_encoder_2)\.(?P<module>.+?)\.alpha", "alpha"),
)


def _detect(keys: frozenset[str]) -> bool:
    return any("_lora.down." in k or "_lora.up." in k or ".lora.down." in k or ".lora_linear_layer." in k for k in keys)


FORMAT = register_format(
    Format(name="diffusers_old", rules=RULES, detect=_detect, components={"": "unet"},
           description="old diffusers attention processors (to_q_lora)")
)
