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
`convert_flux_transformer_checkpoint_to_diffusers`); the rule tables are in
`converters.single_file_rules`. `RenamedCheckpoint` then looks like a
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

from converters.errors import ComponentNotInFileError, ModelFileNotFoundError, UnsupportedModelError
from converters.safetensors_io import SafetensorsFile, open_file
from converters.single_file_rules import (
    CLIP_RULES,
    FLUX_RULES,
    OPEN_CLIP_RULES,
    UNET_RULES,
    VAE_RULES,
    Shapes,
    Source,
    Rule,
    apply_rules,
    flux_context,
    unet_context,
    vae_context,
)

# --- layouts ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
    """One component's tensors in a single file: their key prefix and how they are named."""

    prefix: str
    rules: tuple[Rule, ...]
    context: Callable[[Shapes, Mapping[str, Any] | None], dict] = lambda shapes, config: {}


_UNET = Part("model.diffusion_model.", UNET_RULES, unet_context)
_VAES = (Part("first_stage_model.", VAE_RULES, vae_context), Part("vae.", VAE_RULES, vae_context))

# kind -> component -> the parts it may be stored as, first present wins.
LAYOUTS: dict[str, dict[str, tuple[Part, ...]]] = {
    "sd": {
        "unet": (_UNET,),
        "vae": _VAES,
        "text_encoder": (Part("cond_stage_model.transformer.", CLIP_RULES),
                         Part("cond_stage_model.model.", OPEN_CLIP_RULES)),
    },
    "sdxl": {
        "unet": (_UNET,),
        "vae": _VAES,
        "text_encoder": (Part("conditioner.embedders.0.transformer.", CLIP_RULES),),
        "text_encoder_2": (Part("conditioner.embedders.1.model.", OPEN_CLIP_RULES),
                           Part("conditioner.embedders.0.model.", OPEN_CLIP_RULES)),
    },
    "flux": {
        "transformer": (Part("model.diffusion_model.", FLUX_RULES, flux_context), Part("", FLUX_RULES, flux_context)),
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
        raise ComponentNotInFileError(
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
