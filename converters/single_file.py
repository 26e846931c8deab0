"""Single-file checkpoints: the original Stable Diffusion (LDM/sgm) and Flux (BFL) layouts, read as diffusers.

A single file holds a whole pipeline under the original repositories' names:

  ======  =========================================  ===========================================
  kind    component: key prefix in the file          names
  ======  =========================================  ===========================================
  sd      unet: `model.diffusion_model.`             LDM UNet (`input_blocks.4.1...`)
          vae: `first_stage_model.`                  LDM autoencoder (`encoder.down.0.block.1`)
          text_encoder: `cond_stage_model.`          `transformer.` (CLIP, SD 1.x) or
                                                     `model.` (OpenCLIP, SD 2.x)
  sdxl    unet, vae                                  as sd
          text_encoder: `conditioner.embedders.0.transformer.`   CLIP
          text_encoder_2: `conditioner.embedders.1.model.`       OpenCLIP bigG
                        (`conditioner.embedders.0.model.` in the refiner)
  flux    transformer: `model.diffusion_model.` or none          BFL (`double_blocks.0.img_attn.qkv`)
  ======  =========================================  ===========================================

`renames(kind, component, shapes)` gives, per diffusers torch key, the `Source` it comes from: a
file key, row pieces of it (OpenCLIP's fused `in_proj_weight`, Flux's fused `qkv` and `linear1`,
Flux's swapped `adaLN_modulation` halves) and at most one transform (`"T"`: OpenCLIP's
`text_projection`; `"squeeze"`: the VAE attention's 1x1 convs as linear weights). The names are
those of diffusers' `single_file_utils` (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`,
`convert_flux_transformer_checkpoint_to_diffusers`). `RenamedCheckpoint` then looks like a
`converters.checkpoints.Checkpoint` in diffusers names, reading only the slices asked for, so the
base-weight plan of a diffusers folder reads a single file unchanged.

Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from converters.errors import KeyMismatchError, ModelFileNotFoundError, UnsupportedModelError
from converters.formats.kohya import sgm_to_diffusers
from converters.safetensors_io import SafetensorsFile, open_file

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


_UNET_RULES = (
    Rule(r"(?P<module>" + "|".join(re.escape(k) for k in _UNET_FIXED) + r")\.(?P<param>weight|bias)",
         (lambda m, ctx: f"{_UNET_FIXED[m['module']]}.{m['param']}",)),
    Rule(r"(?P<part>input_blocks|output_blocks)\.(?P<i>\d+)\.(?P<j>\d+)\.(?P<rest>.+)\.(?P<param>weight|bias)",
         (_unet_block,)),
    Rule(r"middle_block\.(?P<i>\d+)\.(?P<rest>.+)\.(?P<param>weight|bias)", (_unet_block,)),
)


def _unet_context(shapes: Shapes, config: Mapping[str, Any] | None) -> dict:
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


_VAE_RULES = (
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


def _vae_context(shapes: Shapes, config: Mapping[str, Any] | None) -> dict:
    if config and "up_block_types" in config:
        return {"num_up_blocks": len(config["up_block_types"])}
    ups = {int(m[1]) for k in shapes if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    return {"num_up_blocks": max(ups, default=-1) + 1}


# --- text encoders ---------------------------------------------------------------------------------

_CLIP_RULES = (Rule(r"(?P<k>text_model\..+)", ("{k}",)),)

_LAYER = r"transformer\.resblocks\.(?P<i>\d+)\."
_OPEN_CLIP_RULES = (
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
_FLUX_RULES = (
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


def _flux_context(shapes: Shapes, config: Mapping[str, Any] | None) -> dict:
    if config and "num_attention_heads" in config and "attention_head_dim" in config:
        return {"hidden": config["num_attention_heads"] * config["attention_head_dim"]}
    out = [s[0] for k, s in shapes.items() if re.fullmatch(r"single_blocks\.\d+\.linear2\.weight", k)]
    return {"hidden": out[0] if out else 0}


# --- layouts ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
    """One component's tensors in a single file: their key prefix and how they are named."""

    prefix: str
    rules: tuple[Rule, ...]
    context: Callable[[Shapes, Mapping[str, Any] | None], dict] = lambda shapes, config: {}


