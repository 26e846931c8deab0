"""Rename rules of single-file checkpoints: original (LDM/sgm, OpenCLIP, BFL) names -> diffusers torch names.

One small engine, one rule table per component. A rule is an anchored pattern over a file key
(its component prefix removed), diffusers key templates (one per row piece of the tensor), a
row split from `SPLITS` and at most one transform. Block indices come from the match; block
counts (UNet layers per block, VAE up blocks, Flux width) from the component's config when given,
as diffusers does, or else from the keys. The UNet's block arithmetic is kohya's `sgm_to_diffusers`.
The names agree with diffusers' `single_file_utils` converters (see `converters.single_file`).

Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

from converters.errors import KeyMismatchError, UnsupportedModelError
from converters.formats.kohya import sgm_to_diffusers

Shapes = Mapping[str, tuple[int, ...]]
Pieces = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one diffusers tensor lies in the file.

    Attributes:
      key: the file's key.
      rows: `(start, stop)` pieces of the file tensor's axis 0, concatenated; empty: all rows.
      transform: `""`, `"T"` (2-D transpose) or `"squeeze"` (drop the trailing unit axes of a 1x1 conv).
    """

    key: str
    rows: Pieces = ()
    transform: str = ""

    def shape(self, file_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(file_shape)
        if self.rows:
            shape = (sum(b - a for a, b in self.rows),) + shape[1:]
        if self.transform == "T":
            return shape[::-1]
        if self.transform == "squeeze":
            return shape[:2]
        return shape


# --- rule engine -----------------------------------------------------------------------------------

Target = str | Callable[[re.Match, Mapping[str, Any]], str | None]


@dataclasses.dataclass(frozen=True)
class Rule:
    """An anchored pattern over a file key (prefix removed) -> diffusers key templates, one per row piece.

    `split` names how the rows divide among the targets (`SPLITS`); `transform` is `Source.transform`,
    or `"squeeze"` applied only to tensors with more than 2 axes.
    """

    pattern: str
    targets: tuple[Target, ...]
    split: str = ""
    transform: str = ""


def _equal(n: int) -> Callable[[tuple[int, ...], Mapping], list[Pieces]]:
    def split(shape, ctx):
        step = shape[0] // n
        return [((i * step, (i + 1) * step),) for i in range(n)]

    return split


def _qkv_mlp(shape, ctx):
    d = ctx["hidden"]
    return [((0, d),), ((d, 2 * d),), ((2 * d, 3 * d),), ((3 * d, shape[0]),)]


def _swap_halves(shape, ctx):
    h = shape[0] // 2
    return [((h, 2 * h), (0, h))]


SPLITS: dict[str, Callable[[tuple[int, ...], Mapping], list[Pieces]]] = {
    "": lambda shape, ctx: [()],
    "thirds": _equal(3),
    "qkv_mlp": _qkv_mlp,
    "swap_halves": _swap_halves,
}


def apply_rules(rules: Sequence[Rule], shapes: Shapes, ctx: Mapping[str, Any],
                where: str) -> tuple[dict[str, Source], list[str]]:
    """`({diffusers key: Source}, unmapped file keys)` of the file keys in `shapes`.

    Raises:
      KeyMismatchError: a key matches two rules, or two keys give one diffusers key.
    """
    compiled = [(re.compile(r.pattern), r) for r in rules]
    out: dict[str, Source] = {}
    unmapped: list[str] = []
    for key in sorted(shapes):
        hits = [(m, r) for p, r in compiled if (m := p.fullmatch(key))]
        if len(hits) > 1:
            raise KeyMismatchError(
                f"{where}: key {key!r} matches rules {hits[0][1].pattern!r} and {hits[1][1].pattern!r}.")
        if not hits:
            unmapped.append(key)
            continue
        m, rule = hits[0]
        shape = tuple(shapes[key])
        transform = rule.transform
        if transform == "squeeze" and len(shape) <= 2:
            transform = ""
        names = [t(m, ctx) if callable(t) else t.format_map(m.groupdict()) for t in rule.targets]
        if any(n is None for n in names):
            unmapped.append(key)
            continue
        for name, rows in zip(names, SPLITS[rule.split](shape, ctx)):
            if name in out:
                raise KeyMismatchError(f"{where}: keys {out[name].key!r} and {key!r} both give {name!r}; "
                                       "the file holds one tensor twice.")
            out[name] = Source(key, rows, transform)
    return out, unmapped


# --- UNet (LDM / sgm names) ------------------------------------------------------------------------

_UNET_FIXED = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
# kohya's sgm_to_diffusers speaks underscored names; its block prefixes are re-dotted here.
_BLOCK = re.compile(r"(?P<part>down_blocks|up_blocks|mid_block)_(?:(?P<b>\d+)_)?"
                    r"(?P<kind>resnets|attentions|downsamplers|upsamplers)_(?P<l>\d+)_(?P<tail>.+)")


def _unet_block(m: re.Match, ctx: Mapping[str, Any]) -> str | None:
    rest, j = m["rest"], m.groupdict().get("j")
    head = f"{m['part']}_{m['i']}_{j}" if j is not None else f"middle_block_{m['i']}"
    mapped = _BLOCK.fullmatch(sgm_to_diffusers(f"{head}_{rest.replace('.', '_')}", ctx["layers_per_block"]))
    if mapped is None:
        return None
    block = ".".join(x for x in (mapped["part"], mapped["b"], mapped["kind"], mapped["l"]) if x is not None)
    tail = rest if mapped["kind"] == "attentions" else mapped["tail"]
    return f"{block}.{tail}.{m['param']}"


UNET_RULES = (
    Rule(r"(?P<module>" + "|".join(re.escape(k) for k in _UNET_FIXED) + r")\.(?P<param>weight|bias)",
         (lambda m, ctx: f"{_UNET_FIXED[m['module']]}.{m['param']}",)),
    Rule(r"(?P<part>input_blocks|output_blocks)\.(?P<i>\d+)\.(?P<j>\d+)\.(?P<rest>.+)\.(?P<param>weight|bias)",
         (_unet_block,)),
    Rule(r"middle_block\.(?P<i>\d+)\.(?P<rest>.+)\.(?P<param>weight|bias)", (_unet_block,)),
)


def unet_context(shapes: Shapes, config: Mapping[str, Any] | None) -> dict:
    if config and "layers_per_block" in config:
        n = config["layers_per_block"]
        if not isinstance(n, int):
            raise UnsupportedModelError(f"UNet config layers_per_block={n!r}: single files need one int.")
        return {"layers_per_block": n}
    # input_blocks: conv_in, then per down block n resnets and a downsampler (none after the last).
    ops = [int(m[1]) for k in shapes if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))]
    blocks = [int(m[1]) for k in shapes if (m := re.match(r"input_blocks\.(\d+)\.", k))]
    return {"layers_per_block": min(ops) - 1 if ops else max(blocks, default=1)}


