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
from typing import Callable, Iterable, Mapping

from converters.errors import NamingSchemeError

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one torch module's weight lives in a params tree.

    Attributes:
      path: path of the module (the weight is `path + (weight_name,)`).
      layer: index on a leading stacked-layer axis (blocks run under `scan`), or None.
      units: the weight's output axis is cut into this many equal units (fused kernels).
      out_map: `(src_start, src_stop, dst_start)` in units: which output units of the torch
        module go where in the fused kernel. Empty: the whole axis, unchanged.
    """

    path: Path
    layer: int | None = None
    units: int = 1
    out_map: tuple[tuple[int, int, int], ...] = ()

    @property
    def is_simple(self) -> bool:
        return self.layer is None and not self.out_map


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
    to_target: Callable[[str], Target | None] | None = None
    modules: Callable[[Mapping[Path, tuple]], list[str]] | None = None
    from_path: Callable[[Path, tuple[int, ...]], list[tuple[str, int | None, tuple]]] | None = None

    def sources(self, path: Path, shape: tuple[int, ...]) -> list[tuple[str, int | None, tuple]]:
        """The torch modules stored in the weight at `path` (of `shape`): `(module, layer, cols)`.

        `layer` indexes a stacked axis (or None); `cols` are `(src_start, src_stop, dst_start)`
        output columns of a fused weight (empty: the whole axis). The inverse of `target`.
        """
        if self.from_path is not None:
            return self.from_path(path, shape)
        return [(self.to_module(path), None, ())]

    def target(self, module: str) -> Target | None:
        """The target of a torch module name (None when the scheme has no place for it)."""
        if self.to_target is not None:
            return self.to_target(module)
        return Target(self.to_path(module))


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
    ordered = sorted(_SCHEMES.values(), key=lambda s: s.to_target is None)  # table schemes are more specific
    for scheme in ordered:
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


@dataclasses.dataclass(frozen=True)
class TargetRule:
    """One row of a table scheme: a torch module name template -> a place in the params tree.

    `module` may contain `{layer}`, a block index. When `path` has no `{layer}` the blocks are
    stacked (scanned) and the index selects a slice of the leading axis; when `path` has `{layer}`
    too, each block has its own weights at that path (a list of layers).
    `path` is the `/`-joined module path in the params tree.
    """

    module: str
    path: str
    units: int = 1
    out_map: tuple[tuple[int, int, int], ...] = ()

    @property
    def regex(self) -> re.Pattern:
        return _layer_regex(self.module)

    @property
    def per_layer(self) -> bool:
        """True when each block has its own weights (`{layer}` in `path`), False when they are stacked."""
        return "{layer}" in self.path

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.module and not self.per_layer


def _layer_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>\d+)"))


def table_scheme(name: str, rules: Iterable[TargetRule], detect: Callable[[Iterable[Path]], bool], weight: str = "kernel") -> NamingScheme:
    """A naming scheme given as a table of `TargetRule`s (stacked layers, fused kernels, renames)."""
    rules = tuple(rules)
    compiled = [(rule, rule.regex) for rule in rules]

    def to_target(module: str) -> Target | None:
        for rule, regex in compiled:
            m = regex.fullmatch(module)
            if m:
                layer = int(m["layer"]) if "layer" in m.groupdict() else None
                if rule.per_layer:
                    return Target(tuple(rule.path.format(layer=layer).split("/")), None, rule.units, rule.out_map)
                return Target(tuple(rule.path.split("/")), layer, rule.units, rule.out_map)
        return None

    def to_path(module: str) -> Path:
        target = to_target(module)
        if target is None:
            raise NamingSchemeError(f"scheme {name!r} has no place for module {module!r}.")
        return target.path

    def to_module(path: Path) -> str:
        raise NamingSchemeError(
            f"scheme {name!r} maps several torch modules onto stacked/fused weights; "
            f"it cannot name {'/'.join(path)} as one torch module."
        )

    def _layers(rule: TargetRule, index: Mapping[Path, tuple]) -> list[int]:
        regex = _layer_regex(rule.path)
        found = {int(m["layer"]) for p in index if p[-1] in (weight, "scale") and (m := regex.fullmatch("/".join(p[:-1])))}
        return sorted(found)

    def modules(index: Mapping[Path, tuple]) -> list[str]:
        out = []
        for rule in rules:
            if rule.per_layer:
                out += [rule.module.format(layer=i) for i in _layers(rule, index)]
                continue
            base = tuple(rule.path.split("/"))
            entry = index.get(base + (weight,)) or index.get(base + ("scale",))
            if entry is None:
                continue
            if rule.stacked:
                out += [rule.module.format(layer=i) for i in range(entry[0][0])]
            else:
                out.append(rule.module)
        return out

    def from_path(path: Path, shape: tuple[int, ...]) -> list[tuple[str, int | None, tuple]]:
        out = []
        for rule in rules:
            unit = shape[-1] // rule.units
            cols = tuple((s0 * unit, s1 * unit, d0 * unit) for s0, s1, d0 in rule.out_map)
            if rule.per_layer:
                m = _layer_regex(rule.path).fullmatch("/".join(path))
                if m:
                    out.append((rule.module.format(layer=int(m["layer"])), None, cols))
                continue
            if tuple(rule.path.split("/")) != tuple(path):
                continue
            layers = range(shape[0]) if rule.stacked else [None]
            out += [(rule.module.format(layer=layer) if rule.stacked else rule.module, layer, cols) for layer in layers]
        if not out:
            raise NamingSchemeError(f"scheme {name!r} has no torch module for {'/'.join(path)}.")
        return out

    return NamingScheme(name=name, to_path=to_path, to_module=to_module, weight=weight, detect=detect,
                        to_target=to_target, modules=modules, from_path=from_path)