_UNET = Part("model.diffusion_model.", _UNET_RULES, _unet_context)
_VAES = (Part("first_stage_model.", _VAE_RULES, _vae_context), Part("vae.", _VAE_RULES, _vae_context))

# kind -> component -> the parts it may be stored as, first present wins.
LAYOUTS: dict[str, dict[str, tuple[Part, ...]]] = {
    "sd": {
        "unet": (_UNET,),
        "vae": _VAES,
        "text_encoder": (Part("cond_stage_model.transformer.", _CLIP_RULES),
                         Part("cond_stage_model.model.", _OPEN_CLIP_RULES)),
    },
    "sdxl": {
        "unet": (_UNET,),
        "vae": _VAES,
        "text_encoder": (Part("conditioner.embedders.0.transformer.", _CLIP_RULES),),
        "text_encoder_2": (Part("conditioner.embedders.1.model.", _OPEN_CLIP_RULES),
                           Part("conditioner.embedders.0.model.", _OPEN_CLIP_RULES)),
    },
    "flux": {
        "transformer": (Part("model.diffusion_model.", _FLUX_RULES, _flux_context), Part("", _FLUX_RULES, _flux_context)),
    },
}

_PICKLES = (".ckpt", ".pt", ".pth", ".bin")
_FLUX_KEY = re.compile(r"(?:model\.diffusion_model\.)?double_blocks\.\d+\.img_attn\.qkv\.weight")


def detect(keys) -> str | None:
    """The single-file layout of `keys`: `"sd"`, `"sdxl"`, `"flux"`, or None.

    >>> detect(["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"])
    'sdxl'
    """
    keys = list(keys)
    if any(_FLUX_KEY.fullmatch(k) for k in keys):
        return "flux"
    if not any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return None
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    return "sd"


def components(kind: str, keys) -> list[str]:
    """The components of layout `kind` that `keys` hold."""
    keys = list(keys)
    return [c for c, parts in LAYOUTS[kind].items() if any(_has(keys, p) for p in parts)]


def _has(keys, part: Part) -> bool:
    if not part.prefix:
        return any(_FLUX_KEY.fullmatch(k) for k in keys)
    return any(k.startswith(part.prefix) for k in keys)


def renames(kind: str, component: str, shapes: Shapes, config: Mapping[str, Any] | None = None, *,
            where: str = "the file") -> tuple[dict[str, Source], list[str]]:
    """`({diffusers torch key: Source}, unmapped file keys)` of `component` in a single file of layout `kind`.

    Args:
      kind: `detect`'s answer.
      component: `"unet"`, `"vae"`, `"text_encoder"`, `"text_encoder_2"` or `"transformer"`.
      shapes: `{file key: shape}` of the whole file.
      config: the component's diffusers `config.json` (block counts are read from it when given, as
        diffusers does; otherwise from the keys).
      where: the file's name, for errors.

    Raises:
      ModelFileNotFoundError: the file does not hold `component`.
      KeyMismatchError: the file holds a tensor twice.

    >>> sources, _ = renames("sd", "vae", {"first_stage_model.encoder.norm_out.weight": (64,)})
    >>> sources["encoder.conv_norm_out.weight"].key
    'first_stage_model.encoder.norm_out.weight'
    """
    parts = LAYOUTS.get(kind, {}).get(component)
    part = next((p for p in parts or () if _has(shapes, p)), None)
    if part is None:
        held = ", ".join(components(kind, shapes)) if kind in LAYOUTS else "nothing jlora reads"
        prefixes = " or ".join(repr(p.prefix) for p in parts or ()) or "none in this layout"
        raise ModelFileNotFoundError(
            f"{where}: this {kind} single file has no {component} (key prefix {prefixes}); it holds: {held}. "
            f"Load {component} from a diffusers folder with load_component instead."
        )
    own = {k[len(part.prefix):]: tuple(s) for k, s in shapes.items() if k.startswith(part.prefix)}
    sources, unmapped = apply_rules(part.rules, own, part.context(own, config), where)
    prefixed = {name: dataclasses.replace(s, key=part.prefix + s.key) for name, s in sources.items()}
    return prefixed, [part.prefix + k for k in unmapped]


# --- a checkpoint in diffusers names ---------------------------------------------------------------


def _spans(index, shape) -> list[tuple[int, int]]:
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only contiguous blocks can be read, got {s}")
        out.append((start, max(start, stop)))
    return out


