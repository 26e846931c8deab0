"""LoRA layouts of the newest DiT families, read into diffusers' module names.

* `flux3`: Flux3 in its original names under `diffusion_model.`: `content_mode_blocks.image.0.q_proj`,
  `txt_mode_blocks.0.attn_out`, `single_blocks.0.mlp_in`; every other module already has its diffusers name.
* `krea2`: Krea 2 original names under `diffusion_model.` (reference trainer, ComfyUI) or `base_model.model.`
  (AI-Toolkit): `blocks.0.attn.wq`, `blocks.0.mlp.gate`, `txtfusion.refiner_blocks.0.attn.gate`, `first`, `tmlp.0`.
* `ideogram4`: Ideogram 4 original names, bare or under `diffusion_model.` / `conditional_transformer.`: fused
  `layers.0.attention.qkv` (q, k, v of equal widths), `attention.o`, lowercase `adaln_modulation`; the other
  modules (and diffusers-named files with a module only Ideogram 4 has) keep their names. A file of the names
  Lumina2 or Z-Image share is Ideogram 4 when the target params tree is an Ideogram 4 transformer.
* `minimax_h3`: MiniMax-H3 original names, bare or under `diffusion_model.`: fused `blocks.0.attn.qkv_proj`,
  `mlp.fc1` (SwiGLU `[gate; value]`, diffusers keeps `[value; gate]`: the two output halves swap),
  `token_refiner.blocks.0`, `final_layer.video_out`, `video_patch_proj`. A header entry `alpha` is the network
  alpha of a file without `.alpha` tensors (all three MiniMax-H3 formats).
* `musubi_minimax_h3`: musubi-tuner's MiniMax-H3 files, `lora_unet_blocks_0_attn_qkv_proj.lora_down.weight` + `.alpha`.
* `diffsynth_minimax_h3`: DiffSynth-Studio's MiniMax-H3 files, the original names with PEFT's adapter name
  (`blocks.0.attn.qkv_proj.lora_A.default.weight`), whose fused qkv keeps the checkpoint's per-head order
  `[head 0: q k v, head 1: q k v, ...]`: its up rows are regrouped to `[q; k; v]` (heads 128 wide, as in every
  released MiniMax-H3 partition) before the equal split.
* `anima`: Anima (the Cosmos Predict2 DiT and its LLM adapter) under `diffusion_model.`: `blocks.0.self_attn.q_proj`,
  `adaln_modulation_mlp.1`, `mlp.layer1`; `diffusion_model.llm_adapter.*` is the `text_conditioner` in its
  diffusers names.
* `ace_step`: ACE-Step 1.5 PEFT files in the original attention names, `base_model.model.layers.0.self_attn.q_proj`
  (`o_proj` is diffusers' `to_out.0`); the other modules keep their names.

The `Map` rows and the splitting of fused modules are those of `converters.formats.dit`. Each format here
`supersedes` the generic formats (and the older original-name formats) whose detectors also accept its files,
so a file has one format. Plain diffusers/PEFT files of these families (`transformer.` prefix) stay `peft`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping

import numpy as np

from converters.engine import Format, Rule, register_format
from converters.errors import InvalidAdapterError
from converters.formats import kohya
from converters.formats.dit import ROLES, M, _role_pattern, _underscored, map_rules, splitter
from converters.records import Record

_TRANSFORMER = {"diffusion_model": "transformer", "transformer": "transformer", None: "transformer"}

# ---- Flux3 --------------------------------------------------------------------------------------

_FLUX3_PROJ = (("q_proj", "attn.to_q"), ("k_proj", "attn.to_k"), ("v_proj", "attn.to_v"), ("attn_out", "attn.to_out.0"),
               ("mlp_in", "ff.linear_in"), ("mlp_out", "ff.linear_out"))
_FLUX3_BLOCKS = ((r"content_mode_blocks\.(?P<mode>[a-z_]+)\.(?P<i>\d+)", "mode_blocks.{mode}.{i}"),
                 (r"txt_mode_blocks\.(?P<i>\d+)", "txt_mode_blocks.{i}"),
                 (r"single_blocks\.(?P<i>\d+)", "single_transformer_blocks.{i}"))
FLUX3_MAPS = tuple(M(rf"{src}\.{p}", f"{dst}.{q}") for src, dst in _FLUX3_BLOCKS for p, q in _FLUX3_PROJ)

# ---- Krea 2 -------------------------------------------------------------------------------------

_KREA2_ATTN = (("wq", "to_q"), ("wk", "to_k"), ("wv", "to_v"), ("wo", "to_out.0"), ("gate", "to_gate"))
_KREA2_MLP = ("gate", "up", "down")
_KREA2_BLOCKS = ((r"blocks\.(?P<i>\d+)", "transformer_blocks.{i}"),
                 (r"txtfusion\.(?P<part>layerwise_blocks|refiner_blocks)\.(?P<i>\d+)", "text_fusion.{part}.{i}"))
KREA2_MAPS = (
    *(M(rf"{src}\.attn\.{a}", f"{dst}.attn.{b}") for src, dst in _KREA2_BLOCKS for a, b in _KREA2_ATTN),
    *(M(rf"{src}\.mlp\.{a}", f"{dst}.ff.{a}") for src, dst in _KREA2_BLOCKS for a in _KREA2_MLP),
    M(r"first", "img_in"),
    M(r"last\.linear", "final_layer.linear"),
    M(r"tmlp\.0", "time_embed.linear_1"),
    M(r"tmlp\.2", "time_embed.linear_2"),
    M(r"tproj\.1", "time_mod_proj"),
    M(r"txtmlp\.1", "txt_in.linear_1"),
    M(r"txtmlp\.3", "txt_in.linear_2"),
    M(r"txtfusion\.projector", "text_fusion.projector"),
)

# ---- Ideogram 4 ---------------------------------------------------------------------------------

_IL = r"layers\.(?P<i>\d+)"
IDEOGRAM4_MAPS = (
    M(rf"{_IL}\.attention\.qkv", "layers.{i}.attention.to_q", "layers.{i}.attention.to_k", "layers.{i}.attention.to_v",
      rows="equal"),
    M(rf"{_IL}\.attention\.o", "layers.{i}.attention.to_out.0"),
    *(M(rf"{_IL}\.feed_forward\.w{n}", f"layers.{{i}}.feed_forward.w{n}") for n in (1, 2, 3)),
    M(rf"{_IL}\.adaln_modulation", "layers.{i}.adaln_modulation"),
)

# ---- MiniMax-H3 ---------------------------------------------------------------------------------

_H3_BLOCKS = ((r"blocks\.(?P<i>\d+)", "transformer_blocks.{i}"),
              (r"token_refiner\.blocks\.(?P<i>\d+)", "token_refiner.refiner_blocks.{i}"))
MINIMAX_H3_MAPS = (
    *(m for src, dst in _H3_BLOCKS for m in (
        M(rf"{src}\.attn\.qkv_proj", f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v", rows="equal"),
        M(rf"{src}\.attn\.out_proj", f"{dst}.attn.to_out.0"),
        M(rf"{src}\.mlp\.fc1", f"{dst}.ff.net.0.proj", rows="swap"),
        M(rf"{src}\.mlp\.fc2", f"{dst}.ff.net.2"),
    )),
    M(r"blocks\.(?P<i>\d+)\.adaln_proj\.linear", "transformer_blocks.{i}.adaln_proj.linear"),
    M(r"video_patch_proj", "proj_in"),
    M(r"audio_patch_proj", "audio_proj_in"),
    M(r"condition_proj", "context_embedder"),
    M(r"time_embedder\.proj_in", "time_embedder.linear_1"),
    M(r"time_embedder\.proj_out", "time_embedder.linear_2"),
    M(r"final_layer\.adaln_proj\.linear", "norm_out.linear"),
    M(r"final_layer\.video_out", "proj_out"),
    M(r"final_layer\.audio_out", "audio_proj_out"),
)

# ---- Anima (Cosmos Predict2 DiT) ----------------------------------------------------------------

_AB = r"blocks\.(?P<i>\d+)"
_AT = "transformer_blocks.{i}"
_ANIMA_ATTN = (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"))
ANIMA_MAPS = (
    *(M(rf"{_AB}\.{src}\.{a}", f"{_AT}.{dst}.{b}") for src, dst in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in _ANIMA_ATTN),
    *(M(rf"{_AB}\.adaln_modulation_{src}\.(?P<n>[12])", f"{_AT}.{dst}.linear_{{n}}")
      for src, dst in (("self_attn", "norm1"), ("cross_attn", "norm2"), ("mlp", "norm3"))),
    M(rf"{_AB}\.mlp\.layer1", f"{_AT}.ff.net.0.proj"),
    M(rf"{_AB}\.mlp\.layer2", f"{_AT}.ff.net.2"),
    M(r"final_layer\.adaln_modulation\.(?P<n>[12])", "norm_out.linear_{n}"),
    M(r"final_layer\.linear", "proj_out"),
    M(r"t_embedder\.1\.(?P<n>linear_[12])", "time_embed.t_embedder.{n}"),
    M(r"t_embedding_norm", "time_embed.norm"),
    M(r"x_embedder\.proj\.1", "patch_embed.proj"),
)

# ---- ACE-Step 1.5 -------------------------------------------------------------------------------

_ACE_PROJ = (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("o_proj", "to_out.0"))
ACE_STEP_MAPS = tuple(M(rf"(?P<head>.+\.(?:self_attn|cross_attn))\.{a}", f"{{head}}.{b}") for a, b in _ACE_PROJ)


# ---- detection ----------------------------------------------------------------------------------

FLUX3_KEY = re.compile(
    r"diffusion_model\.(?:content_mode_blocks\.[a-z_]+|txt_mode_blocks|single_blocks)\.\d+\."
    r"(?:q_proj|k_proj|v_proj|attn_out|mlp_in|mlp_out)\."
)
KREA2_KEY = re.compile(
    r"(?:diffusion_model\.|base_model\.model\.)(?:(?:txtfusion\.(?:layerwise|refiner)_)?blocks\.\d+\.(?:attn\.(?:wq|wk|wv|wo|gate)|"
    r"mlp\.(?:gate|up|down))|first|last\.linear|tmlp\.[02]|tproj\.1|txtmlp\.[13]|txtfusion\.projector)\."
)
# `attention.qkv` and `feed_forward.w*` are also Lumina2's names, and Ideogram 4's diffusers names are Z-Image's:
# a file is Ideogram 4 by the names those lack (a file of shared names only reads as Lumina2 or Z-Image).
IDEOGRAM4_KEY = re.compile(
    r"(?:(?:diffusion_model|conditional_transformer|transformer)\.)?(?:layers\.\d+\.(?:attention\.o|adaln_modulation(?!\.\d))|"
    r"input_proj|llm_cond_proj|t_embedding\.mlp_(?:in|out)|adaln_proj|final_layer\.adaln_modulation(?!\.\d))\."
    r"|conditional_transformer\.layers\.\d+\.(?:attention\.qkv|feed_forward\.w[123])\."
)
# Names Ideogram 4 shares with Lumina2 (original) and Z-Image (diffusers), and modules only Ideogram 4 has: such a
# file is Ideogram 4 when the target model is.
IDEOGRAM4_SHARED_KEY = re.compile(
    r"(?:(?:diffusion_model|conditional_transformer|transformer)\.)?layers\.\d+\."
    r"(?:attention\.(?:qkv|to_[qkv]|to_out\.0)|feed_forward\.w[123])\."
)
IDEOGRAM4_MODULE = re.compile(r"llm_cond_proj|adaln_proj|layers\.\d+\.adaln_modulation")


def is_ideogram4_target(keys: frozenset[str], modules: frozenset[str]) -> bool:
    return any(IDEOGRAM4_MODULE.fullmatch(m) for m in modules) and any(IDEOGRAM4_SHARED_KEY.match(k) for k in keys)


MINIMAX_H3_KEY = re.compile(
    r"(?:diffusion_model\.)?(?:(?:token_refiner\.)?blocks\.\d+\.(?:attn\.(?:qkv|out)_proj|mlp\.fc[12]|adaln_proj\.linear)|"
    r"final_layer\.(?:adaln_proj\.linear|video_out|audio_out)|(?:video|audio)_patch_proj|condition_proj|"
    r"time_embedder\.proj_(?:in|out))\."
)
MUSUBI_MINIMAX_H3_KEY = re.compile(
    r"lora_unet_(?:(?:token_refiner_)?blocks_\d+_(?:attn_(?:qkv|out)_proj|mlp_fc[12]|adaln_proj_linear)|"
    r"final_layer_(?:adaln_proj_linear|video_out|audio_out)|(?:video|audio)_patch_proj|condition_proj|"
    r"time_embedder_proj_(?:in|out))\."
)
DIFFSYNTH_MINIMAX_H3_KEY = re.compile(MINIMAX_H3_KEY.pattern[:-2] + r"\.lora_[AB]\.default\.weight")
ANIMA_KEY = re.compile(
    r"diffusion_model\.(?:blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|output_proj)|"
    r"adaln_modulation_(?:self_attn|cross_attn|mlp)\.[12]|mlp\.layer[12])|final_layer\.adaln_modulation\.[12]|"
    r"x_embedder\.proj\.1|t_embedder\.1\.|llm_adapter\.)"
)
ACE_STEP_KEY = re.compile(r"(?:base_model\.model\.)?layers\.\d+\.(?:self_attn|cross_attn)\.[qkvo]_proj\.lora_[AB]\.")


def _detector(regex: re.Pattern) -> Callable[[frozenset[str]], bool]:
    return lambda keys: any(regex.match(k) for k in keys)


# ---- formats ------------------------------------------------------------------------------------

_GENERIC = r"(?P<module>[A-Za-z0-9_.]+?)\."


def _mapped(name, maps, prefix, components, roles, detect, supersedes, description, header_config=None) -> Format:
    return register_format(Format(name=name, supersedes=supersedes, rules=map_rules(prefix, maps, roles),
                                  detect=detect, components=components, roles=roles, split=splitter(maps),
                                  description=description, header_config=header_config))


def h3_header_alpha(header: Mapping[str, str], keys: frozenset[str], origin: str) -> dict:
    """MiniMax-H3 trainers may record one network alpha as the header entry `alpha` (every module scaled by
    alpha / rank); per-module `.alpha` tensors win over it."""
    if "alpha" not in header or any(k.endswith(".alpha") for k in keys):
        return {}
    try:
        alpha = float(header["alpha"])
    except (TypeError, ValueError):
        alpha = float("nan")
    if not math.isfinite(alpha):
        raise InvalidAdapterError(
            f"{origin}: the header entry 'alpha' is {header['alpha']!r}; a MiniMax-H3 file records its network alpha "
            "there as a number. Fix or remove the entry (without it, alpha = rank)."
        )
    return {"lora_alpha": alpha}


def _renamed(name, maps, prefix, components, detect, supersedes, description, detect_for=None) -> Format:
    """Any module under `prefix`; the maps rename some, the rest keep their (diffusers) names."""
    return register_format(Format(name=name, supersedes=supersedes,
                                  rules=(Rule(prefix + _GENERIC + _role_pattern(ROLES), "{role}"),),
                                  detect=detect, components=components, roles=ROLES, split=splitter(maps),
                                  description=description, detect_for=detect_for))


def _only(component: str, split: Callable[[Record], list[Record]]) -> Callable[[Record], list[Record]]:
    """`split` for the records of one component; the others keep their names."""
    return lambda rec: split(rec) if rec.component == component else [rec]


FLUX3 = _renamed("flux3", FLUX3_MAPS, r"(?P<component>diffusion_model)\.", _TRANSFORMER, _detector(FLUX3_KEY),
                 ("peft", "prefixed_diffusers", "comfy_flux"),
                 "Flux3 original names (diffusion_model.content_mode_blocks.image.0.q_proj, single_blocks.0.mlp_in)")
KREA2 = _mapped("krea2", KREA2_MAPS, r"(?:(?P<component>diffusion_model|base_model\.model)\.)",
                {"diffusion_model": "transformer", "base_model.model": "transformer"}, ROLES, _detector(KREA2_KEY),
                ("peft", "prefixed_diffusers"), "Krea 2 original names (diffusion_model.blocks.0.attn.wq, tmlp.0)")
IDEOGRAM4 = _renamed("ideogram4", IDEOGRAM4_MAPS,
                     r"(?:(?P<component>diffusion_model|conditional_transformer|transformer)\.)?",
                     {"diffusion_model": "transformer", "conditional_transformer": "transformer",
                      "transformer": "transformer", None: "transformer"},
                     _detector(IDEOGRAM4_KEY), ("peft", "prefixed_diffusers", "lumina2", "z_image"),
                     "Ideogram 4 original names (layers.0.attention.qkv, attention.o, adaln_modulation)",
                     detect_for=is_ideogram4_target)
MINIMAX_H3 = _mapped("minimax_h3", MINIMAX_H3_MAPS, r"(?:(?P<component>diffusion_model)\.)?", _TRANSFORMER, ROLES,
                     _detector(MINIMAX_H3_KEY), ("peft", "prefixed_diffusers"),
                     "MiniMax-H3 original names (blocks.0.attn.qkv_proj, mlp.fc1, final_layer.video_out)", h3_header_alpha)
MUSUBI_MINIMAX_H3 = _mapped("musubi_minimax_h3", _underscored(MINIMAX_H3_MAPS), r"(?P<component>lora_unet)_",
                            {"lora_unet": "transformer"}, kohya.ROLES, _detector(MUSUBI_MINIMAX_H3_KEY),
                            ("kohya", "kohya_dit"), "musubi-tuner MiniMax-H3 (lora_unet_blocks_0_attn_qkv_proj)",
                            h3_header_alpha)
H3_HEAD_DIM = 128
_H3_QKV = re.compile(r"(?:token_refiner\.)?blocks\.\d+\.attn\.qkv_proj")
_H3_SPLIT = splitter(MINIMAX_H3_MAPS)


def _diffsynth_h3_split(rec: Record) -> list[Record]:
    """Per-head interleaved qkv rows -> `[q; k; v]`, then the MiniMax-H3 maps."""
    if _H3_QKV.fullmatch(rec.module) and "up" in rec.tensors:
        rows = rec.tensors["up"].shape[0]
        if rows % (3 * H3_HEAD_DIM):
            raise InvalidAdapterError(
                f"{rec.sources['up']}: {rows} output rows are not a multiple of 3 x {H3_HEAD_DIM}; a DiffSynth "
                f"MiniMax-H3 qkv is per-head interleaved with {H3_HEAD_DIM}-wide heads (the released models' width); "
                "is this LoRA for another model?"
            )
        order = np.arange(rows).reshape(-1, 3, H3_HEAD_DIM).transpose(1, 0, 2).reshape(-1)
        rec = dataclasses.replace(rec, tensors={r: (t[order] if r in ("up", "up_bias") else t)
                                                for r, t in rec.tensors.items()})
    return _H3_SPLIT(rec)


DIFFSYNTH_MINIMAX_H3 = register_format(Format(
    name="diffsynth_minimax_h3",
    supersedes=("peft", "minimax_h3"),
    rules=map_rules(r"(?:(?P<component>diffusion_model)\.)?", MINIMAX_H3_MAPS,
                    {"lora_A.default.weight": "down", "lora_B.default.weight": "up"}),
    detect=_detector(DIFFSYNTH_MINIMAX_H3_KEY),
    components=_TRANSFORMER,
    roles={"lora_A.default.weight": "down", "lora_B.default.weight": "up"},
    split=_diffsynth_h3_split,
    description="DiffSynth-Studio MiniMax-H3 (blocks.0.attn.qkv_proj.lora_A.default.weight, per-head interleaved qkv)",
    header_config=h3_header_alpha,
))
ANIMA = register_format(Format(
    name="anima",
    supersedes=("peft", "prefixed_diffusers", "wan"),
    rules=(*map_rules(r"(?P<component>diffusion_model)\.", ANIMA_MAPS, ROLES),
           Rule(r"diffusion_model\.(?P<component>llm_adapter)\." + _GENERIC + _role_pattern(ROLES), "{role}")),
    detect=_detector(ANIMA_KEY),
    components={"diffusion_model": "transformer", "llm_adapter": "text_conditioner"},
    roles=ROLES,
    split=_only("transformer", splitter(ANIMA_MAPS)),
    description="Anima original names (diffusion_model.blocks.0.self_attn.q_proj; llm_adapter. = text_conditioner)",
))
ACE_STEP = _renamed("ace_step", ACE_STEP_MAPS, r"(?:(?P<component>base_model\.model|transformer)\.)?",
                    {"base_model.model": "transformer", "transformer": "transformer", None: "transformer"},
                    _detector(ACE_STEP_KEY), ("peft",),
                    "ACE-Step 1.5 original attention names (base_model.model.layers.0.self_attn.q_proj)")

NEWEST_DIT_FORMATS = tuple(f.name for f in (FLUX3, KREA2, IDEOGRAM4, MINIMAX_H3, MUSUBI_MINIMAX_H3, DIFFSYNTH_MINIMAX_H3,
                                            ANIMA, ACE_STEP))
