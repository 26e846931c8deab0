"""More Flux LoRA layouts: OneTrainer, XLabs and fal Kontext.

OneTrainer: diffusers module names with dots as underscores,
`lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight`, `.alpha`;
`lora_te1_` / `lora_te_` (CLIP-L) and `lora_te2_` (T5) for the text encoders. Names are
resolved against the target's modules, as for kohya SD files.

XLabs: attention-processor LoRAs in BFL block names, no alphas (scale 1):
`double_blocks.0.processor.qkv_lora1.down.weight` / `.up.weight` (image-stream qkv),
`qkv_lora2` (text-stream qkv), `proj_lora1` / `proj_lora2` (image / text attention output),
`single_blocks.0.processor.qkv_lora` (the q|k|v part of `linear1`) and `proj_lora` (`linear2`);
optionally under `diffusion_model.`. A qkv LoRA keeps its down factor for each of q, k, v and
splits the rows of its up factor.

fal Kontext: PEFT suffixes on BFL names under `base_model.model.`:
`base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight`, `single_blocks.0.linear1`,
`final_layer.adaLN_modulation.1`, `img_in`, `time_in.in_layer`, ... split like kohya Flux files.

These files also look like a generic PEFT, kohya or old-diffusers file to those formats'
detectors; each format here `supersedes` those, so a file has exactly one format.
"""

from __future__ import annotations

import dataclasses
import re

from converters.engine import Format, Rule, register_format
from converters.formats import kohya_flux
from converters.errors import InvalidAdapterError
from converters.formats.kohya import ROLES
from converters.records import Record

_SUFFIX = "|".join(re.escape(s) for s in sorted(ROLES, key=len, reverse=True))

ONETRAINER_RULES = (
    Rule(r"(?P<component>lora_transformer|lora_te[12]?)_(?P<module>[A-Za-z0-9_]+?)\.(?P<role>" + _SUFFIX + ")", "{role}"),
)

_XLABS = r"(?:diffusion_model\.)?"
_XLABS_ROLE = r"\.(?P<role>down|up)\.weight"
_XLABS_SINGLE_QKV = "single_blocks.{i}.linear1_qkv"  # the q|k|v rows of linear1; no BFL module of its own
XLABS_RULES = (
    Rule(_XLABS + r"double_blocks\.(?P<i>\d+)\.processor\.qkv_lora1" + _XLABS_ROLE, "{role}", "double_blocks.{i}.img_attn.qkv"),
    Rule(_XLABS + r"double_blocks\.(?P<i>\d+)\.processor\.qkv_lora2" + _XLABS_ROLE, "{role}", "double_blocks.{i}.txt_attn.qkv"),
    Rule(_XLABS + r"double_blocks\.(?P<i>\d+)\.processor\.proj_lora1" + _XLABS_ROLE, "{role}", "double_blocks.{i}.img_attn.proj"),
    Rule(_XLABS + r"double_blocks\.(?P<i>\d+)\.processor\.proj_lora2" + _XLABS_ROLE, "{role}", "double_blocks.{i}.txt_attn.proj"),
    Rule(_XLABS + r"single_blocks\.(?P<i>\d+)\.processor\.qkv_lora" + _XLABS_ROLE, "{role}", _XLABS_SINGLE_QKV),
    Rule(_XLABS + r"single_blocks\.(?P<i>\d+)\.processor\.proj_lora" + _XLABS_ROLE, "{role}", "single_blocks.{i}.linear2"),
)
_XLABS_KEY = re.compile(_XLABS + r"(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12]?" + _XLABS_ROLE)

_FAL_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias", "alpha": "alpha"}
FAL_KONTEXT_RULES = (
    Rule(r"base_model\.model\.(?P<module>[A-Za-z0-9_.]+?)\.(?P<role>"
         + "|".join(re.escape(s) for s in sorted(_FAL_ROLES, key=len, reverse=True)) + ")", "{role}"),
)
_BFL_MODULE = re.compile(r"base_model\.model\.(?:double_blocks|single_blocks)\.\d+\.")

# modules with no BFL name of their own: module -> the diffusers modules its up rows split into, in order
_ROW_SPLITS = (
    (re.compile(r"single_blocks\.(?P<i>\d+)\.linear1_qkv"),
     tuple(f"single_transformer_blocks.{{i}}.attn.to_{p}" for p in "qkv")),
)


def _split(rec: Record) -> list[Record]:
    """Diffusers-named records: this module's own row splits, then kohya Flux's table of BFL modules."""
    try:
        if rec.component == "transformer":
            for regex, modules in _ROW_SPLITS:
                m = regex.fullmatch(rec.module)
                if m:
                    return _split_rows(rec, [name.format(**m.groupdict()) for name in modules])
        return kohya_flux.split_record(rec)
    except ValueError as e:
        raise InvalidAdapterError(str(e)) from None


def _split_rows(rec: Record, modules: list[str]) -> list[Record]:
    """One record per module: the same down factor and consecutive equal slices of the up factor's rows."""
    up = rec.tensors["up"]
    if up.shape[0] % len(modules):
        raise ValueError(f"{rec.sources['up']}: {up.shape[0]} rows do not split into {len(modules)} modules {modules}.")
    n = up.shape[0] // len(modules)
    return [
        dataclasses.replace(rec, module=name, tensors={**rec.tensors, "up": up[i * n : (i + 1) * n]})
        for i, name in enumerate(modules)
    ]


def _is_onetrainer(keys: frozenset[str]) -> bool:
    return any(k.startswith("lora_transformer_") for k in keys)


def _is_xlabs(keys: frozenset[str]) -> bool:
    return any(_XLABS_KEY.fullmatch(k) for k in keys)


def _is_fal_kontext(keys: frozenset[str]) -> bool:
    return any(_BFL_MODULE.match(k) for k in keys)


ONETRAINER = register_format(
    Format(
        name="onetrainer_flux",
        supersedes=("kohya",),  # its lora_te1_ keys look like kohya SD keys
        rules=ONETRAINER_RULES,
        detect=_is_onetrainer,
        components={"lora_transformer": "transformer", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"},
        roles=ROLES,
        underscored=True,
        description="OneTrainer Flux (lora_transformer_ + diffusers names with underscores, alphas)",
    )
)
XLABS = register_format(
    Format(
        name="xlabs_flux",
        supersedes=("comfy_flux", "diffusers_old"),  # diffusion_model. prefix, processor.qkv_lora.down
        rules=XLABS_RULES,
        detect=_is_xlabs,
        components={None: "transformer"},
        split=_split,
        description="XLabs Flux (processor.qkv_lora1 / proj_lora2, no alphas)",
    )
)
FAL_KONTEXT = register_format(
    Format(
        name="fal_kontext",
        supersedes=("peft",),  # lora_A / lora_B suffixes
        rules=FAL_KONTEXT_RULES,
        detect=_is_fal_kontext,
        components={None: "transformer"},
        roles=_FAL_ROLES,
        split=_split,
        description="fal Kontext Flux (base_model.model. BFL names, lora_A / lora_B)",
    )
)
