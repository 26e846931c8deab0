"""Named adapters per component with diffusers' verbs, as pure values.

`Adapters` holds adapters by name and component, which of them are active, a weight tree per
(name, component) with one float32 scalar per adapted weight, and an enabled switch. Every verb
returns a new `Adapters`; nothing is global. `resolve(adapters, component)` gives the one adapter
tree to merge (`jlora.apply`, `jlora.fuse`): the active adapters combined with their per-weight
weights, times 0 when disabled. The weights and the switch are arrays, so changing them inside a
jitted step's arguments never recompiles; the active set and the names are static.

>>> ad = jlora.Adapters.of({"pixel": {"unet": a, "text_encoder": b}, "toy": {"unet": c}})
>>> ad = jlora.set_adapters(ad, ["pixel", "toy"], [{"unet": {"down": 0.9, "up": {"block_1": [0.4, 1.0, 0.6]}},
...                                                 "text_encoder": 0.5}, 0.7])
>>> step = jax.jit(lambda p, ad, x: unet.apply({"params": jlora.apply(p, jlora.resolve(ad, "unet"))}, x))

The weights follow diffusers' `set_adapters`: a number for every weight of every component; a
dict by component; for a UNet, block-wise scales `{"down": ..., "mid": ..., "up": ...}` expanded as
diffusers' `_maybe_expand_lora_scales` does (per down/up block with attentions, per attention
layer) and matched to modules as PEFT's `set_weights_and_activate_adapters` does: the first
expanded layer name contained in the module name, else the attention of the same block and index,
else 1.0.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from converters.naming import detect_scheme, get_scheme
from jlora.core import combine
from jlora.errors import InvalidAdapterError, KeyMismatchError
from jlora.leaf import LoraLeaf, SumLeaf, is_adapter_leaf
from jlora.loading import path_of, shape_index

PyTree = Any

__all__ = ["Adapters", "delete_adapters", "disable_lora", "enable_lora", "get_active_adapters", "get_list_adapters",
           "resolve", "set_adapters", "set_lora_device"]


def _static():
    return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapters:
    """Adapters by name and component, the active names, per-weight weights and an enabled switch.

    Attributes:
      trees: `{name: {component: adapter tree}}`.
      weights: `{name: {component: tree of float32 scalars shaped like the adapter}}`.
      active: the active adapter names, in order (static).
      enabled: float32 scalar, 1.0 or 0.0 (`enable_lora` / `disable_lora`).
    """

    trees: Mapping[str, Mapping[str, PyTree]]
    weights: Mapping[str, Mapping[str, PyTree]]
    enabled: jax.Array
    active: tuple[str, ...] = _static()

    @staticmethod
    def of(trees: Mapping[str, Mapping[str, PyTree]], active: Sequence[str] | None = None) -> "Adapters":
        """A collection of `{name: {component: adapter}}`, every weight 1.0, all (or `active`) active."""
        if not isinstance(trees, Mapping) or not all(isinstance(v, Mapping) for v in trees.values()):
            raise InvalidAdapterError("Adapters.of: pass {name: {component: adapter}}, e.g. {'style': {'unet': a}}.")
        trees = {str(n): dict(c) for n, c in trees.items()}
        weights = {n: {c: _uniform(a, 1.0) for c, a in comps.items()} for n, comps in trees.items()}
        names = tuple(trees) if active is None else _known(tuple(active), trees, "Adapters.of")
        return Adapters(trees, weights, jnp.float32(1.0), names)

    def __repr__(self) -> str:
        parts = []
        for n, comps in self.trees.items():
            counts = ", ".join(f"{c}: {sum(1 for x in jax.tree.leaves(a, is_leaf=is_adapter_leaf) if x is not None)}"
                               for c, a in comps.items())
            parts.append(f"{n}{'*' if n in self.active else ''} ({counts})")
        return f"Adapters({'; '.join(parts)}; enabled={bool(self.enabled) if not _traced(self.enabled) else '?'})"


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _known(names: tuple[str, ...], trees: Mapping, what: str) -> tuple[str, ...]:
    missing = [n for n in names if n not in trees]
    if missing:
        raise KeyMismatchError(f"{what}: adapter names {missing} are not loaded; loaded: {sorted(trees)}.")
    return names


def _uniform(adapter: PyTree, value) -> PyTree:
    v = jnp.asarray(value, jnp.float32)
    return jax.tree.map(lambda leaf: None if leaf is None else v, adapter, is_leaf=is_adapter_leaf)


# --------------------------------------------------------------------------------------------
# diffusers' block-wise UNet scales
# --------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"^(down|up)_blocks[._](\d+)$")


def _unet_layout(paths) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Blocks with attentions and attentions per block, read off the adapter's (or params') paths."""
    found: dict[str, dict[int, set]] = {"down": {}, "up": {}}
    for p in paths:
        if len(p) >= 2:
            m = _BLOCK.match(p[0])
            a = re.match(r"^attentions[._](\d+)$", p[1])
            if m and a:
                found[m.group(1)].setdefault(int(m.group(2)), set()).add(int(a.group(1)))
    blocks = {k: sorted(v) for k, v in found.items()}
    per_block = {k: max((len(s) for s in v.values()), default=0) for k, v in found.items()}
    return blocks, per_block


