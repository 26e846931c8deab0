"""Flax models that jlora's adapters target, with loaders for their base weights."""

from jlora.models import flux
from jlora.models.checkpoint import bytes_per_device
from jlora.models.checkpoint import component_spec
from jlora.models.checkpoint import fsdp
from jlora.models.checkpoint import fsdp_shardings
from jlora.models.checkpoint import load_component
from jlora.models.random_init import random_params
from jlora.models.single_file import load_single_file

__all__ = [
    "bytes_per_device",
    "component_spec",
    "flux",
    "fsdp",
    "fsdp_shardings",
    "load_component",
    "load_single_file",
    "random_params",
]
