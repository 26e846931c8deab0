"""LoRA layouts of other DiT families, read into diffusers' module names.

* `wan`: Wan 2.x in its original names (the Wan repo, ComfyUI): `diffusion_model.blocks.0.self_attn.q.lora_down.weight`
  (or `lora_A`/`lora_B`), `.alpha`, full diffs `.diff` / `.diff_b` and `.set_weight` (norms included), `head.head`,
  `text_embedding.0`, `time_projection.1`, the Conv3d `patch_embedding`, image-to-video `cross_attn.k_img` and `img_emb.proj.1`.
* `musubi_wan`: musubi-tuner's Wan files, `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`
  (and the LyCORIS roles of kohya files).
* `hunyuan_video`: HunyuanVideo in its original names: fused `img_attn_qkv` / `txt_attn_qkv`, single-block
  `linear1` (q, k, v, mlp), the Conv3d `img_in.proj`, token refiner `txt_in.individual_token_refiner.blocks.0.self_attn_qkv`.
* `lumina2`: Lumina-Image-2.0 in its original names: grouped-query `attention.qkv`, `feed_forward.w1`.
* `prefixed_diffusers`: diffusers module names under `diffusion_model.` (LTX-Video, HiDream, ComfyUI-saved
  files) or with kohya roles (`transformer_blocks.0.attn.to_q.lora_down.weight` + `.alpha`, Qwen-Image).
* `kohya_dit`: `lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight` (Qwen-Image): diffusers names
  with underscores, resolved against the target transformer's modules.

A `Map` row names one source module (an anchored regex with named groups) and the diffusers module(s)
it becomes. A fused source lists several targets and how its output rows divide among them (`rows`):
every piece keeps the down factor and alpha, and takes its rows of the up factor, bias delta, diff and
set weight.
Widths come from the file (the down factor's input features), never from a released model's size.

These files also look like generic PEFT, kohya or ComfyUI-Flux files to those formats' detectors; each
format here `supersedes` those, so a file has one format.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import numpy as np

from converters.engine import Format, Rule, register_format
from converters.errors import InvalidAdapterError
from converters.formats import kohya
from converters.formats.peft import COMPONENTS as PEFT_COMPONENTS
from converters.records import Record

# Tensor suffix -> role, for the dotted layouts (PEFT and kohya factor names, full diffs, set weights).
ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "diff": "diff",
    "diff_b": "diff_b",
    "set_weight": "set",
}

# How a fused source's output rows divide among its targets (n_in: the source's input features).
ROW_SPLITS: dict[str, Callable[[int, int | None, int], list[int] | None]] = {
    "equal": lambda rows, n_in, parts: [rows // parts] * parts if rows % parts == 0 else None,
    # HunyuanVideo single blocks: q, k, v of hidden size each, the MLP gets the rest.
    "qkv_mlp": lambda rows, n_in, parts: (
        [n_in] * 3 + [rows - 3 * n_in] if n_in is not None and rows > 3 * n_in else None
    ),
    # Grouped-query attention: q of hidden size, k and v share the rest equally.
    "q_kv": lambda rows, n_in, parts: (
        [n_in] + [(rows - n_in) // 2] * 2 if n_in is not None and rows > n_in and (rows - n_in) % 2 == 0 else None
    ),
}
_ROW_ROLES = ("up", "up_bias", "diff", "diff_b", "set")


@dataclasses.dataclass(frozen=True)
class Map:
    """`source` module regex (named groups) -> diffusers `targets` (templates over the groups).

    `rows`: `whole` (one target, unchanged), `swap` (one target, the two halves of the output rows
    exchanged: (shift, scale) -> (scale, shift)) or a `ROW_SPLITS` name (one piece per target).
    """

    source: str
    targets: tuple[str, ...]
    rows: str = "whole"


def M(source: str, *targets: str, rows: str = "whole") -> Map:
    return Map(source, targets, rows)


def _underscored(maps: Iterable[Map]) -> tuple[Map, ...]:
    """The same maps over kohya-style source names (dots as underscores)."""
    return tuple(dataclasses.replace(m, source=m.source.replace(r"\.", "_")) for m in maps)


# ---- Wan 2.x (Wan repo names) ---------------------------------------------------------------

_B = r"blocks\.(?P<i>\d+)"
_WAN_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("norm_q", "norm_q"), ("norm_k", "norm_k"))
WAN_MAPS = (
    *(M(rf"{_B}\.self_attn\.{src}", f"blocks.{{i}}.attn1.{dst}") for src, dst in _WAN_ATTN),
    *(M(rf"{_B}\.cross_attn\.{src}", f"blocks.{{i}}.attn2.{dst}") for src, dst in _WAN_ATTN),
    M(rf"{_B}\.cross_attn\.k_img", "blocks.{i}.attn2.add_k_proj"),
    M(rf"{_B}\.cross_attn\.v_img", "blocks.{i}.attn2.add_v_proj"),
    M(rf"{_B}\.cross_attn\.norm_k_img", "blocks.{i}.attn2.norm_added_k"),
    M(rf"{_B}\.ffn\.0", "blocks.{i}.ffn.net.0.proj"),
    M(rf"{_B}\.ffn\.2", "blocks.{i}.ffn.net.2"),
    M(rf"{_B}\.norm3", "blocks.{i}.norm2"),  # the affine cross-attention norm
    M(r"head\.head", "proj_out"),
    M(r"patch_embedding", "patch_embedding"),  # Conv3d
    M(r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    M(r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    M(r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    M(r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    M(r"time_projection\.1", "condition_embedder.time_proj"),
    M(r"img_emb\.proj\.0", "condition_embedder.image_embedder.norm1"),
    M(r"img_emb\.proj\.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    M(r"img_emb\.proj\.3", "condition_embedder.image_embedder.ff.net.2"),
    M(r"img_emb\.proj\.4", "condition_embedder.image_embedder.norm2"),
)

# ---- HunyuanVideo (original names) ----------------------------------------------------------

_HD, _HS = r"double_blocks\.(?P<i>\d+)", r"single_blocks\.(?P<i>\d+)"
_HR = r"txt_in\.individual_token_refiner\.blocks\.(?P<i>\d+)"
_D, _S = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
_R = "context_embedder.token_refiner.refiner_blocks.{i}"
HUNYUAN_VIDEO_MAPS = (
    M(rf"{_HD}\.img_attn_qkv", f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v", rows="equal"),
    M(rf"{_HD}\.txt_attn_qkv", f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj", rows="equal"),
    M(rf"{_HD}\.img_attn_proj", f"{_D}.attn.to_out.0"),
    M(rf"{_HD}\.txt_attn_proj", f"{_D}.attn.to_add_out"),
    M(rf"{_HD}\.img_attn_q_norm", f"{_D}.attn.norm_q"),
    M(rf"{_HD}\.img_attn_k_norm", f"{_D}.attn.norm_k"),
    M(rf"{_HD}\.txt_attn_q_norm", f"{_D}.attn.norm_added_q"),
    M(rf"{_HD}\.txt_attn_k_norm", f"{_D}.attn.norm_added_k"),
    M(rf"{_HD}\.img_mod\.linear", f"{_D}.norm1.linear"),
    M(rf"{_HD}\.txt_mod\.linear", f"{_D}.norm1_context.linear"),
    M(rf"{_HD}\.img_mlp\.fc1", f"{_D}.ff.net.0.proj"),
    M(rf"{_HD}\.img_mlp\.fc2", f"{_D}.ff.net.2"),
    M(rf"{_HD}\.txt_mlp\.fc1", f"{_D}.ff_context.net.0.proj"),
    M(rf"{_HD}\.txt_mlp\.fc2", f"{_D}.ff_context.net.2"),
    M(rf"{_HS}\.linear1", f"{_S}.attn.to_q", f"{_S}.attn.to_k", f"{_S}.attn.to_v", f"{_S}.proj_mlp", rows="qkv_mlp"),
    M(rf"{_HS}\.linear2", f"{_S}.proj_out"),
    M(rf"{_HS}\.q_norm", f"{_S}.attn.norm_q"),
    M(rf"{_HS}\.k_norm", f"{_S}.attn.norm_k"),
    M(rf"{_HS}\.modulation\.linear", f"{_S}.norm.linear"),
    M(rf"{_HR}\.self_attn_qkv", f"{_R}.attn.to_q", f"{_R}.attn.to_k", f"{_R}.attn.to_v", rows="equal"),
    M(rf"{_HR}\.self_attn_proj", f"{_R}.attn.to_out.0"),
    M(rf"{_HR}\.norm1", f"{_R}.norm1"),
    M(rf"{_HR}\.norm2", f"{_R}.norm2"),
    M(rf"{_HR}\.mlp\.fc1", f"{_R}.ff.net.0.proj"),
    M(rf"{_HR}\.mlp\.fc2", f"{_R}.ff.net.2"),
    M(rf"{_HR}\.adaLN_modulation\.1", f"{_R}.norm_out.linear"),
    M(r"img_in\.proj", "x_embedder.proj"),  # Conv3d
    M(r"txt_in\.input_embedder", "context_embedder.proj_in"),
    M(r"txt_in\.t_embedder\.mlp\.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    M(r"txt_in\.t_embedder\.mlp\.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    M(r"txt_in\.c_embedder\.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    M(r"txt_in\.c_embedder\.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    M(r"time_in\.mlp\.0", "time_text_embed.timestep_embedder.linear_1"),
    M(r"time_in\.mlp\.2", "time_text_embed.timestep_embedder.linear_2"),
    M(r"guidance_in\.mlp\.0", "time_text_embed.guidance_embedder.linear_1"),
    M(r"guidance_in\.mlp\.2", "time_text_embed.guidance_embedder.linear_2"),
    M(r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    M(r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    M(r"final_layer\.linear", "proj_out"),
    M(r"final_layer\.adaLN_modulation\.1", "norm_out.linear", rows="swap"),
)

# ---- Lumina-Image-2.0 (original names) ------------------------------------------------------

_LB = r"(?P<part>layers|noise_refiner|context_refiner)\.(?P<i>\d+)"
_L = "{part}.{i}"
LUMINA2_MAPS = (
    M(rf"{_LB}\.attention\.qkv", f"{_L}.attn.to_q", f"{_L}.attn.to_k", f"{_L}.attn.to_v", rows="q_kv"),
    M(rf"{_LB}\.attention\.out", f"{_L}.attn.to_out.0"),
    M(rf"{_LB}\.attention\.q_norm", f"{_L}.attn.norm_q"),
    M(rf"{_LB}\.attention\.k_norm", f"{_L}.attn.norm_k"),
    *(M(rf"{_LB}\.feed_forward\.w{n}", f"{_L}.feed_forward.linear_{n}") for n in (1, 2, 3)),
    M(rf"{_LB}\.adaLN_modulation\.1", f"{_L}.norm1.linear"),
    # The refiner without modulation has a plain norm1; the modulated blocks' norm sits in norm1.norm.
    M(r"(?P<part>context_refiner)\.(?P<i>\d+)\.attention_norm1", f"{_L}.norm1"),
    M(r"(?P<part>layers|noise_refiner)\.(?P<i>\d+)\.attention_norm1", f"{_L}.norm1.norm"),
    M(rf"{_LB}\.attention_norm2", f"{_L}.norm2"),
    M(rf"{_LB}\.ffn_norm1", f"{_L}.ffn_norm1"),
    M(rf"{_LB}\.ffn_norm2", f"{_L}.ffn_norm2"),
    M(r"x_embedder", "x_embedder"),
    M(r"t_embedder\.mlp\.0", "time_caption_embed.timestep_embedder.linear_1"),
    M(r"t_embedder\.mlp\.2", "time_caption_embed.timestep_embedder.linear_2"),
    M(r"cap_embedder\.(?P<n>[01])", "time_caption_embed.caption_embedder.{n}"),
    M(r"final_layer\.adaLN_modulation\.1", "norm_out.linear_1"),
    M(r"final_layer\.linear", "norm_out.linear_2"),
)


# ---- splitting records ----------------------------------------------------------------------


def _n_in(rec: Record) -> int | None:
    for role in ("down", "diff", "set"):
        t = rec.tensors.get(role)
        if t is not None and t.ndim >= 2:
            return int(t.shape[1])
    return None


def _pieces(rec: Record, m: Map, names: list[str]) -> list[Record]:
    extras = sorted({"mid", "magnitude", "dora_scale"} & set(rec.tensors))
    if rec.kind not in ("lora", "diff", "set", "bias") or extras:
        raise InvalidAdapterError(
            f"{rec.keys[0]}: a {rec.kind} adapter{' with ' + ', '.join(extras) if extras else ''} on the fused "
            f"{rec.module!r} cannot be cut into {names}; only LoRA factors, full diffs and set weights can."
        )
    counts = {role: rec.tensors[role].shape[0] for role in _ROW_ROLES if role in rec.tensors}
    if len(set(counts.values())) != 1:
        shapes = ", ".join(f"{rec.sources[r]} {tuple(rec.tensors[r].shape)}" for r in counts)
        raise InvalidAdapterError(f"{rec.module}: the row counts of {shapes} differ.")
    rows, n_in = next(iter(counts.values())), _n_in(rec)
    if m.rows == "swap":
        if rows % 2:
            raise InvalidAdapterError(
                f"{rec.keys[0]}: {rows} output rows of {rec.module!r} do not split into two halves."
            )
        order = np.r_[rows // 2 : rows, 0 : rows // 2]
        tensors = {r: (t[order] if r in counts else t) for r, t in rec.tensors.items()}
        return [dataclasses.replace(rec, module=names[0], tensors=tensors)]
    sizes = ROW_SPLITS[m.rows](rows, n_in, len(names))
    if sizes is None:
        width = f"input features {n_in}" if n_in is not None else "no factor gives the input features"
        raise InvalidAdapterError(
            f"{rec.keys[0]}: {rows} output rows of the fused {rec.module!r} ({width}) do not split "
            f"{m.rows!r} into {names}."
        )
    bounds = np.cumsum([0] + sizes)
    out = []
    for name, a, b in zip(names, bounds[:-1], bounds[1:]):
        tensors = {r: (t[a:b] if r in counts else t) for r, t in rec.tensors.items()}
        out.append(dataclasses.replace(rec, module=name, tensors=tensors))
    return out


def splitter(maps: Iterable[Map]) -> Callable[[Record], list[Record]]:
    """The `Format.split` of a map table: source-named records -> diffusers-named records."""
    compiled = [(re.compile(m.source), m) for m in maps]

    def split(rec: Record) -> list[Record]:
        for regex, m in compiled:
            hit = regex.fullmatch(rec.module)
            if hit:
                names = [t.format(**hit.groupdict()) for t in m.targets]
                if m.rows == "whole":
                    return [dataclasses.replace(rec, module=names[0])]
                return _pieces(rec, m, names)
        return [rec]

    return split


def _role_pattern(roles: Iterable[str]) -> str:
    return "(?P<role>" + "|".join(re.escape(r) for r in sorted(roles, key=len, reverse=True)) + ")"


def map_rules(prefix: str, maps: Iterable[Map], roles: Iterable[str]) -> tuple[Rule, ...]:
    """One rule per map: `prefix`, the source module, `.`, a role suffix."""
    role = _role_pattern(roles)
    return tuple(Rule(prefix + "(?P<module>" + m.source + r")\." + role, "{role}") for m in maps)


# ---- detection ------------------------------------------------------------------------------

_ANY_PREFIX = r"(?:(?:diffusion_model|transformer)\.)?"

WAN_KEY = re.compile(
    _ANY_PREFIX + r"(?:blocks\.\d+\.(?:self_attn|cross_attn)\.|blocks\.\d+\.ffn\.[02]\.|head\.head\.|"
    r"(?:text|time)_embedding\.[02]\.|time_projection\.1\.|img_emb\.proj\.\d\.)"
)
MUSUBI_WAN_KEY = re.compile(r"lora_unet_blocks_\d+_(?:self_attn|cross_attn|ffn)_")
HUNYUAN_VIDEO_KEY = re.compile(
    _ANY_PREFIX + r"(?:double_blocks\.\d+\.(?:img|txt)_(?:attn_qkv|attn_proj|mod\.linear|mlp\.fc[12])\.|"
    r"single_blocks\.\d+\.modulation\.linear\.|"
    r"txt_in\.(?:individual_token_refiner|input_embedder|t_embedder|c_embedder)\.)"
)
LUMINA2_KEY = re.compile(
    _ANY_PREFIX + r"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123]|"
    r"adaLN_modulation\.1|attention_norm[12]|ffn_norm[12])\."
)
KOHYA_DIT_KEY = re.compile(r"lora_unet_(?:single_)?transformer_blocks_\d+_")
# Original-layout names of other families: Flux (BFL) and the sgm UNet.
_OTHER_LAYOUTS = re.compile(r"(?:^|[._])(?:double_blocks|single_blocks|input_blocks|output_blocks|middle_block)[._]")
_DOTTED_KOHYA = re.compile(r"(?P<first>[A-Za-z0-9_]+)\.[A-Za-z0-9_.]+\.lora_down\.weight")
_OTHER_COMPONENTS = frozenset(PEFT_COMPONENTS) - {"transformer"}


def _any(regex: re.Pattern, keys: Iterable[str]) -> bool:
    return any(regex.match(k) for k in keys)


def is_wan(keys: frozenset[str]) -> bool:
    return _any(WAN_KEY, keys)


def is_musubi_wan(keys: frozenset[str]) -> bool:
    return _any(MUSUBI_WAN_KEY, keys)


def is_hunyuan_video(keys: frozenset[str]) -> bool:
    return _any(HUNYUAN_VIDEO_KEY, keys)


def is_lumina2(keys: frozenset[str]) -> bool:
    return _any(LUMINA2_KEY, keys)


def _original_layout(keys: frozenset[str]) -> bool:
    return is_wan(keys) or is_hunyuan_video(keys) or is_lumina2(keys) or any(_OTHER_LAYOUTS.search(k) for k in keys)


def _dotted_kohya(key: str) -> bool:
    m = _DOTTED_KOHYA.fullmatch(key) if key.endswith(".lora_down.weight") else None  # the pattern's tail
    return m is not None and m["first"] not in _OTHER_COMPONENTS


def is_prefixed_diffusers(keys: frozenset[str]) -> bool:
    """diffusers names under `diffusion_model.`, or dotted diffusers names with kohya factor names."""
    marked = any(k.startswith("diffusion_model.") or _dotted_kohya(k) for k in keys)
    return marked and not _original_layout(keys)


def is_kohya_dit(keys: frozenset[str]) -> bool:
    return _any(KOHYA_DIT_KEY, keys) and not any(_OTHER_LAYOUTS.search(k) for k in keys)


# ---- formats --------------------------------------------------------------------------------

# Optional `diffusion_model.` (ComfyUI, original checkpoints) or `transformer.` prefix; either way the transformer.
_PREFIX = r"(?:(?P<component>diffusion_model|transformer)\.)?"
_TRANSFORMER = {"diffusion_model": "transformer", "transformer": "transformer", None: "transformer"}


def _register(name: str, maps: tuple[Map, ...], prefix: str, components, roles, detect, description: str,
              supersedes: tuple[str, ...]) -> Format:
    return register_format(
        Format(
            name=name,
            supersedes=supersedes,
            rules=map_rules(prefix, maps, roles),
            detect=detect,
            components=components,
            roles=roles,
            split=splitter(maps),
            description=description,
        )
    )


WAN = _register("wan", WAN_MAPS, _PREFIX, _TRANSFORMER, ROLES, is_wan,
                "Wan 2.x original names (diffusion_model.blocks.0.self_attn.q, .diff / .diff_b)", ("peft",))
MUSUBI_WAN = _register("musubi_wan", _underscored(WAN_MAPS), r"(?P<component>lora_unet)_", {"lora_unet": "transformer"},
                       kohya.ROLES, is_musubi_wan, "musubi-tuner Wan (lora_unet_blocks_0_self_attn_q)", ("kohya",))
HUNYUAN_VIDEO = _register("hunyuan_video", HUNYUAN_VIDEO_MAPS, _PREFIX, _TRANSFORMER, ROLES, is_hunyuan_video,
                          "HunyuanVideo original names (fused img_attn_qkv, linear1)", ("peft", "comfy_flux"))
LUMINA2 = _register("lumina2", LUMINA2_MAPS, _PREFIX, _TRANSFORMER, ROLES, is_lumina2,
                    "Lumina-Image-2.0 original names (grouped-query attention.qkv)", ("peft",))
PREFIXED_DIFFUSERS = register_format(
    Format(
        name="prefixed_diffusers",
        supersedes=("peft",),
        rules=(Rule(_PREFIX + r"(?P<module>[A-Za-z0-9_.]+?)\." + _role_pattern(ROLES), "{role}"),),
        detect=is_prefixed_diffusers,
        components=_TRANSFORMER,
        roles=ROLES,
        description="diffusers names under diffusion_model. (LTX-Video, HiDream) or with lora_down/alpha (Qwen-Image)",
    )
)
KOHYA_DIT = register_format(
    Format(
        name="kohya_dit",
        supersedes=("kohya",),
        rules=(Rule(r"(?P<component>lora_unet)_(?P<module>[A-Za-z0-9_]+?)\." + _role_pattern(kohya.ROLES), "{role}"),),
        detect=is_kohya_dit,
        components={"lora_unet": "transformer"},
        roles=kohya.ROLES,
        underscored=True,
        description="kohya names of a diffusers DiT (lora_unet_transformer_blocks_0_attn_to_q, Qwen-Image)",
    )
)
