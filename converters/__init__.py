"""jlora converters: read LoRA files and map their tensors onto Flax params trees.

Nothing here imports jax: converters work on numpy arrays and on shape indexes
(`{path: (shape, dtype)}`) of the target params.
"""

from converters.convert import LoadReport, PlacedModule, convert
from converters.engine import Format, Rule, detect_format, formats, register_format
from converters.families import FAMILIES, Family, get_family
from converters.naming import NamingScheme, detect_scheme, get_scheme, naming_schemes, register_naming_scheme
from converters.records import Placement, Record
from converters.sources import read_state_dict, resolve_path

__all__ = [
    "FAMILIES",
    "Family",
    "Format",
    "LoadReport",
    "NamingScheme",
    "PlacedModule",
    "Placement",
    "Record",
    "Rule",
    "convert",
    "detect_format",
    "detect_scheme",
    "formats",
    "get_family",
    "get_scheme",
    "naming_schemes",
    "read_state_dict",
    "register_format",
    "register_naming_scheme",
    "resolve_path",
]
