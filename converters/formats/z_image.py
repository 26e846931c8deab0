"""Z-Image LoRA files, read into diffusers' `ZImageTransformer2DModel` module names.

One format reads the layouts Z-Image trainers write:

* diffusers names, bare or under `diffusion_model.` / `transformer.`:
  `diffusion_model.layers.0.attention.to_q.lora_A.weight` (`lora_down` / `lora_up`, PEFT adapter names such
  as `lora_A.default.weight`, `.alpha`, full diffs);
* kohya names (`lora_unet_layers_0_attention_to_q.lora_down.weight` + `.alpha`);
* the dotted factor names of some trainers (`layers.0.attention.to.q.lora.down.weight`), including the
  original model's fused `attention.qkv` (cut into equal thirds of its output rows: to_q, to_k, to_v) and
  `attention.out` (`to_out.0`);
* LyCORIS LoKr (`lokr_w1`, `lokr_w2_a` ...) with `.alpha` (applied as alpha/dim when a factor is
  decomposed, as LyCORIS does).

Module names are compared with dots as underscores and resolved against the target transformer's
modules, so `to.q`, `to_q` and `lora_unet_..._to_q` all find `attention.to_q`.

Z-Image keeps Lumina-2's block names (`layers`, `noise_refiner`, `context_refiner`, `feed_forward.w1`) but
its attention is `attention.to_q` (Lumina-2 diffusers: `attn.to_q`; Lumina-2 original: `attention.qkv`)
and its blocks modulate through `adaLN_modulation.0`; a file with those names is Z-Image, so this
format `supersedes` `lumina2` as well as the generic PEFT, kohya and prefixed-diffusers formats.
"""

from __future__ import annotations

import dataclasses
import re

from converters.engine import Format, Rule, register_format
from converters.formats import dit, kohya
from converters.formats.dit import M
from converters.records import Record

ROLES = {
    **dit.ROLES,
    **{k: v for k, v in kohya.ROLES.items() if k.startswith("lokr_") or k == "dora_scale"},
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
    "lora_magnitude_vector": "magnitude",
}

_BLOCK = r"(?P<b>(?:layers|noise_refiner|context_refiner)_\d+)"
# Over module names with dots as underscores.
Z_IMAGE_MAPS = (
    M(rf"{_BLOCK}_attention_qkv", "{b}_attention_to_q", "{b}_attention_to_k", "{b}_attention_to_v", rows="equal"),
    M(rf"{_BLOCK}_attention_out", "{b}_attention_to_out_0"),
)

_SPLIT = dit.splitter(Z_IMAGE_MAPS)


def split(rec: Record) -> list[Record]:
    """Module names with dots as underscores, then the fused `qkv` / bare `out` of the original model."""
    return _SPLIT(dataclasses.replace(rec, module=rec.module.replace(".", "_")))


COMPONENTS = {"diffusion_model": "transformer", "transformer": "transformer", "lora_unet": "transformer", None: "transformer"}

RULES = (
    Rule(
        r"(?:(?P<component>diffusion_model|transformer|lora_unet)[._])?(?P<module>[A-Za-z0-9_.\-]+?)\."
        + dit._role_pattern(ROLES),
        "{role}",
    ),
)

_BLOCK_NAME = r"(?:layers|noise_refiner|context_refiner)[._]\d+[._]"
Z_IMAGE_KEY = re.compile(
    r"(?:(?:diffusion_model|transformer)\.)?(?:"
    rf"{_BLOCK_NAME}attention[._](?:to[._][qkv]|to[._]out)[._]|"
    r"(?:layers|noise_refiner)[._]\d+[._]adaLN_modulation[._]0[._]|"
    r"all_(?:x_embedder|final_layer)[._])"
)
# diffusers' names of the feed-forward under the pipeline prefix (Lumina-2's diffusers names are linear_1..3).
Z_IMAGE_FFN_KEY = re.compile(rf"transformer\.{_BLOCK_NAME}feed_forward\.w[123]\.")
KOHYA_KEY = re.compile(rf"lora_unet_(?:{_BLOCK_NAME}|all_(?:x_embedder|final_layer)_)")
DOTTED_FACTOR_KEY = re.compile(rf".*{_BLOCK_NAME}.*\.lora\.(?:down|up)\.weight")


def is_z_image(keys: frozenset[str]) -> bool:
    return any(
        Z_IMAGE_KEY.match(k) or Z_IMAGE_FFN_KEY.match(k) or KOHYA_KEY.match(k) or DOTTED_FACTOR_KEY.fullmatch(k)
        for k in keys
    )


FORMAT = register_format(
    Format(
        name="z_image",
        supersedes=("peft", "kohya", "lumina2", "prefixed_diffusers", "kohya_dit", "diffusers_old", "diffusers_lokr"),
        rules=RULES,
        detect=is_z_image,
        components=COMPONENTS,
        roles=ROLES,
        underscored=True,
        split=split,
        description="Z-Image (diffusion_model.layers.0.attention.to_q, lora_unet_layers_0_..., .lora.down, fused qkv, LoKr)",
    )
)
