"""Flax models that jlora's adapters target, with converters from diffusers weights."""

from jlora.models import flux

__all__ = [
    "flux",
]
