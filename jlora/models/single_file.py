"""Base weights from single-file checkpoints (original Stable Diffusion / SDXL layout, BFL Flux), no torch.

A single file carries no configs, so `config=` names a diffusers pipeline folder (or the
component's folder) whose `config.json` describes the model, as diffusers'
`from_single_file(..., config=...)` does. The file's tensors are renamed to diffusers' torch
names (`converters.single_file`) and then take `load_component`'s road: the same plan, each
array built on its sharding from just the slices its devices hold.

>>> unet, params = load_single_file("sd_xl_base_1.0.safetensors", "unet", config="sdxl-base", dtype=jnp.bfloat16)
"""

from __future__ import annotations

import os
from typing import Any

from converters import single_file as sf
from converters.errors import KeyMismatchError, ShapeMismatchError
from jlora.models import checkpoint as ckpt

PyTree = Any


def load_single_file(
    path: str | os.PathLike,
    component: str,
    *,
    config: str | os.PathLike,
    dtype=None,
    shardings=None,
    stats: dict | None = None,
) -> tuple[Any, PyTree]:
    """`(model, params)` of one component of a single-file checkpoint, read onto devices.

    Args:
      path: the `.safetensors` single file (SD 1.x/2.x or SDXL in the original layout, or a BFL Flux
        transformer, with or without the `model.diffusion_model.` prefix).
      component: `"unet"`, `"vae"`, `"text_encoder"`, `"text_encoder_2"` (SD/SDXL) or `"transformer"` (Flux).
      config: a diffusers pipeline folder with a `component/config.json`, or the component folder itself.
      dtype, shardings: as in `load_component`.
      stats: if given, filled with `bytes_read`, `kind` (`"sd"`, `"sdxl"` or `"flux"`) and `unused`
        (the file's keys of this component that no weight of the model took).

    Returns:
      The Flax model and its params, equal to `load_component` on the same weights in a diffusers folder.

    Raises:
      ModelFileNotFoundError: no such file or config, or the file does not hold `component`.
      UnsupportedModelError: the file is in no single-file layout jlora reads, or the config asks for
        an option the Flax model lacks.
      KeyMismatchError, ShapeMismatchError: the config is not the file's.

    >>> vae, params = load_single_file("v1-5-pruned-emaonly.safetensors", "vae", config="stable-diffusion-v1-5")
    """
    spec = ckpt.component_spec(config, component, dtype=dtype)
    with sf.open_single_file(path, component, spec.config) as view:
        found: dict = {}
        try:
            params = ckpt.load_params(spec, view, dtype=dtype, shardings=shardings, stats=found)
        except (KeyMismatchError, ShapeMismatchError) as e:
            named = max((k for k in view.sources if k in str(e)), key=len, default=None)
            where = f" (file key {view.sources[named].key})" if named else ""
            raise type(e)(f"{os.fspath(path)} ({view.kind} single file, {component} in diffusers names) with "
                          f"config={os.fspath(config)!r}: {e}{where}") from None
        if stats is not None:
            used = set(view.sources) - set(found["unused"])
            taken = set(view.file_keys(used))
            unused = sorted(set(view.file_keys(view.sources)) - taken) + view.unmapped
            stats.update(bytes_read=found["bytes_read"], kind=view.kind, unused=sorted(unused))
    return spec.model, params
