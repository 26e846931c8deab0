"""Text-to-image pipelines in JAX (SD 1.5, SDXL, Flux) with per-prompt LoRAs.

>>> pipe = jlora.pipelines.load_pipeline("stable-diffusion-xl-base-1.0", dtype=jnp.bfloat16)
>>> images = pipe.generate([Request("a cat", loras=(Lora("style.safetensors", 0.8),), seed=7, steps=30)])

The models come from diffusers 0.35.2 / transformers 4.57.6 Flax classes (the `jlora[pipelines]`
extra) and jlora's own Flux and T5; weights load from safetensors with `jlora.models.load_component`.
"""

from __future__ import annotations

import os

from jlora.pipelines.common import Lora, Request, RequestError

__all__ = ["Lora", "Request", "RequestError", "family_of", "load_pipeline"]

_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}


def family_of(path: str | os.PathLike) -> str:
    """`"sd"`, `"sdxl"` or `"flux"` from a pipeline folder's `model_index.json`."""
    from converters.errors import UnsupportedModelError
    from jlora.pipelines.common import read_json

    index = read_json(os.path.join(os.fspath(path), "model_index.json"))
    name = index.get("_class_name")
    if name not in _FAMILIES:
        raise UnsupportedModelError(f"{path}: pipeline {name!r} is not supported; supported: {sorted(_FAMILIES)}.")
    return _FAMILIES[name]


def load_pipeline(path: str | os.PathLike, *, config: str | os.PathLike | None = None, dtype=None, shardings=None,
                  **kwargs):
    """Load a diffusers pipeline folder (or a single-file checkpoint) as jlora's JAX pipeline of its family.

    Args:
      path: the folder with `model_index.json`, or a single `.safetensors` checkpoint (original SD/SDXL
        layout, or a BFL Flux transformer) with `config`.
      config: for a single file: a diffusers folder of the same model, for its configs, tokenizers and the
        weights of components the file lacks (a Flux file holds only the transformer).
      dtype: params and compute dtype (e.g. `jnp.bfloat16`); None keeps float32 compute.
      shardings: `f(component) -> shardings` for `jlora.models.load_component` (e.g. FSDP over a mesh).
      **kwargs: family options (`scheduler=` for SD/SDXL).
    """
    from converters.errors import ModelFileNotFoundError

    path = os.fspath(path)
    if os.path.isfile(path):
        if config is None:
            raise ModelFileNotFoundError(
                f"{path}: a single-file checkpoint has no configs or tokenizers; pass config= (--config) a diffusers "
                "folder of the same model.")
        kwargs["single_file"], path = path, os.fspath(config)
    family = family_of(path)
    if family == "flux":
        from jlora.pipelines.flux import Flux

        return Flux.load(path, dtype=dtype, shardings=shardings, **kwargs)
    from jlora.pipelines.stable_diffusion import StableDiffusion

    return StableDiffusion.load(path, dtype=dtype, shardings=shardings, **kwargs)