# --- VAE (LDM autoencoder) -------------------------------------------------------------------------

_P = r"(?P<param>weight|bias)"
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _resnet_part(m: re.Match, ctx) -> str:
    return {"nin_shortcut": "conv_shortcut"}.get(m["r"], m["r"])


def _vae_up(m: re.Match, ctx) -> int:
    return ctx["num_up_blocks"] - 1 - int(m["i"])


VAE_RULES = (
    Rule(r"(?P<s>encoder|decoder)\.(?P<m>conv_in|conv_out)\." + _P, ("{s}.{m}.{param}",)),
    Rule(r"(?P<s>encoder|decoder)\.norm_out\." + _P, ("{s}.conv_norm_out.{param}",)),
    Rule(r"(?P<m>quant_conv|post_quant_conv)\." + _P, ("{m}.{param}",)),
    Rule(r"encoder\.down\.(?P<i>\d+)\.block\.(?P<j>\d+)\.(?P<r>\w+)\." + _P,
         (lambda m, ctx: f"encoder.down_blocks.{m['i']}.resnets.{m['j']}.{_resnet_part(m, ctx)}.{m['param']}",)),
    Rule(r"encoder\.down\.(?P<i>\d+)\.downsample\.conv\." + _P, ("encoder.down_blocks.{i}.downsamplers.0.conv.{param}",)),
    Rule(r"decoder\.up\.(?P<i>\d+)\.block\.(?P<j>\d+)\.(?P<r>\w+)\." + _P,
         (lambda m, ctx: f"decoder.up_blocks.{_vae_up(m, ctx)}.resnets.{m['j']}.{_resnet_part(m, ctx)}.{m['param']}",)),
    Rule(r"decoder\.up\.(?P<i>\d+)\.upsample\.conv\." + _P,
         (lambda m, ctx: f"decoder.up_blocks.{_vae_up(m, ctx)}.upsamplers.0.conv.{m['param']}",)),
    Rule(r"(?P<s>encoder|decoder)\.mid\.block_(?P<k>[12])\.(?P<r>\w+)\." + _P,
         (lambda m, ctx: f"{m['s']}.mid_block.resnets.{int(m['k']) - 1}.{_resnet_part(m, ctx)}.{m['param']}",)),
    Rule(r"(?P<s>encoder|decoder)\.mid\.attn_1\.(?P<a>norm|q|k|v|proj_out)\." + _P,
         (lambda m, ctx: f"{m['s']}.mid_block.attentions.0.{_ATTN[m['a']]}.{m['param']}",), transform="squeeze"),
)