def expand_block_scales(scales, blocks: Mapping[str, list[int]], per_block: Mapping[str, int], modules: Sequence[str],
                        default: float = 1.0):
    """diffusers' `_maybe_expand_lora_scales_for_one_adapter`: a block-wise dict -> `{layer name: weight}`
    (`down_blocks.1.attentions.0` ...); a number stays a number."""
    if not isinstance(scales, Mapping):
        return scales
    unknown = set(scales) - {"down", "mid", "up"}
    if unknown:
        raise InvalidAdapterError(f"block-wise scales have keys {sorted(unknown)}; use 'down', 'mid' and 'up'.")
    scales = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in scales.items()}
    out = {}
    mid = scales.get("mid", default)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise InvalidAdapterError(f"block-wise scales: expected 1 scale for mid, got {len(mid)}.")
        mid = mid[0]
    out["mid_block.attentions.0"] = mid
    for updown in ("up", "down"):
        value = scales.get(updown, default)
        if not isinstance(value, Mapping):
            value = {f"block_{i}": value for i in blocks[updown]}
        extra = set(value) - {f"block_{i}" for i in blocks[updown]}
        if extra:
            raise InvalidAdapterError(f"block-wise scales: {updown} has {sorted(extra)}, but the {updown} blocks with "
                                      f"attentions are {[f'block_{i}' for i in blocks[updown]]}.")
        for i in blocks[updown]:
            v = value.get(f"block_{i}", default)
            n = per_block[updown]
            if not isinstance(v, (list, tuple)):
                v = [v] * n
            elif len(v) == 1:
                v = list(v) * n
            elif len(v) != n:
                raise InvalidAdapterError(f"block-wise scales: expected {n} scales for {updown}.block_{i}, got {len(v)}.")
            for j, w in enumerate(v):
                out[f"{updown}_blocks.{i}.attentions.{j}"] = w
    if not any(m.startswith("mid_block.attentions.0") for m in modules):
        if "mid" in scales:
            raise InvalidAdapterError("block-wise scales: 'mid' given, but this UNet has no mid-block attention.")
        del out["mid_block.attentions.0"]
    return out


def _module_weight(weight, module: str):
    """PEFT's `get_module_weight`: the first layer name inside the module name, else the attention of the
    module's block and index, else 1.0."""
    if not isinstance(weight, Mapping):
        return weight
    for layer, w in weight.items():
        if layer in module:
            return w
    parts = module.split(".")
    if len(parts) < 4:
        return 1.0
    return weight.get(f"{parts[0]}.{parts[1]}.attentions.{parts[3]}", 1.0)


def _number(value, where: str) -> jax.Array:
    if value is None:
        return jnp.float32(1.0)
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise InvalidAdapterError(f"{where}: a weight must be a number, got {value!r}.")
    try:
        v = jnp.asarray(value, jnp.float32)
    except (TypeError, ValueError):
        raise InvalidAdapterError(f"{where}: a weight must be a number, got {value!r}.") from None
    if v.ndim != 0:
        raise InvalidAdapterError(f"{where}: a weight must be a scalar, got shape {tuple(v.shape)}.")
    if not _traced(v) and not bool(jnp.isfinite(v)):
        raise InvalidAdapterError(f"{where}: a weight must be finite, got {float(v)}.")
    return v


def _module_names(adapter: PyTree) -> dict[tuple[str, ...], str]:
    """Leaf path -> torch module name (diffusers-Flax / torch-mirror trees); paths as text otherwise."""
    index = shape_index(jax.tree.map(lambda leaf: None if leaf is None else jnp.zeros(()), adapter, is_leaf=is_adapter_leaf))
    paths = [p for p in index]
    scheme = detect_scheme(paths)
    out = {}
    for p in paths:
        try:
            out[p] = scheme.to_module(p[:-1])
        except Exception:  # stacked/fused schemes name no single module
            out[p] = ".".join(p[:-1])
    return out