class RenamedCheckpoint:
    """A single file seen as a `converters.checkpoints.Checkpoint` whose keys are diffusers torch names.

    `shape`, `dtype` and `read(key, index)` speak diffusers' layout; reads fetch only the file
    slices the block needs. `where` maps each key to this object (as a `Checkpoint` maps keys
    to files), and `file_keys` turns diffusers keys back into the file's.

    >>> with open_single_file("model.safetensors", "unet") as view:
    ...     view.shape("conv_in.weight")
    (320, 4, 3, 3)
    """

    def __init__(self, file: SafetensorsFile, sources: Mapping[str, Source], unmapped: Sequence[str] = (),
                 kind: str = ""):
        self.file = file
        self.sources = dict(sources)
        self.unmapped = list(unmapped)
        self.kind = kind
        self.where = {k: self for k in self.sources}
        self.files = (file,)

    def keys(self) -> list[str]:
        return list(self.sources)

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def shape(self, key: str) -> tuple[int, ...]:
        s = self.sources[key]
        return s.shape(self.file.shape(s.key))

    def dtype(self, key: str) -> np.dtype:
        return self.file.dtype(self.sources[key].key)

    def file_keys(self, keys) -> list[str]:
        """The file keys behind diffusers `keys` (each once, sorted)."""
        return sorted({self.sources[k].key for k in keys})

    def read(self, key: str, index=None) -> np.ndarray:
        """The tensor `key` in diffusers layout, or the block `index` (contiguous slices) of it."""
        s = self.sources[key]
        file_shape = self.file.shape(s.key)
        spans = _spans(index, s.shape(file_shape))
        if s.transform == "T":
            (a0, b0), (a1, b1) = spans
            return self.file.read(s.key, (slice(a1, b1), slice(a0, b0))).T
        if s.transform == "squeeze":
            block = self.file.read(s.key, tuple(slice(a, b) for a, b in spans))
            return block.reshape([b - a for a, b in spans])
        rest = tuple(slice(a, b) for a, b in spans[1:])
        if not s.rows:
            return self.file.read(s.key, (slice(*spans[0]),) + rest)
        lo, hi = spans[0]
        blocks, offset = [], 0
        for start, stop in s.rows:
            a, b = max(lo, offset), min(hi, offset + stop - start)
            if a < b:
                blocks.append(self.file.read(s.key, (slice(start + a - offset, start + b - offset),) + rest))
            offset += stop - start
        if not blocks:
            return np.zeros([b - a for a, b in spans], self.file.dtype(s.key))
        return np.concatenate(blocks, axis=0)

    @property
    def bytes_read(self) -> int:
        return self.file.bytes_read

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "RenamedCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_single_file(path: str | os.PathLike, component: str,
                     config: Mapping[str, Any] | None = None) -> RenamedCheckpoint:
    """`component` of a single-file checkpoint (a `.safetensors` file), as a checkpoint in diffusers names.

    Raises:
      ModelFileNotFoundError: no such file, or the file does not hold `component`.
      UnsupportedModelError: the file is not in a single-file layout jlora reads.
      CorruptFileError: the file is not safetensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileNotFoundError(f"{path}: no such single-file checkpoint.")
    if path.endswith(_PICKLES):
        raise UnsupportedModelError(f"{path}: a pickled torch checkpoint; jlora reads single files as .safetensors "
                                    "(convert it once with torch: safetensors.torch.save_file(state_dict, ...)).")
    f = open_file(path)
    try:
        shapes = {k: f.shape(k) for k in f.keys()}
        kind = detect(shapes)
        if kind is None:
            sample = ", ".join(sorted(shapes)[:5]) or "no tensors"
            raise UnsupportedModelError(
                f"{path}: not a single-file checkpoint jlora reads (keys: {sample}). It reads the original "
                "Stable Diffusion 1.x/2.x and SDXL layout (model.diffusion_model.input_blocks..., "
                "first_stage_model..., cond_stage_model... or conditioner.embedders...) and the BFL Flux layout "
                "(double_blocks.0.img_attn.qkv.weight); a diffusers folder loads with load_component."
            )
        sources, unmapped = renames(kind, component, shapes, config, where=path)
    except BaseException:
        f.close()
        raise
    return RenamedCheckpoint(f, sources, unmapped, kind)