def vae_context(shapes: Shapes, config: Mapping[str, Any] | None) -> dict:
    if config and "up_block_types" in config:
        return {"num_up_blocks": len(config["up_block_types"])}
    ups = {int(m[1]) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    return {"num_up_blocks": max(ups, default=-1) + 1}


# --- text encoders ---------------------------------------------------------------------------------

CLIP_RULES = (Rule(r"(?P<k>text_model\..+)", ("{k}",)),)

_LAYER = r"transformer\.resblocks\.(?P<i>\d+)\."
OPEN_CLIP_RULES = (
    Rule(r"positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
    Rule(r"token_embedding\.weight", ("text_model.embeddings.token_embedding.weight",)),
    Rule(r"ln_final\." + _P, ("text_model.final_layer_norm.{param}",)),
    Rule(r"text_projection", ("text_projection.weight",), transform="T"),
    Rule(_LAYER + r"ln_(?P<n>[12])\." + _P, ("text_model.encoder.layers.{i}.layer_norm{n}.{param}",)),
    Rule(_LAYER + r"mlp\.c_fc\." + _P, ("text_model.encoder.layers.{i}.mlp.fc1.{param}",)),
    Rule(_LAYER + r"mlp\.c_proj\." + _P, ("text_model.encoder.layers.{i}.mlp.fc2.{param}",)),
    Rule(_LAYER + r"attn\.out_proj\." + _P, ("text_model.encoder.layers.{i}.self_attn.out_proj.{param}",)),
    Rule(_LAYER + r"attn\.in_proj_(?P<param>weight|bias)",
         tuple(f"text_model.encoder.layers.{{i}}.self_attn.{p}_proj.{{param}}" for p in "qkv"), split="thirds"),
)


# --- Flux (BFL names) ------------------------------------------------------------------------------

_EMBEDDERS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {"img_attn.norm.query_norm": "norm_q", "img_attn.norm.key_norm": "norm_k",
                 "txt_attn.norm.query_norm": "norm_added_q", "txt_attn.norm.key_norm": "norm_added_k"}


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in names)


_D = r"double_blocks\.(?P<i>\d+)\."
_S = r"single_blocks\.(?P<i>\d+)\."
FLUX_RULES = (
    Rule(r"(?P<m>" + _alternatives(_EMBEDDERS) + r")\." + _P, (lambda m, ctx: f"{_EMBEDDERS[m['m']]}.{m['param']}",)),
    Rule(r"final_layer\.adaLN_modulation\.1\." + _P, ("norm_out.linear.{param}",), split="swap_halves"),
    Rule(_D + r"(?P<m>" + _alternatives(_DOUBLE) + r")\." + _P,
         (lambda m, ctx: f"transformer_blocks.{m['i']}.{_DOUBLE[m['m']]}.{m['param']}",)),
    Rule(_D + r"img_attn\.qkv\." + _P, tuple(f"transformer_blocks.{{i}}.attn.to_{p}.{{param}}" for p in "qkv"),
         split="thirds"),
    Rule(_D + r"txt_attn\.qkv\." + _P, tuple(f"transformer_blocks.{{i}}.attn.add_{p}_proj.{{param}}" for p in "qkv"),
         split="thirds"),
    Rule(_D + r"(?P<m>" + _alternatives(_DOUBLE_NORMS) + r")\.scale",
         (lambda m, ctx: f"transformer_blocks.{m['i']}.attn.{_DOUBLE_NORMS[m['m']]}.weight",)),
    Rule(_S + r"modulation\.lin\." + _P, ("single_transformer_blocks.{i}.norm.linear.{param}",)),
    Rule(_S + r"linear1\." + _P, tuple(f"single_transformer_blocks.{{i}}.attn.to_{p}.{{param}}" for p in "qkv")
         + ("single_transformer_blocks.{i}.proj_mlp.{param}",), split="qkv_mlp"),
    Rule(_S + r"linear2\." + _P, ("single_transformer_blocks.{i}.proj_out.{param}",)),
    Rule(_S + r"norm\.(?P<n>query|key)_norm\.scale",
         (lambda m, ctx: f"single_transformer_blocks.{m['i']}.attn.norm_{m['n'][0]}.weight",)),
)


def flux_context(shapes: Shapes, config: Mapping[str, Any] | None) -> dict:
    if config and "num_attention_heads" in config and "attention_head_dim" in config:
        return {"hidden": config["num_attention_heads"] * config["attention_head_dim"]}
    out = [s[0] for k, s in shapes.items() if re.fullmatch(r"single_blocks\.\d+\.linear2\.weight", k)]
    return {"hidden": out[0] if out else 0}