def component_weights(adapter: PyTree, weight, component: str, *, name: str = "") -> PyTree:
    """The tree of per-weight scalars that `weight` (number, None, or UNet block-wise dict) gives `adapter`."""
    where = f"set_adapters: adapter {name!r}, {component}"
    names = _module_names(adapter)
    if isinstance(weight, Mapping):
        if component != "unet":
            raise InvalidAdapterError(f"{where}: block-wise scales are for UNets; give {component} a number.")
        blocks, per_block = _unet_layout(names)
        weight = expand_block_scales(weight, blocks, per_block, list(names.values()))
        for layer in weight:
            if not any(layer in m for m in names.values()):
                raise InvalidAdapterError(f"{where}: can't set a scale for {layer}: the adapter has no weight there.")
        weight = {k: _number(v, f"{where} {k}") for k, v in weight.items()}
    else:
        weight = _number(weight, where)
    flat, treedef = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_adapter_leaf)
    leaves = [None if leaf is None else _number(_module_weight(weight, names[path_of(kp)]), where) for kp, leaf in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------------------------
# the verbs
# --------------------------------------------------------------------------------------------


def set_adapters(adapters: Adapters, names: str | Sequence[str], weights=None) -> Adapters:
    """Activate `names` with `weights` (diffusers' `set_adapters`): one entry per name (or one for all),
    each a number, None (1.0), or `{component: number or UNet block-wise dict}` (absent components 1.0)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    _known(names, adapters.trees, "set_adapters")
    if not isinstance(weights, (list, tuple)):
        weights = [weights] * len(names)
    if len(weights) != len(names):
        raise InvalidAdapterError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights.")
    new = {n: dict(c) for n, c in adapters.weights.items()}
    for name, w in zip(names, weights):
        comps = adapters.trees[name]
        if isinstance(w, Mapping) and (set(w) & set(comps) or not set(w) <= {"down", "mid", "up"}):
            unknown = set(w) - set(comps)
            if unknown:
                raise InvalidAdapterError(f"set_adapters: adapter {name!r} has no components {sorted(unknown)}; it has "
                                          f"{sorted(comps)}.")
            per = {c: w.get(c) for c in comps}
        else:
            per = {c: w for c in comps}
        new[name] = {c: component_weights(comps[c], per[c], c, name=name) for c in comps}
    return dataclasses.replace(adapters, weights=new, active=names)


def enable_lora(adapters: Adapters) -> Adapters:
    """The active adapters back on (`resolve` applies them)."""
    return dataclasses.replace(adapters, enabled=jnp.float32(1.0))


def disable_lora(adapters: Adapters) -> Adapters:
    """Every adapter off: `resolve` gives a zero delta (same structure, so the step does not recompile)."""
    return dataclasses.replace(adapters, enabled=jnp.float32(0.0))


def delete_adapters(adapters: Adapters, names: str | Sequence[str]) -> Adapters:
    """Drop adapters by name (from the active set too)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    _known(names, adapters.trees, "delete_adapters")
    keep = lambda d: {n: v for n, v in d.items() if n not in names}  # noqa: E731
    return dataclasses.replace(adapters, trees=keep(adapters.trees), weights=keep(adapters.weights),
                               active=tuple(n for n in adapters.active if n not in names))


def get_active_adapters(adapters: Adapters) -> list[str]:
    """The active adapter names, in order."""
    return list(adapters.active)


def get_list_adapters(adapters: Adapters) -> dict[str, list[str]]:
    """`{component: [adapter names]}`, as diffusers' `get_list_adapters`."""
    out: dict[str, list[str]] = {}
    for name, comps in adapters.trees.items():
        for c in comps:
            out.setdefault(c, []).append(name)
    return out


def set_lora_device(adapters: Adapters, names: str | Sequence[str], device) -> Adapters:
    """Place adapters `names` on `device`: a `jax.Device`, a `Sharding` (e.g. with `memory_kind="pinned_host"`
    to park them in host memory) or a pytree of shardings per component (`{component: sharding}`)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    _known(names, adapters.trees, "set_lora_device")
    trees = {n: dict(c) for n, c in adapters.trees.items()}
    for n in names:
        for c, tree in trees[n].items():
            target = device.get(c, None) if isinstance(device, Mapping) else device
            if target is not None:
                trees[n][c] = jax.device_put(tree, target)
    return dataclasses.replace(adapters, trees=trees)


def _weighted(leaf, w):
    if isinstance(leaf, LoraLeaf):
        return dataclasses.replace(leaf, alpha=jnp.asarray(leaf.alpha, jnp.float32) * w)
    return SumLeaf(parts=(leaf,), weights=jnp.reshape(w, (1,)))


def resolve(adapters: Adapters, component: str) -> PyTree | None:
    """The one adapter of `component` to merge: the active adapters with their weights combined
    (exact: LoRA factors stacked on the rank axis), times the enabled switch; None when no active
    adapter has this component. Jittable; weights and the switch may be traced."""
    parts = []
    for name in adapters.active:
        tree = adapters.trees[name].get(component)
        if tree is None:
            continue
        weights = adapters.weights[name][component]
        parts.append(jax.tree.map(lambda leaf, w: None if leaf is None else _weighted(leaf, w * adapters.enabled),
                                  tree, weights, is_leaf=is_adapter_leaf))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return combine(parts)
