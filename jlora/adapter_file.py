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
import numpy as np

from converters.errors import CorruptFileError, InvalidAdapterError, KeyMismatchError, ShapeMismatchError
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
                elif value is not None:  # an optional field left unset (a LoHa/LoKr without DoRA magnitude)
                    tensors[f"{name}/{f.name}"] = to_host(value)
            layout[name] = {"kind": kind, "static": statics}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, {HEADER_KEY: json.dumps(layout, sort_keys=True)})
    return os.fspath(path)


def _layout(path, header) -> dict:
    if HEADER_KEY not in header:
        raise CorruptFileError(f"{path}: not a jlora adapter file (no {HEADER_KEY!r} header); use jlora.load_lora_weights.")
    try:
        layout = json.loads(header[HEADER_KEY])
    except ValueError as e:
        raise CorruptFileError(f"{path}: header {HEADER_KEY!r} is not JSON ({e}).") from None
    if not isinstance(layout, dict):
        raise CorruptFileError(f"{path}: header {HEADER_KEY!r} is not a JSON object.")
    return layout


def _leaf(path, name: str, spec, tensors: Mapping[str, np.ndarray]):
    """One leaf of the file, its fields checked: known kind, every tensor present and finite."""
    if not isinstance(spec, dict) or spec.get("kind") not in LEAF_TYPES or not isinstance(spec.get("static", {}), dict):
        raise CorruptFileError(f"{path}: {name}: leaf spec {str(spec)[:100]!r} is not {{'kind': one of "
                               f"{sorted(LEAF_TYPES)}, 'static': {{...}}}}.")
    cls = LEAF_TYPES[spec["kind"]]
    fields = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("static"):
            continue
        key = f"{name}/{f.name}"
        if key not in tensors and f.default is None:
            continue  # optional field (default None)
        if key not in tensors:
            raise CorruptFileError(f"{path}: {spec['kind']} leaf {name} has no tensor {key!r}.")
        value = np.asarray(tensors[key])
        if value.dtype.kind == "f" or value.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            if not np.isfinite(value.astype(np.float32)).all():
                raise InvalidAdapterError(f"{path}: tensor {key!r} has non-finite values.")
        fields[f.name] = jnp.asarray(value)
    try:
        static = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("static", {}).items()}  # JSON lists
        return cls(**fields, **static)
    except TypeError as e:
        raise CorruptFileError(f"{path}: {name}: static fields {spec.get('static')!r} do not fit a {spec['kind']} leaf "
                               f"({e}).") from None


def _check_leaf_shape(path, name: str, leaf, weight) -> None:
    want = tuple(np.shape(weight))
    try:
        multiplicative = leaf.invertible and not leaf.additive  # IA3, GLoRA, OFT, BOFT: no delta without W
        got = tuple(leaf.shape) if multiplicative else tuple(jax.eval_shape(leaf.delta).shape)
    except (TypeError, ValueError) as e:
        fields = {f.name: tuple(np.shape(getattr(leaf, f.name))) for f in dataclasses.fields(leaf)
                  if not f.metadata.get("static")}
        raise ShapeMismatchError(f"{path}: {name}: factors {fields} do not make a delta ({e}).") from None
    if got != want:
        raise ShapeMismatchError(f"{path}: {name}: the leaf's delta has shape {got} but the weight has shape {want}; "
                                 "the file was saved for other params.")


def load_adapters(path: str | os.PathLike, params: Mapping[str, PyTree]) -> dict[str, PyTree]:
    """Read a `save_adapters` file back as adapter trees shaped like `params` (component -> params).

    Raises:
      CorruptFileError: not a jlora adapter file, or a leaf spec or tensor is missing or malformed.
      InvalidAdapterError: a tensor has non-finite values.
      KeyMismatchError, ShapeMismatchError: the file was saved for other params.
    """
    tensors, header = load_file(path)
    layout = _layout(path, header)
    leaves: dict[str, dict[tuple[str, ...], Any]] = {}
    for name, spec in layout.items():
        component, *rest = name.split("/")
        leaves.setdefault(component, {})[tuple(rest)] = _leaf(path, name, spec, tensors)
    unknown = set(leaves) - set(params)
    if unknown:
        raise KeyMismatchError(f"{path}: adapters for components {sorted(unknown)} but params only for {sorted(params)}.")
    out = {}
    for component, tree in params.items():
        mine = leaves.get(component, {})
        flat = {path_of(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        missing = set(mine) - set(flat)
        if missing:
            raise KeyMismatchError(f"{path}: {component} adapter paths not in the params tree: {sorted(missing)[:5]}.")
        for p, leaf in mine.items():
            _check_leaf_shape(path, f"{component}/{'/'.join(p)}", leaf, flat[p])
        out[component] = jax.tree_util.tree_map_with_path(lambda kp, _: mine.get(path_of(kp)), tree)
    return out
