"""Base-weight checkpoints: which torch tensors make each leaf of a Flax params tree.

A base checkpoint takes the LoRA road without the low-rank middle: a Flax leaf path
goes through a naming scheme to the torch module(s) stored in it (`NamingScheme.sources`:
stacked layers and fused output columns included), the leaf name to the torch parameter
name, and `converters.layout`'s axis order to the torch layout. The result is a *plan*:
per Flax leaf, a few `Read`s, each naming one torch key and where its block goes. A plan
reads any rectangular block of a leaf by reading only the matching slices of the torch
tensors (`read_block`), so a process loads just the shards its devices hold.

Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from converters.errors import CorruptFileError, KeyMismatchError, ModelFileNotFoundError, ShapeMismatchError, UnsupportedModelError
from converters.layout import weight_to_flax
from converters.naming import NamingScheme, get_scheme
from converters.safetensors_io import SafetensorsFile, open_file

Path = tuple[str, ...]
Index = Mapping[Path, tuple[tuple[int, ...], np.dtype]]

# Flax leaf name -> torch parameter names, in the order they are tried.
LEAF_NAMES: dict[str, tuple[str, ...]] = {
    "kernel": ("weight",),
    "scale": ("weight", "scale", "gamma"),
    "embedding": ("weight",),
    "bias": ("bias", "beta"),
    "weight": ("weight",),
}

# Module names that diffusers' Flax models spell differently from torch (the VAE's attention),
# with the old torch spellings that diffusers still loads.
MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("to_q",),
    "key": ("to_k",),
    "value": ("to_v",),
    "proj_attn": ("to_out.0",),
}

_AXES = {2: (1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}  # Flax axis i holds torch axis perm[i]


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from a file (a config, a model index); typed errors for a missing or malformed file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFileNotFoundError(f"{path}: no such file.") from None
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{path}: not a JSON file ({type(e).__name__}: {e}).") from None
    if not isinstance(data, dict):
        raise UnsupportedModelError(f"{path}: not a JSON object.")
    return data


@dataclasses.dataclass(frozen=True)
class Read:
    """One torch tensor's part of a Flax leaf.

    Attributes:
      key: the tensor's key in the checkpoint.
      layer: index on the leaf's leading stacked-layer axis, or None.
      cols: `(src_start, src_stop, dst_start)` on the output (last Flax) axis; empty: all of it.
      perm: Flax axis i is torch axis `perm[i]` (empty: same axes); None: the torch tensor is
        reshaped, not only transposed (read whole, converted with `weight_to_flax`).
    """

    key: str
    layer: int | None = None
    cols: tuple[tuple[int, int, int], ...] = ()
    perm: tuple[int, ...] | None = ()
    shape: tuple[int, ...] = ()  # the source's block in Flax layout (its own axes, no layer axis)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """The tensors of one model: key -> the open file that holds it (one file, or an index's shards)."""

    files: tuple[SafetensorsFile, ...]
    where: Mapping[str, SafetensorsFile]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key].shape(key)

    def read(self, key: str, index=None) -> np.ndarray:
        return self.where[key].read(key, index)

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self.files)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def weight_files(directory: str, variant: str | None = None) -> list[str]:
    """The safetensors files of a diffusers/transformers model folder (an index's shards, or one file)."""
    infix = f".{variant}" if variant else ""
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    indexes = [n for n in names if n.endswith(f"{infix}.safetensors.index.json")
               and (variant or n.count(".") == 3)]
    if indexes:
        path = os.path.join(directory, indexes[0])
        try:
            with open(path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(f"{path}: not a safetensors index ({type(e).__name__}: {e}).") from None
        for shard in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise CorruptFileError(f"{path}: shard name {shard!r} must be a file name in {directory}.")
        return [os.path.join(directory, s) for s in shards]
    files = [n for n in names if n.endswith(f"{infix}.safetensors") and (variant or n.count(".") == 1)]
    if not files:
        found = ", ".join(names[:10]) or "nothing"
        hint = " (.bin files need torch; convert them to safetensors)" if any(n.endswith(".bin") for n in names) else ""
        raise ModelFileNotFoundError(
            f"{directory}: no{f' {variant}' if variant else ''} .safetensors weights here (found: {found}){hint}."
        )
    return [os.path.join(directory, n) for n in files]


def open_checkpoint(paths: str | Sequence[str]) -> Checkpoint:
    """Open one safetensors file or several shards (each once); a key in two shards is an error."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[SafetensorsFile] = []
    where: dict[str, SafetensorsFile] = {}
    try:
        for p in paths:
            f = open_file(p)
            files.append(f)
            for k in f.keys():
                if k in where:
                    raise CorruptFileError(f"{p}: tensor {k!r} is also in {where[k].path}; shards must not overlap.")
                where[k] = f
    except BaseException:
        for f in files:
            f.close()
        raise
    return Checkpoint(tuple(files), where)


def _module_candidates(module: str, aliases: Mapping[str, tuple[str, ...]]) -> list[str]:
    head, _, last = module.rpartition(".")
    out = [module]
    for alias in aliases.get(last, ()):
        out.append(f"{head}.{alias}" if head else alias)
    return out


def _perm(torch_shape: tuple[int, ...], flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...] | None:
    if leaf != "kernel":
        return () if torch_shape == flax_shape else None
    perm = _AXES.get(len(torch_shape))
    if perm is not None and len(flax_shape) == len(torch_shape):
        return perm
    return None


def _expected(shape: tuple[int, ...], layer, cols) -> tuple[int, ...]:
    """The Flax-layout shape of one source's block in a leaf of `shape`."""
    per_layer = shape[1:] if layer is not None else shape
    if cols:
        width = sum(s1 - s0 for s0, s1, _ in cols)
        per_layer = per_layer[:-1] + (width,)
    return tuple(per_layer)


def plan(
    index: Index,
    keys: Mapping[str, tuple[int, ...]],
    scheme: str | NamingScheme,
    *,
    prefix: str = "",
    aliases: Mapping[str, tuple[str, ...]] = MODULE_ALIASES,
    synthesize: Callable[[Path], str | None] = lambda path: None,
) -> tuple[dict[Path, tuple[Read, ...]], list[str]]:
    """`({flax leaf path: reads}, unused checkpoint keys)` for the params described by `index`.

    Args:
      index: `{path: (shape, dtype)}` of the target params (e.g. `shape_index(jax.eval_shape(...))`).
      keys: `{torch key: shape}` of the checkpoint.
      scheme: the naming scheme of the params tree.
      prefix: prepended to every torch module name (e.g. `"model.diffusion_model."`).
      aliases: other torch spellings of a module's last name part.
      synthesize: leaves the checkpoint may lack, filled by the caller (return a reason; None: required).

    Raises:
      KeyMismatchError: a leaf has no tensor (names the leaf and the keys tried).
      ShapeMismatchError: a tensor has a shape that does not fit its leaf.
    """
    scheme = get_scheme(scheme)
    out: dict[Path, tuple[Read, ...]] = {}
    used: set[str] = set()
    missing: list[tuple[Path, list[str]]] = []
    for path, (shape, _) in index.items():
        leaf = path[-1]
        torch_leaves = LEAF_NAMES.get(leaf, (leaf,))
        reads = []
        for module, layer, cols in scheme.sources(path[:-1], tuple(shape)):
            tried = [f"{prefix}{m}.{t}" for m in _module_candidates(module, aliases) for t in torch_leaves]
            key = next((k for k in tried if k in keys), None)
            if key is None:
                missing.append((path, tried))
                continue
            want = _expected(tuple(shape), layer, cols)
            got = tuple(keys[key])
            perm = _perm(got, want, leaf)
            fits = perm is not None and tuple(got[p] for p in perm or range(len(got))) == want
            if not fits:
                converted = weight_to_flax(np.empty(got, np.int8), want).shape if leaf == "kernel" else got
                if tuple(converted) != want:
                    raise ShapeMismatchError(
                        f"{key}: checkpoint tensor of shape {got} does not fit {'/'.join(path)}, which needs "
                        f"{want} in Flax layout. Is the config the checkpoint's?"
                    )
                perm = None
            reads.append(Read(key, layer, cols, perm, want))
            used.add(key)
        if reads:
            out[path] = tuple(reads)
    unresolved = [f"{'/'.join(p)} (tried {', '.join(t[:3])})" for p, t in missing if synthesize(p) is None]
    if unresolved:
        raise KeyMismatchError(
            f"the checkpoint lacks {len(unresolved)} weights of the model, e.g. {unresolved[:3]}. "
            "Is this the right component folder, and its config the checkpoint's?"
        )
    return out, sorted(set(keys) - used)


def _span(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"only contiguous blocks can be read, got {s}")
    return start, max(stop, start)


def read_block(ckpt: Checkpoint, reads: Iterable[Read], shape: Sequence[int], index: Sequence[slice],
               dtype) -> np.ndarray:
    """The block `index` (one slice per axis) of a Flax leaf of `shape`, read slice by slice, as `dtype`."""
    shape = tuple(shape)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    spans = [_span(s, n) for s, n in zip(index, shape)]
    out = np.zeros(tuple(b - a for a, b in spans), dtype)
    for r in reads:
        lead: tuple = ()
        sub = spans
        if r.layer is not None:
            lo, hi = spans[0]
            if not lo <= r.layer < hi:
                continue
            lead, sub = (r.layer - lo,), spans[1:]
        if not r.cols:
            out[lead + (Ellipsis,)] = _read_source(ckpt, r, sub)
            continue
        c_lo, c_hi = sub[-1]
        for s0, s1, d0 in r.cols:
            a, b = max(c_lo, d0), min(c_hi, d0 + s1 - s0)
            if a < b:
                block = _read_source(ckpt, r, sub[:-1] + [(s0 + a - d0, s0 + b - d0)])
                out[lead + (Ellipsis, slice(a - c_lo, b - c_lo))] = block
    return out


def _read_source(ckpt: Checkpoint, r: Read, spans) -> np.ndarray:
    """The block `spans` (Flax axes of the source's own layout) of one source tensor, in Flax layout."""
    box = tuple(slice(a, b) for a, b in spans)
    if r.perm is None:  # reshaped (Linear <-> 1x1 conv): small tensors, read whole
        return weight_to_flax(ckpt.read(r.key), r.shape)[box]
    if not r.perm:
        return ckpt.read(r.key, box)
    torch_index = [slice(None)] * len(r.perm)
    for i, p in enumerate(r.perm):
        torch_index[p] = box[i]
    return ckpt.read(r.key, tuple(torch_index)).transpose(r.perm)
