"""Loading LoRA files into adapter pytrees (the diffusers loader API, for Flax params)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import math
import threading
from typing import Any, Mapping

import jax
import numpy as np

from converters import convert as _convert
from converters import get_family, layout_lycoris, read_state_dict
from converters.formats.peft import parse_metadata
from jlora.errors import InvalidAdapterError, JloraError, KeyMismatchError
from jlora.leaf import DiffLeaf, DoraLeaf, LohaLeaf, LokrLeaf, LoraLeaf, SetLeaf
from jlora.leaf_lycoris import BoftLeaf, GloraLeaf, Ia3Leaf, OftLeaf

PyTree = Any

PASSED_THROUGH = frozenset({"vae", "scheduler", "safety_checker", "feature_extractor", "tokenizer", "tokenizer_2",
                            "tokenizer_3", "image_encoder", "controlnet"})
"""Pipeline components that take no LoRA: `load_lora_weights` gives them `None` and leaves them alone."""

_FILE_KWARGS = ("weight_name", "subfolder", "allow_pickle", "local_files_only", "cache_dir", "revision", "token")


_KEY_ATTR = {
    jax.tree_util.DictKey: "key",
    jax.tree_util.GetAttrKey: "name",
    jax.tree_util.SequenceKey: "idx",
    jax.tree_util.FlattenedIndexKey: "key",
}


def key_name(key) -> str:
    """The string form of one jax key-path entry (dict key, attribute or index)."""
    attr = _KEY_ATTR.get(type(key))
    if attr is not None:
        return str(getattr(key, attr))
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_of(keypath) -> tuple[str, ...]:
    """A jax key path as strings; the `.value` of an nnx Variable is not part of the name."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return tuple(key_name(k) for k in keys)


def shape_index(params: PyTree) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """`{path: (shape, dtype)}` of every array leaf of a params tree (arrays or `jax.ShapeDtypeStruct`s)."""
    return _flat_params(params)[2]


_PATHS: collections.OrderedDict = collections.OrderedDict()  # treedef -> leaf paths, the most recent trees


def _leaf_paths(params: PyTree, treedef, is_leaf=None) -> tuple:
    """The string paths of the leaves of `params` (flattened with `is_leaf` into `treedef`); they depend on the
    structure only, so they are kept per treedef."""
    def compute():
        return tuple(path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0])

    try:
        paths = _PATHS.get(treedef)
    except TypeError:  # a custom node with unhashable metadata: not kept
        return compute()
    if paths is None:
        paths = compute()
        _PATHS[treedef] = paths
        while len(_PATHS) > 16:
            _PATHS.popitem(last=False)
    return paths


