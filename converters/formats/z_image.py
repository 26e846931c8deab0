"""Z-Image LoRA files, read into diffusers' `ZImageTransformer2DModel` module names.

One format reads the layouts Z-Image trainers write:

* diffusers names, bare or under `diffusion_model.` / `transformer.`:
  `diffusion_model.layers.0.attention.to_q.lora_A.weight` (`lora_down` / `lora_up`, PEFT adapter names such
  as `lora_A.default.weight`, `.alpha`, full diffs);
* kohya names (`lora_unet_layers_0_attention_to_q.lora_down.weight` + `.alpha`);
* the dotted factor names of some trainers (`layers.0.attention.to.q.lora.down.weight`), including the
  original model's fused `attention.qkv` (cut into equal thirds of its output rows: to_q, to_k, to_v) and
  `attention.out` (`to_out.0`);
* Anime-Z files, which hold both the fused `qkv` / bare `out` and the split `to.q`/`to.k`/`to.v` / `to_out.0`:
  the fused ones are left out (`LoadReport.redundant`), as diffusers 0.42.1 does;
* LyCORIS LoKr (`lokr_w1`, `lokr_w2_a` ...) with `.alpha` (applied as alpha/dim when a factor is
  decomposed, as LyCORIS does).

Module names are compared with dots as underscores and resolved against the target transformer's
modules, so `to.q`, `to_q` and `lora_unet_..._to_q` all find `attention.to_q`.

Z-Image keeps Lumina-2's block names (`layers`, `noise_refiner`, `context_refiner`, `feed_forward.w1`) but
its attention is `attention.to_q` (Lumina-2 diffusers: `attn.to_q`; Lumina-2 original: `attention.qkv`)
and its blocks modulate through `adaLN_modulation.0`; a file with those names is Z-Image, so this
format `supersedes` `lumina2` as well as the generic PEFT, kohya and prefixed-diffusers formats. A file of only
the block modules both share (`diffusion_model.layers.0.feed_forward.w1`) is Lumina-2 by its keys, and Z-Image for
a Z-Image params tree or `family="z_image"` (`Format.detect_for`), as diffusers 0.42.1's Z-Image loader reads it.
"""

from __future__ import annotations

import dataclasses
import re

from converters.engine import Format, Rule, register_format
from converters.errors import InvalidAdapterError
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


_FUSED = re.compile(rf"{_BLOCK}_attention_(?P<fused>qkv|out)")
# fused module -> the split modules that repeat it (diffusers' names, dots as underscores)
_REPEATS = {"qkv": ("to_q", "to_k", "to_v"), "out": ("to_out_0",)}


def redundant(records: list[Record], malformed: dict[str, str] | None = None) -> dict[str, str]:
    """Keys of a fused `attention.qkv` (or bare `attention.out`) next to the split modules it repeats, as Anime-Z
    files hold both: diffusers 0.42.1 leaves the fused one out, and so does this; {key: why}.

    Raises:
      InvalidAdapterError: a `qkv` next to some but not all of `to_q`/`to_k`/`to_v` (which one holds the rest?);
        with `malformed` given, the fused module's keys are mapped to that message there instead.
    """
    by_module = {(r.component, r.module.replace(".", "_")): r for r in records}
    out: dict[str, str] = {}
    for (component, module), rec in by_module.items():
        m = _FUSED.fullmatch(module)
        if m is None:
            continue
        split = {name: by_module.get((component, f"{m['b']}_attention_{name}")) for name in _REPEATS[m["fused"]]}
        present = {name: r for name, r in split.items() if r is not None}
        if not present:
            continue
        if len(present) < len(split):
            error = InvalidAdapterError(
                f"{', '.join(rec.keys)} (fused {m['fused']}) and {', '.join(k for r in present.values() for k in r.keys)} "
                f"(split {sorted(present)}) both adapt {m['b'].replace('_', '.')}.attention, but "
                f"{sorted(set(split) - set(present))} has no split keys: remove the fused keys or the split ones."
            )
            if malformed is None:
                raise error
            malformed.update({k: str(error) for k in rec.keys})
            continue
        repeats = ", ".join(k for r in present.values() for k in r.keys if not k.endswith(".alpha"))
        out.update({k: f"repeats {repeats} (diffusers 0.42.1 leaves the fused {m['fused']} out)" for k in rec.keys})
    return out


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


_DOTTED_FACTOR_ENDS = (".lora.down.weight", ".lora.up.weight")  # what DOTTED_FACTOR_KEY's tail requires


def is_z_image(keys: frozenset[str]) -> bool:
    return any(
        Z_IMAGE_KEY.match(k) or Z_IMAGE_FFN_KEY.match(k) or KOHYA_KEY.match(k)
        or (k.endswith(_DOTTED_FACTOR_ENDS) and DOTTED_FACTOR_KEY.fullmatch(k))
        for k in keys
    )


# Block modules Z-Image shares with Lumina-2's original names (`diffusion_model.layers.0.feed_forward.w1`), and the
# Lumina-2-only ones (its fused `attention.qkv` / bare `attention.out` / `adaLN_modulation.1`).
SHARED_KEY = re.compile(
    rf"(?:(?:diffusion_model|transformer)\.)?{_BLOCK_NAME}(?:feed_forward[._]w[123]|attention_norm[12]|ffn_norm[12])[._]"
)
LUMINA2_ONLY_KEY = re.compile(rf"(?:(?:diffusion_model|transformer)\.)?{_BLOCK_NAME}(?:attention[._](?:qkv|out)|adaLN_modulation[._]1)[._]")
# Module names only ZImageTransformer2DModel has (Lumina-2's diffusers attention is `attn.to_q`).
Z_IMAGE_MODULE = re.compile(r"(?:layers|noise_refiner|context_refiner)\.\d+\.attention\.to_q|all_x_embedder\..+")


def z_image_target(modules: frozenset[str]) -> bool:
    """Whether the target's module names are a Z-Image transformer's."""
    return any(Z_IMAGE_MODULE.fullmatch(m) for m in modules)


def is_z_image_for(keys: frozenset[str], modules: frozenset[str] | None) -> bool:
    """Keys Lumina-2's original names share with Z-Image, for a Z-Image target (`modules`) or `family="z_image"`
    (`modules` None), as diffusers' `ZImageLoraLoaderMixin` reads them."""
    shared = any(SHARED_KEY.match(k) for k in keys) and not any(LUMINA2_ONLY_KEY.match(k) for k in keys)
    return shared and (modules is None or z_image_target(modules))


FORMAT = register_format(
    Format(
        name="z_image",
        supersedes=("peft", "kohya", "lumina2", "prefixed_diffusers", "kohya_dit", "diffusers_old", "diffusers_lokr"),
        rules=RULES,
        detect=is_z_image,
        detect_for=is_z_image_for,
        families=("z_image",),
        components=COMPONENTS,
        roles=ROLES,
        underscored=True,
        split=split,
        redundant=redundant,
        description="Z-Image (diffusion_model.layers.0.attention.to_q, lora_unet_layers_0_..., .lora.down, fused qkv, LoKr)",
    )
)
