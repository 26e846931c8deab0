"""Flux.2 LoRA and LoKr layouts, read into the module names of diffusers' `Flux2Transformer2DModel`.

* `flux2`: the original (BFL) module names, as ai-toolkit and other trainers write them:
  `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or `base_model.model.`, `transformer.` or no
  prefix; `lora_down` / `lora_up` + `.alpha`; LyCORIS LoKr `lokr_w1`, `lokr_w2_a`, ... + `.alpha`).
* `kohya_flux2`: the same names underscored under `lora_unet_` (`lora_unet_double_blocks_0_img_attn_qkv`).
* `diffusers_lokr`: PEFT LoKr keys as diffusers loads them and `jlora.save_lora_weights` writes them,
  `transformer.{diffusers module}.lokr_w1` / `lokr_w2`; also bare dotted module names with decomposed factors and
  `.alpha` (SimpleTuner exports).
* `lycoris_prefixed`: LyCORIS networks wrapped around a diffusers model, `lycoris_` + the diffusers module
  name underscored (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`), resolved against the target's modules.

Flux.2's BFL names are Flux.1's, but the modules behind them differ: a double block's `img_mlp.0` is
`ff.linear_in` (a SwiGLU input of twice the hidden width), a single block's fused `linear1` stays whole as
`attn.to_qkv_mlp_proj` and `linear2` is `attn.to_out`; the modulations are shared by all blocks
(`double_stream_modulation_img`, `double_stream_modulation_txt`, `single_stream_modulation`). A file that names
one of those shared modulations is a Flux.2 file; any other BFL-named file is read as Flux.2 when the target
model has Flux.2 modules (`Format.detect_for`), else as Flux.1.

Fused sources split as in `converters.formats.dit`: `img_attn.qkv` / `txt_attn.qkv` into three equal row blocks
(each keeps the down factor), `final_layer.adaLN_modulation.1` has its (shift, scale) halves exchanged into
diffusers' (scale, shift) order. A LoKr on a source that is split or reordered becomes its full delta
(`factor * kron(w1, w2)`) first, since a Kronecker product does not cut into Kronecker pieces in general.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np

from converters.engine import Format, Rule, register_format
from converters.errors import InvalidAdapterError
from converters.formats import dit, kohya
from converters.formats.dit import M, Map
from converters.formats.peft import COMPONENTS as PEFT_COMPONENTS
from converters.layout import _lokr_factor
from converters.records import Record

_DB, _SB = r"double_blocks\.(?P<i>\d+)", r"single_blocks\.(?P<i>\d+)"
_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_EMB = "time_guidance_embed"

FLUX2_MAPS: tuple[Map, ...] = (
    M(rf"{_DB}\.img_attn\.qkv", f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v", rows="equal"),
    M(rf"{_DB}\.txt_attn\.qkv", f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj", rows="equal"),
    M(rf"{_DB}\.img_attn\.proj", f"{_D}.attn.to_out.0"),
    M(rf"{_DB}\.txt_attn\.proj", f"{_D}.attn.to_add_out"),
    M(rf"{_DB}\.img_attn\.norm\.query_norm", f"{_D}.attn.norm_q"),
    M(rf"{_DB}\.img_attn\.norm\.key_norm", f"{_D}.attn.norm_k"),
    M(rf"{_DB}\.txt_attn\.norm\.query_norm", f"{_D}.attn.norm_added_q"),
    M(rf"{_DB}\.txt_attn\.norm\.key_norm", f"{_D}.attn.norm_added_k"),
    M(rf"{_DB}\.img_mlp\.0", f"{_D}.ff.linear_in"),
    M(rf"{_DB}\.img_mlp\.2", f"{_D}.ff.linear_out"),
    M(rf"{_DB}\.txt_mlp\.0", f"{_D}.ff_context.linear_in"),
    M(rf"{_DB}\.txt_mlp\.2", f"{_D}.ff_context.linear_out"),
    M(rf"{_SB}\.linear1", f"{_S}.attn.to_qkv_mlp_proj"),
    M(rf"{_SB}\.linear2", f"{_S}.attn.to_out"),
    M(rf"{_SB}\.norm\.query_norm", f"{_S}.attn.norm_q"),
    M(rf"{_SB}\.norm\.key_norm", f"{_S}.attn.norm_k"),
    M(r"img_in", "x_embedder"),
    M(r"txt_in", "context_embedder"),
    M(r"time_in\.in_layer", f"{_EMB}.timestep_embedder.linear_1"),
    M(r"time_in\.out_layer", f"{_EMB}.timestep_embedder.linear_2"),
    M(r"guidance_in\.in_layer", f"{_EMB}.guidance_embedder.linear_1"),
    M(r"guidance_in\.out_layer", f"{_EMB}.guidance_embedder.linear_2"),
    M(r"double_stream_modulation_img\.lin", "double_stream_modulation_img.linear"),
    M(r"double_stream_modulation_txt\.lin", "double_stream_modulation_txt.linear"),
    M(r"single_stream_modulation\.lin", "single_stream_modulation.linear"),
    M(r"final_layer\.linear", "proj_out"),
    M(r"final_layer\.adaLN_modulation\.1", "norm_out.linear", rows="swap"),
)

# Factor and diff suffixes of the dotted layout, plus LyCORIS LoKr (and LoHa) factors.
ROLES = {**dit.ROLES, **{k: v for k, v in kohya.ROLES.items() if k.startswith(("lokr_", "hada_"))}}


# ---- LoKr on split sources ------------------------------------------------------------------


def lokr_as_diff(rec: Record) -> Record:
    """A 2-D LoKr record as a full-delta record: `factor * kron(w1, w2)`, factor = alpha / rank when decomposed."""
    t = rec.tensors
    if "lokr_t2" in t or any(v.ndim != 2 for v in t.values()):
        raise InvalidAdapterError(
            f"{rec.keys[0]}: a conv or Tucker LoKr on the fused {rec.module!r} cannot be split; only 2-D factors can."
        )
    w1, w2 = _lokr_factor(t, "1").astype(np.float64), _lokr_factor(t, "2").astype(np.float64)
    decomposed = "lokr_w1a" in t or "lokr_w2a" in t
    factor = rec.alpha / rec.rank if decomposed and rec.alpha is not None else 1.0
    delta = (factor * np.kron(w1, w2)).astype(np.float32)
    first = rec.sources.get("lokr_w1", rec.sources.get("lokr_w1a", rec.keys[0]))
    return dataclasses.replace(rec, kind="diff", tensors={"diff": delta}, sources={"diff": first, **rec.sources},
                               alpha=None)


def splitter(maps: Iterable[Map]):
    """`dit.splitter` of `maps`, with LoKr records on split or reordered sources turned into full deltas first."""
    maps = tuple(maps)
    base = dit.splitter(maps)
    reshaped = [re.compile(m.source) for m in maps if m.rows != "whole"]

    def split(rec: Record) -> list[Record]:
        if rec.kind == "lokr" and any(r.fullmatch(rec.module) for r in reshaped):
            rec = lokr_as_diff(rec)
        return base(rec)

    return split


# ---- detection ------------------------------------------------------------------------------

_PREFIX = r"(?:(?P<component>diffusion_model|transformer)\.|base_model\.model\.)?"
_TOP = (r"(?:double_blocks\.\d+\.|single_blocks\.\d+\.|img_in\.|txt_in\.|time_in\.|guidance_in\.|final_layer\.|"
        r"double_stream_modulation_(?:img|txt)\.lin\.|single_stream_modulation\.lin\.)")
BFL_KEY = re.compile(r"(?:diffusion_model\.|transformer\.|base_model\.model\.)?" + _TOP)
MARKER = re.compile(r"(?:^|[._])(?:double_stream_modulation_(?:img|txt)|single_stream_modulation)[._]lin[._]")
KOHYA_KEY = re.compile(r"lora_unet_(?:double_blocks_\d+_|single_blocks_\d+_|double_stream_modulation_|"
                       r"single_stream_modulation_)")
LYCORIS_KEY = re.compile(r"lycoris_[A-Za-z0-9_]+\.")
# Module names only Flux2Transformer2DModel has.
FLUX2_MODULE = re.compile(r"(?:.*\.)?(?:to_qkv_mlp_proj|double_stream_modulation_img\.linear|single_stream_modulation\.linear)")


def _has_marker(keys: frozenset[str]) -> bool:
    return any(MARKER.search(k) for k in keys)


def flux2_target(modules: frozenset[str]) -> bool:
    """Whether the target's module names are a Flux.2 transformer's."""
    return any(FLUX2_MODULE.fullmatch(m) for m in modules)


def is_bfl_flux2(keys: frozenset[str]) -> bool:
    return all(BFL_KEY.match(k) for k in keys) and _has_marker(keys)


def is_kohya_flux2(keys: frozenset[str]) -> bool:
    return all(k.startswith("lora_unet_") for k in keys) and _has_marker(keys)


def _all_bfl(keys: frozenset[str]) -> bool:
    return bool(keys) and all(BFL_KEY.match(k) for k in keys)


def _all_kohya_bfl(keys: frozenset[str]) -> bool:
    return any(KOHYA_KEY.match(k) for k in keys) and all(k.startswith("lora_unet_") for k in keys)


# ---- formats --------------------------------------------------------------------------------

_TRANSFORMER = {"diffusion_model": "transformer", "transformer": "transformer", None: "transformer"}

FLUX2 = register_format(
    Format(
        name="flux2",
        supersedes=("peft", "comfy_flux", "bfl_flux", "fal_kontext", "hunyuan_video", "diffusers_lokr"),
        rules=dit.map_rules(_PREFIX, FLUX2_MAPS, ROLES),
        detect=is_bfl_flux2,
        detect_for=lambda keys, modules: _all_bfl(keys) and flux2_target(modules),
        components=_TRANSFORMER,
        roles=ROLES,
        split=splitter(FLUX2_MAPS),
        description="Flux.2 BFL names (ai-toolkit diffusion_model.double_blocks.0.img_attn.qkv, LoKr, base_model.model.)",
    )
)
KOHYA_FLUX2 = register_format(
    Format(
        name="kohya_flux2",
        supersedes=("kohya", "kohya_flux", "kohya_dit", "musubi_wan"),
        rules=dit.map_rules(r"(?P<component>lora_unet)_", dit._underscored(FLUX2_MAPS), kohya.ROLES),
        detect=is_kohya_flux2,
        detect_for=lambda keys, modules: _all_kohya_bfl(keys) and flux2_target(modules),
        components={"lora_unet": "transformer"},
        roles=kohya.ROLES,
        split=splitter(dit._underscored(FLUX2_MAPS)),
        description="kohya Flux.2 (lora_unet_double_blocks_0_img_attn_qkv, lora_unet_single_blocks_0_linear1)",
    )
)
LYCORIS_PREFIXED = register_format(
    Format(
        name="lycoris_prefixed",
        rules=(Rule(r"(?P<component>lycoris)_(?P<module>[A-Za-z0-9_]+?)\." + dit._role_pattern(kohya.ROLES), "{role}"),),
        detect=lambda keys: any(k.startswith("lycoris_") for k in keys),
        components={"lycoris": "transformer"},
        roles=kohya.ROLES,
        underscored=True,
        description="LyCORIS around a diffusers model (lycoris_transformer_blocks_0_attn_to_q.lokr_w1)",
    )
)
_LOKR_ROLES = {k: v for k, v in kohya.ROLES.items() if k.startswith("lokr_") or k == "alpha"}
# `transformer.` (or another component) and a dotted diffusers module name; bare dotted names too (SimpleTuner).
LOKR_KEY = re.compile(r"(?:(?P<component>" + "|".join(PEFT_COMPONENTS) + r")\.)?"
                      r"(?P<module>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)+?)\." + dit._role_pattern(_LOKR_ROLES))


def is_diffusers_lokr(keys: frozenset[str]) -> bool:
    return any(".lokr_" in k for k in keys) and all(LOKR_KEY.fullmatch(k) for k in keys)


DIFFUSERS_LOKR = register_format(
    Format(
        name="diffusers_lokr",
        rules=(Rule(LOKR_KEY.pattern, "{role}"),),
        detect=is_diffusers_lokr,
        roles=_LOKR_ROLES,
        description="PEFT LoKr in diffusers names (transformer.transformer_blocks.0.attn.to_q.lokr_w1, or bare + .alpha)",
    )
)