def _flat_params(params: PyTree):
    """`(paths, treedef, shape index)` of a params tree, flattened once."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = _leaf_paths(params, treedef)
    index = {path: (tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x)), getattr(x, "dtype", None))
             for path, x in zip(paths, leaves)}
    return paths, treedef, index


def abstract_params(index) -> dict:
    """A nested dict of `jax.ShapeDtypeStruct` from a shape index (`converters.architectures`).

    Loading onto it builds adapters for a model whose weights are not at hand.
    """
    tree: dict = {}
    for path, (shape, dtype) in index.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, dtype)
    return tree


def _split_file_kwargs(kwargs: dict) -> dict:
    unknown = set(kwargs) - set(_FILE_KWARGS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    return kwargs


def select_prefix(tensors: Mapping[str, Any], metadata: Mapping, prefix: str, rename: str = "",
                  origin: str = "<state dict>") -> tuple[dict, dict, list[str]]:
    """The keys (and `lora_adapter_metadata` fields) under `prefix.`, with that prefix replaced by `rename`;
    also the keys left out. The inputs are not modified.

    Raises:
      KeyMismatchError: no key starts with `prefix.`.

    >>> select_prefix({"my_model.unet.a.lora_A.weight": w}, {}, "my_model.unet")[0]
    {'a.lora_A.weight': w}
    """
    head = prefix[:-1] if prefix.endswith(".") else prefix
    head += "."
    kept = {rename + k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    if not kept:
        tops = sorted({k.split(".", 1)[0] for k in tensors})[:8]
        raise KeyMismatchError(
            f"{origin}: no key starts with prefix {head!r} (keys start with {tops}); pass the prefix the file "
            "uses, or prefix=None to take the keys as they are."
        )
    fields = {rename + k[len(head):]: v for k, v in metadata.items() if k.startswith(head)}
    return kept, fields, sorted(k for k in tensors if not k.startswith(head))


def _apply_prefixes(tensors, header, prefixes: Mapping[str, str], origin):
    """`tensors` and header with each `prefixes` entry (new start -> prefix) applied; and the keys left out.

    The empty start `""` (one component) keeps only the keys under its prefix; a component name renames the
    keys under its prefix to `<component>.` and keeps the other keys as they are.
    """
    metadata = parse_metadata(header, origin)
    if list(prefixes) == [""]:
        tensors, metadata, left = select_prefix(tensors, metadata, prefixes[""], "", origin)
    else:
        out, meta, taken = {}, {}, set()
        for component, prefix in prefixes.items():
            kept, fields, left = select_prefix(tensors, metadata, prefix, f"{component}.", origin)
            out.update(kept)
            meta.update(fields)
            taken |= set(tensors) - set(left)
        out.update({k: v for k, v in tensors.items() if k not in taken})
        meta.update({k: v for k, v in metadata.items() if not any(k.startswith(p.rstrip(".") + ".") for p in prefixes.values())})
        tensors, metadata, left = out, meta, []
    return tensors, {**header, "lora_adapter_metadata": metadata}, left


def lora_state_dict(source, *, return_lora_metadata: bool = False, prefix: str | None = None, **file_kwargs):
    """Read a LoRA file (path, directory, Hub repo id or HF cache) as `{key: np.ndarray}`.

    Args:
      source: a `.safetensors` path, a directory holding one, a Hub repo id, or a dict.
      return_lora_metadata: also return the header's `lora_adapter_metadata` dict.
      prefix: keep only the keys (and metadata fields) under `prefix.`, without it (as diffusers'
        `load_lora_adapter(prefix=...)` does); None: all keys as they are.
      **file_kwargs: `weight_name`, `subfolder`, `allow_pickle`, `local_files_only`,
        `cache_dir`, `revision`, `token` (as in diffusers).

    >>> sd = jlora.lora_state_dict("pytorch_lora_weights.safetensors")
    """
    tensors, header, origin = read_state_dict(source, **_split_file_kwargs(file_kwargs))
    if prefix is not None:
        tensors, header, _ = _apply_prefixes(tensors, header, {"": prefix}, origin)
    if return_lora_metadata:
        return tensors, parse_metadata(header, origin)
    return tensors


LEAF_TYPES = {"lora": LoraLeaf, "loha": LohaLeaf, "lokr": LokrLeaf, "diff": DiffLeaf, "dora": DoraLeaf, "set": SetLeaf,
              "ia3": Ia3Leaf, "glora": GloraLeaf, "oft": OftLeaf, "boft": BoftLeaf}
_STATIC = (bool, str, tuple)  # leaf fields that stay on the host (static pytree fields)


def _host_field(value):
    if isinstance(value, _STATIC):
        return value
    if isinstance(value, (int, float)):
        return np.float32(value)
    return np.asarray(value)


def to_device(arrays, dtype=None) -> list:
    """`arrays` (cast to `dtype` if given) as device arrays that share no memory with them.

    A dense array is copied first (on CPU the device would otherwise use its memory in place, so an
    adapter would change with the caller's state dict, or read a memory-mapped file); the strided
    views of the layout rules are copied by the transfer itself, into the device's layout.
    """
    host = [np.array(a, dtype=dtype) if dtype is not None or a.flags.c_contiguous else a for a in arrays]
    return list(jax.device_put(host))


def make_leaves(placements, dtype=None) -> list:
    """Adapter leaf objects of converter placements, their arrays moved to the device in one batched transfer.

    Every array is copied exactly once, so no leaf shares memory with the file or the caller's
    tensors (`to_device`). Scalars (alphas, factors) with the same value share one device array.
    """
    host = [{k: _host_field(v) for k, v in p.fields.items()} for p in placements]
    moved = iter(to_device([v for fields in host for v in fields.values() if not isinstance(v, _STATIC) and np.ndim(v) > 0],
                           dtype))
    scalars = sorted({float(v) for fields in host for v in fields.values() if not isinstance(v, _STATIC) and np.ndim(v) == 0})
    moved_scalars = dict(zip(scalars, jax.device_put([np.float32(x) for x in scalars])))
    leaves = []
    for p, fields in zip(placements, host):
        kwargs = {
            k: v if isinstance(v, _STATIC) else (moved_scalars[float(v)] if np.ndim(v) == 0 else next(moved))
            for k, v in fields.items()
        }
        leaves.append(LEAF_TYPES[p.leaf](**kwargs))
    return leaves


def _with_bases(params: PyTree, placements) -> list:
    """Placements whose delta depends on the base weight (T-LoRA) completed from `params`."""
    if not any(p.leaf == "tlora" for p in placements):
        return placements
    wanted = {p.path for p in placements if p.leaf == "tlora"}
    kernels = {path_of(kp): v for kp, v in jax.tree_util.tree_leaves_with_path(params) if path_of(kp) in wanted}
    for p in placements:
        if p.leaf == "tlora" and isinstance(kernels[p.path], jax.ShapeDtypeStruct):
            raise InvalidAdapterError(
                f"{p.record.sources['tlora_q']}: a T-LoRA delta subtracts the truncated SVD of the base weight "
                f"{'/'.join(p.path)} {tuple(kernels[p.path].shape)}, but the params hold only its shape; load it onto "
                "params with their values (not jlora.abstract_params or jax.eval_shape output)."
            )
    return [dataclasses.replace(p, leaf="lora", fields=layout_lycoris.with_tlora_base(p.fields, kernels[p.path]))
            if p.leaf == "tlora" else p for p in placements]


def host_leaves(placements) -> list:
    """Adapter leaf objects holding the converter's host arrays as they are: views of the file or of the
    caller's tensors, not copies. Only for a consumer that copies them into device buffers at once (the
    donated padding of `jlora.hotswap_lora`); an adapter that outlives the call comes from `make_leaves`."""
    return [LEAF_TYPES[p.leaf](**{k: _host_field(v) for k, v in p.fields.items()}) for p in placements]


def _build_adapter(params: PyTree, placements, dtype, flat, host: bool = False) -> PyTree:
    """The adapter tree: params' structure (`flat`, from `_flat_params`), a leaf at each placement, else None.
    `host`: leaves of host views (`host_leaves`) instead of device arrays."""
    placements = _with_bases(params, placements)
    leaves = host_leaves(placements) if host else make_leaves(placements, dtype)
    by_path = {p.path: leaf for p, leaf in zip(placements, leaves)}
    paths, treedef, _ = flat
    return jax.tree_util.tree_unflatten(treedef, [by_path.get(path) for path in paths])


SIZE_SLACK = 4
SIZE_FLOOR = 2**22


def max_target_elements(indexes) -> int:
    """The size bound of any tensor a LoRA file for these params can hold: `SIZE_SLACK` times the largest
    weight (a full diff or a LoKr factor is at most one weight; layer-stacked weights count whole), and at
    least `SIZE_FLOOR`. A tensor past it is refused before it is read; one below it that fits no weight
    still gets the usual key and shape errors."""
    sizes = [math.prod(shape) for index in indexes.values() for shape, _ in index.values()]
    return max(SIZE_SLACK * max(sizes, default=0), SIZE_FLOOR)


_gc_lock = threading.Lock()
_gc_state = {"depth": 0, "was_enabled": False}


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while a load runs (restored after the last concurrent load).

    A load allocates tens of thousands of small objects (records, placements, array views); each burst of them
    can start a full collection over every object of the process, which at SDXL size costs as much as the
    conversion. Any cycle left behind (an exception's traceback) is collected once the collector is back on."""
    with _gc_lock:
        if _gc_state["depth"] == 0:
            _gc_state["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_state["depth"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_state["depth"] -= 1
            if _gc_state["depth"] == 0 and _gc_state["was_enabled"]:
                gc.enable()


def _load(source, targets: Mapping[str, PyTree], **kwargs):
    with _collector_paused():
        return _load_unpaused(source, targets, **kwargs)


def _load_unpaused(source, targets: Mapping[str, PyTree], *, default_component, format, schemes, strict, dtype, metadata,
                   file_kwargs, prefixes=None, family=None, host=False):
    flats = {c: _flat_params(p) for c, p in targets.items()}
    indexes = {c: flat[2] for c, flat in flats.items()}
    tensors, header, origin = read_state_dict(source, max_elements=max_target_elements(indexes), mapped=True,
                                              **_split_file_kwargs(file_kwargs))
    if metadata is not None:
        header = {**header, "lora_adapter_metadata": metadata}
    left = []
    if prefixes:
        tensors, header, left = _apply_prefixes(tensors, header, prefixes, origin)
    placements, report = _convert(
        tensors, header, indexes, default_component=default_component, format=format, schemes=schemes, strict=strict,
        origin=origin, family=family,
    )
    report.outside_prefix = left
    adapters = {c: _build_adapter(targets[c], placements[c], dtype, flats[c], host) for c in targets}
    return adapters, report


def load_lora(
    source,
    params: PyTree,
    component: str | None = None,
    *,
    format: str | None = None,
    scheme=None,
    strict: bool = True,
    dtype=None,
    metadata: Mapping | None = None,
    adapter_name: str | None = None,
    return_report: bool = False,
    prefix: str | None = None,
    **file_kwargs,
):
    """Load the LoRA for one component into an adapter tree shaped like `params`.

    Keys without a component prefix are taken as this component's; keys of other
    components (`text_encoder.` when `component="unet"`) are skipped and reported.

    Args:
      source: file, directory, Hub repo id or state dict.
      params: the component's Flax params (linen dict / FrozenDict).
      component: `unet`, `text_encoder`, `text_encoder_2` or `transformer`.
      format: force a format instead of detecting it.
      scheme: naming scheme name or object (default: detected from `params`).
      strict: raise on keys that cannot be placed (else warn and list them in the report).
      dtype: cast factors to this dtype (default: the file's dtype).
      metadata: `lora_adapter_metadata` to use for a state dict without a header.
      adapter_name: name recorded in the report.
      return_report: also return the `LoadReport`.
      prefix: as in diffusers' `load_lora_adapter`: only the keys under `prefix.` (e.g. `"transformer"`,
        `"my_model.unet"`) are this component's, read without it; the others are left out and listed in
        the report's `outside_prefix`. None (default): the keys as they are (the component prefixes a
        format knows, `unet.`, `lora_unet_` ..., are still recognised; keys without one are this component's).

    >>> adapter = jlora.load_lora("lora.safetensors", unet_params, "unet")
    >>> adapter = jlora.load_lora("lora.safetensors", params, "transformer", prefix="my_model.transformer")
    """
    name = component or "default"
    adapters, report = _load(
        source,
        {name: params},
        default_component=name,
        format=format,
        schemes={name: scheme} if scheme is not None else None,
        strict=strict,
        dtype=dtype,
        metadata=metadata,
        file_kwargs=file_kwargs,
        prefixes=None if prefix is None else {"": prefix},
    )
    report.adapter_name = adapter_name
    return (adapters[name], report) if return_report else adapters[name]


def load_lora_weights(
    source,
    params: Mapping[str, PyTree],
    family: str | None = None,
    *,
    format: str | None = None,
    schemes: Mapping[str, Any] | None = None,
    strict: bool = True,
    dtype=None,
    metadata: Mapping | None = None,
    adapter_name: str | None = None,
    return_report: bool = False,
    load_into_transformer_2: bool = False,
    prefix: Mapping[str, str] | None = None,
    **file_kwargs,
):
    """Load a pipeline LoRA file into adapters for several components.

    Keys are split by their component prefix (`unet.`, `text_encoder.`,
    `text_encoder_2.`, `transformer.`). Every component in `params` gets an
    adapter (all `None` when the file has nothing for it); keys of components not
    in `params` are skipped and listed in the report.

    Args:
      source: file, directory, Hub repo id or state dict.
      params: component name -> that component's params.
      family: `sd`, `sdxl`, `flux`, `sd3`, `z_image`, ...; checks the component names, and reads keys several
        families' formats share as this family's (a file of Lumina-2 / Z-Image shared names, with `"z_image"`).
      format, strict, dtype, metadata, adapter_name, return_report: as in `load_lora`.
      schemes: component -> naming scheme (default: detected per params tree).
      load_into_transformer_2: load the file's transformer LoRA into `params["transformer_2"]` (Wan 2.2's
        second expert) instead, as diffusers' `load_lora_weights(..., load_into_transformer_2=True)`;
        the other components get `None` and the report names the file's component, `transformer`.
      prefix: component -> the prefix its keys have in the file (`{"unet": "my_model.unet"}`); keys under
        it are read as that component's, other keys as they are.
      **file_kwargs: `weight_name`, `subfolder`, `allow_pickle`, `local_files_only`,
        `cache_dir`, `revision`, `token`.

    Returns:
      `{component: adapter}` (and the `LoadReport` when `return_report=True`).

    >>> adapters = jlora.load_lora_weights("lora.safetensors", {"unet": up, "text_encoder": tp}, family="sd")
    """
    fam = get_family(family)
    if not isinstance(params, Mapping) or not params:
        raise JloraError("load_lora_weights: params must be a dict {component: params}, e.g. {'unet': unet_params}.")
    targets = {c: p for c, p in params.items() if c not in PASSED_THROUGH}
    if fam is not None:
        extra = set(targets) - set(fam.components)
        if extra:
            raise JloraError(f"family {fam.name!r} has components {list(fam.components)}, not {sorted(extra)} "
                             f"(components that take no LoRA, {sorted(PASSED_THROUGH)}, are passed through).")
    if not targets:
        raise JloraError(f"load_lora_weights: none of the components {sorted(params)} takes LoRAs.")
    if load_into_transformer_2:
        targets = _as_transformer(targets)
    adapters, report = _load(
        source,
        targets,
        default_component=None,
        format=format,
        schemes=schemes,
        strict=strict,
        dtype=dtype,
        metadata=metadata,
        file_kwargs=file_kwargs,
        prefixes=_component_prefixes(prefix, targets),
        family=family,
    )
    report.adapter_name = adapter_name
    if load_into_transformer_2:
        adapters = {"transformer_2": adapters["transformer"]}
    adapters = {c: adapters.get(c) for c in params}  # vae, scheduler, ...: passed through as None
    return (adapters, report) if return_report else adapters


def _component_prefixes(prefix, targets) -> dict | None:
    if prefix is None:
        return None
    if not isinstance(prefix, Mapping) or not all(isinstance(v, str) and v for v in prefix.values()):
        raise JloraError(f"load_lora_weights: prefix must map components to key prefixes, e.g. "
                         f"{{'unet': 'my_model.unet'}}, got {prefix!r}.")
    extra = set(prefix) - set(targets)
    if extra:
        raise JloraError(f"load_lora_weights: prefix names components {sorted(extra)} that are not among {sorted(targets)}.")
    return dict(prefix)


def _as_transformer(targets: Mapping[str, PyTree]) -> dict:
    """The `transformer_2` params as the target of a file's `transformer` keys (Wan 2.2's second expert)."""
    if "transformer_2" not in targets:
        raise JloraError(f"load_into_transformer_2=True needs params['transformer_2'] (Wan 2.2's second expert); "
                         f"params has {sorted(targets)}.")
    return {"transformer": targets["transformer_2"]}


def apply_pipeline(params: Mapping[str, PyTree], adapters: Mapping[str, PyTree | None], scale=1.0, *,
                   text_encoder_scale=None) -> dict:
    """A pipeline's params dict (e.g. `FlaxStableDiffusionPipeline`'s) with each component's adapter merged.

    Components without an adapter (`vae`, `scheduler`, ...) are passed through as the same objects.
    The denoiser gets `scale`; text encoders get `text_encoder_scale` (default: `scale`, as diffusers
    applies its `lora_scale` to both). Jittable.

    >>> adapters = jlora.load_lora_weights("lora.safetensors", pipeline_params, family="sd")
    >>> images = pipeline(prompt_ids, jlora.apply_pipeline(pipeline_params, adapters, 0.8), rng, 30).images
    """
    from jlora.core import apply

    te_scale = scale if text_encoder_scale is None else text_encoder_scale
    out = dict(params)
    for c, adapter in adapters.items():
        if adapter is not None and c in params:
            out[c] = apply(params[c], adapter, te_scale if c.startswith("text_encoder") else scale)
    return out
