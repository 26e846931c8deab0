"""Adapter files in jlora's own layout: Flax paths, Flax layout, every leaf kind.

`save_adapters` writes `{component: adapter}` to one safetensors file with keys
`{component}/{path}/{field}` and the leaf kinds in the header; `load_adapters`
rebuilds the adapter trees on params of the same structure. Unlike diffusers files
this keeps LoHa, LoKr, DoRA and diff leaves, and needs no renaming on load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from converters.errors import CorruptFileError, KeyMismatchError
from converters.safetensors_io import load_file, save_file
from jlora.leaf import is_adapter_leaf
from jlora.loading import LEAF_TYPES, path_of
from jlora.sharding import to_host

PyTree = Any
HEADER_KEY = "jlora_adapters"
_KIND_OF = {cls: name for name, cls in LEAF_TYPES.items()}


def save_adapters(path: str | os.PathLike, adapters: Mapping[str, PyTree]) -> str:
    """Write adapters (any leaf kinds) to a safetensors file in Flax layout; returns the path."""
    tensors, layout = {}, {}
    for component, adapter in adapters.items():
        flat = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_adapter_leaf)[0]
        for kp, leaf in flat:
            if leaf is None:
                continue
            name = f"{component}/{'/'.join(path_of(kp))}"
            kind = _KIND_OF.get(type(leaf))
            if kind is None:
                raise KeyMismatchError(f"{name}: {type(leaf).__name__} leaves cannot be saved; fuse them instead.")
            statics = {}
            for f in dataclasses.fields(leaf):
                value = getattr(leaf, f.name)
                if f.metadata.get("static"):
                    statics[f.name] = value
                else:
                    tensors[f"{name}/{f.name}"] = to_host(value)
            layout[name] = {"kind": kind, "static": statics}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, {HEADER_KEY: json.dumps(layout, sort_keys=True)})
    return os.fspath(path)


def load_adapters(path: str | os.PathLike, params: Mapping[str, PyTree]) -> dict[str, PyTree]:
    """Read a `save_adapters` file back as adapter trees shaped like `params` (component -> params)."""
    tensors, header = load_file(path)
    if HEADER_KEY not in header:
        raise CorruptFileError(f"{path}: not a jlora adapter file (no {HEADER_KEY!r} header); use jlora.load_lora_weights.")
    layout = json.loads(header[HEADER_KEY])
    leaves: dict[str, dict[tuple[str, ...], Any]] = {}
    for name, spec in layout.items():
        component, *rest = name.split("/")
        cls = LEAF_TYPES[spec["kind"]]
        fields = {f.name: jnp.asarray(tensors[f"{name}/{f.name}"]) for f in dataclasses.fields(cls) if not f.metadata.get("static")}
        leaves.setdefault(component, {})[tuple(rest)] = cls(**fields, **spec["static"])
    unknown = set(leaves) - set(params)
    if unknown:
        raise KeyMismatchError(f"{path}: adapters for components {sorted(unknown)} but params only for {sorted(params)}.")
    out = {}
    for component, tree in params.items():
        mine = leaves.get(component, {})
        built = jax.tree_util.tree_map_with_path(lambda kp, _: mine.get(path_of(kp)), tree)
        missing = set(mine) - {path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
        if missing:
            raise KeyMismatchError(f"{path}: {component} adapter paths not in the params tree: {sorted(missing)[:5]}.")
        out[component] = built
    return out
