"""Naming schemes: diffusers/PyTorch module names <-> paths in a Flax params tree.

A scheme is data: how a dotted torch module name becomes a tuple of tree keys and
back. Layout changes (transposes) are separate and live in `converters.layout`.

Shipped schemes:
  * `diffusers_flax`: diffusers' Flax models (linen). A numbered child joins its
    parent with `_`: `down_blocks.0.attentions.1.to_out.0` ->
    `down_blocks_0/attentions_1/to_out_0`.
  * `torch_mirror`: transformers' Flax models and nnx modules that mirror the torch
    module tree, numbers as their own keys: `text_model.encoder.layers.0.mlp.fc1` ->
    `text_model/encoder/layers/0/mlp/fc1`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

from converters.errors import NamingSchemeError

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NamingScheme:
    """How module names map to tree paths.

    Attributes:
      name: registry name.
      to_path: torch module name -> path of that module in the params tree.
      to_module: inverse of `to_path`.
      weight: name of the leaf holding a Linear/Conv weight (`kernel` for Flax).
      detect: params-tree paths -> True when this scheme fits the tree.
    """

    name: str
    to_path: Callable[[str], Path]
    to_module: Callable[[Path], str]
    weight: str = "kernel"
    detect: Callable[[Iterable[Path]], bool] = lambda paths: False


_SCHEMES: dict[str, NamingScheme] = {}

# torch names that end in `_<digit>` on their own (not a numbered child).
_OWN_NUMBERED = re.compile(r"^linear_\d+$")
_NUMBERED = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")


def _underscore_path(module: str) -> Path:
    out: list[str] = []
    for part in module.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _underscore_module(path: Path) -> str:
    parts = []
    for key in path:
        m = _NUMBERED.match(key)
        if m and not _OWN_NUMBERED.match(key):
            parts += [m["name"], m["index"]]
        else:
            parts.append(key)
    return ".".join(parts)


def _has_numbered_keys(paths: Iterable[Path]) -> bool:
    return any(_NUMBERED.match(k) and not _OWN_NUMBERED.match(k) for p in paths for k in p)


def _has_index_keys(paths: Iterable[Path]) -> bool:
    return any(k.isdigit() for p in paths for k in p)


def register_naming_scheme(scheme: NamingScheme) -> NamingScheme:
    """Register a naming scheme so `scheme="name"` and auto-detection can use it."""
    _SCHEMES[scheme.name] = scheme
    return scheme


def naming_schemes() -> dict[str, NamingScheme]:
    return dict(_SCHEMES)


def get_scheme(scheme: str | NamingScheme) -> NamingScheme:
    if isinstance(scheme, NamingScheme):
        return scheme
    if scheme not in _SCHEMES:
        raise NamingSchemeError(f"unknown naming scheme {scheme!r}; registered: {sorted(_SCHEMES)}.")
    return _SCHEMES[scheme]


def detect_scheme(paths: Iterable[Path]) -> NamingScheme:
    """Pick the scheme of a params tree from its key paths (registration order breaks ties)."""
    paths = list(paths)
    for scheme in _SCHEMES.values():
        if scheme.detect(paths):
            return scheme
    return _SCHEMES["torch_mirror"]


DIFFUSERS_FLAX = register_naming_scheme(
    NamingScheme(
        name="diffusers_flax",
        to_path=_underscore_path,
        to_module=_underscore_module,
        detect=lambda paths: _has_numbered_keys(paths) and not _has_index_keys(paths),
    )
)

TORCH_MIRROR = register_naming_scheme(
    NamingScheme(
        name="torch_mirror",
        to_path=lambda module: tuple(module.split(".")),
        to_module=lambda path: ".".join(path),
        detect=_has_index_keys,
    )
)
