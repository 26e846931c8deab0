"""Saving adapter pytrees back to diffusers/PEFT LoRA files."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Mapping

import jax
import numpy as np

from converters import layout
from converters.formats.peft import METADATA_KEY
from converters.naming import NamingScheme, detect_scheme, get_scheme
from converters.safetensors_io import save_file
from converters.sources import WEIGHT_NAME
from jlora.errors import JloraError
from jlora.leaf import LohaLeaf, LokrLeaf, LoraLeaf, is_adapter_leaf
from jlora.loading import path_of
from jlora.sharding import to_host

PyTree = Any


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _component_state(component: str, adapter: PyTree, scheme, dtype):
    flat = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_adapter_leaf)[0]
    paths = [path_of(kp) for kp, _ in flat]
    scheme = get_scheme(scheme) if scheme is not None else detect_scheme(paths)
    tensors, ranks, alphas = {}, {}, {}
    for path, leaf in zip(paths, (l for _, l in flat)):
        if leaf is None:
            continue
        if not isinstance(leaf, (LoraLeaf, LokrLeaf)):
            raise JloraError(
                f"{component}:{'/'.join(path)}: a {type(leaf).__name__} cannot be written as a diffusers/PEFT LoRA; "
                "only LoRA and LoKr leaves can (fuse other adapter kinds into the weights instead)."
            )
        if path[-1] != scheme.weight:
            raise JloraError(f"{component}:{'/'.join(path)}: adapter leaf is not on a {scheme.weight!r} weight.")
        if isinstance(leaf, LokrLeaf):
            tensors.update(_lokr_state(component, path, leaf, scheme, dtype))
            continue
        for module, a, b, alpha in _module_factors(leaf, scheme.sources(path[:-1], leaf.shape)):
            if dtype is not None:
                a, b = a.astype(dtype), b.astype(dtype)
            down, up = layout.factors_to_torch(a, b, conv=a.ndim == 4)
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up
            ranks[module] = int(a.shape[-1])
            alphas[module] = alpha
    if ranks and any(".lokr_" in k for k in tensors):
        raise JloraError(f"{component}: LoRA and LoKr leaves cannot share one diffusers file (diffusers reads a file "
                         "with any LoKr key as LoKr only); save them as two adapters.")
    return tensors, ranks, alphas


def _lokr_state(component: str, path, leaf: LokrLeaf, scheme, dtype) -> dict:
    """`{component}.{module}.lokr_w1` / `.lokr_w2` in torch layout, the factor folded into `lokr_w1`.

    diffusers reads such a file as PEFT LoKr with full factors (no alpha: runtime scaling 1)."""
    sources = scheme.sources(path[:-1], leaf.shape)
    if len(sources) != 1 or sources[0][1] is not None or sources[0][2]:
        raise JloraError(f"{component}:{'/'.join(path)}: a LoKr leaf on a stacked or fused weight cannot be written "
                         "per module; only LoKr leaves on one module's weight can.")
    module = sources[0][0]
    w1 = to_host(leaf.w1).astype(np.float64) * float(to_host(leaf.factor))
    w2 = to_host(leaf.w2)
    w2 = w2.T if w2.ndim == 2 else w2.transpose(3, 2, 0, 1)
    out = {f"{component}.{module}.lokr_w1": w1.T.astype(w2.dtype if dtype is None else dtype),
           f"{component}.{module}.lokr_w2": w2 if dtype is None else w2.astype(dtype)}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


KOHYA_PREFIXES = {"unet": "lora_unet_", "transformer": "lora_unet_", "text_encoder": "lora_te_",
                  "text_encoder_2": "lora_te2_"}


def _kohya_prefix(component: str, components) -> str:
    if component == "text_encoder" and "text_encoder_2" in components:
        return "lora_te1_"  # SDXL's two encoders
    if component not in KOHYA_PREFIXES:
        raise JloraError(f"save_lora_weights(format='kohya'): no kohya prefix for component {component!r}; "
                         f"kohya files name {sorted(KOHYA_PREFIXES)}.")
    return KOHYA_PREFIXES[component]


def _kohya_state(component: str, adapter: PyTree, scheme, dtype, components) -> dict:
    """kohya / A1111 keys `{prefix}{module with _}.lora_down.weight`, `.lora_up.weight`, `.alpha`.

    Flux transformers in jlora's BFL layout are written per layer with BFL module names
    (`lora_unet_double_blocks_3_img_attn_qkv`), as kohya's sd-scripts write Flux LoRAs; other
    trees with the diffusers module names (`lora_unet_down_blocks_0_attentions_0_..._to_q`)."""
    flat = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=is_adapter_leaf)[0]
    paths = [path_of(kp) for kp, _ in flat]
    scheme = get_scheme(scheme) if scheme is not None else detect_scheme(paths)
    prefix = _kohya_prefix(component, components)
    tensors = {}
    for path, leaf in zip(paths, (l for _, l in flat)):
        if leaf is None:
            continue
        if isinstance(leaf, (LohaLeaf, LokrLeaf)):
            tensors.update(_lycoris_state(prefix, component, path, leaf, scheme, dtype))
            continue
        if not isinstance(leaf, LoraLeaf):
            raise JloraError(f"{component}:{'/'.join(path)}: a {type(leaf).__name__} cannot be written as a kohya "
                             "LoRA; only LoRA, LoHa and LoKr leaves can.")
        if scheme.name == "jlora_flux":
            a_all, b_all, alpha_all = to_host(leaf.a), to_host(leaf.b), to_host(leaf.alpha).astype(np.float64)
            layers = range(a_all.shape[0]) if b_all.ndim == 3 else [None]
            for layer in layers:
                a, b = (a_all, b_all) if layer is None else (a_all[layer], b_all[layer])
                alpha = float(alpha_all if alpha_all.ndim == 0 else alpha_all[layer])
                parts = list(path[:-1]) if layer is None else [path[0], str(layer), *path[1:-1]]
                _put_kohya(tensors, prefix + "_".join(parts), a, b, alpha, dtype)
            continue
        for module, a, b, alpha in _module_factors(leaf, scheme.sources(path[:-1], leaf.shape)):
            _put_kohya(tensors, prefix + module.replace(".", "_"), a, b, alpha, dtype)
    return tensors


def _lycoris_state(prefix: str, component: str, path, leaf, scheme, dtype) -> dict:
    """LyCORIS keys of a LoHa (`hada_w1_a` ... `alpha`) or LoKr (`lokr_w1`, `lokr_w2`, `alpha`) leaf, and
    `dora_scale` when it has a magnitude, in torch layout.

    LoKr factors are written full with the leaf's factor folded into `lokr_w1`, so LyCORIS's scale is 1."""
    sources = scheme.sources(path[:-1], leaf.shape)
    if len(sources) != 1 or sources[0][1] is not None or sources[0][2]:
        raise JloraError(f"{component}:{'/'.join(path)}: a {type(leaf).__name__} on a stacked or fused weight cannot "
                         "be written per module.")
    name = prefix + sources[0][0].replace(".", "_")
    cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
    conv = len(leaf.shape) == 4
    out = {}
    if isinstance(leaf, LohaLeaf):
        for i in ("1", "2"):
            down, up = layout.factors_to_torch(to_host(getattr(leaf, f"a{i}")), to_host(getattr(leaf, f"b{i}")), conv=conv)
            out[f"{name}.hada_w{i}_a"] = cast(up.reshape(up.shape[:2]))
            out[f"{name}.hada_w{i}_b"] = cast(down.reshape(down.shape[0], -1))
        out[f"{name}.alpha"] = np.asarray(float(to_host(leaf.alpha)), np.float32)
    else:
        w1 = to_host(leaf.w1).astype(np.float64) * float(to_host(leaf.factor))
        w2 = to_host(leaf.w2)
        out[f"{name}.lokr_w1"] = cast(w1.T.astype(w2.dtype))
        out[f"{name}.lokr_w2"] = cast(w2.T if w2.ndim == 2 else w2.transpose(3, 2, 0, 1))
        out[f"{name}.alpha"] = np.asarray(1.0, np.float32)
    if leaf.magnitude is not None:
        m = to_host(leaf.magnitude)
        n = m.size
        shape = (n, 1) if m.shape[-1] == n else (1, n)  # per output channel, else per input channel
        out[f"{name}.dora_scale"] = cast(m.reshape(shape + ((1, 1) if conv else ())))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _put_kohya(tensors: dict, name: str, a, b, alpha: float, dtype) -> None:
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    down, up = layout.factors_to_torch(a, b, conv=a.ndim == 4)
    tensors[f"{name}.lora_down.weight"] = down
    tensors[f"{name}.lora_up.weight"] = up
    tensors[f"{name}.alpha"] = np.asarray(alpha, np.float32)


def _module_factors(leaf: LoraLeaf, sources):
    """`(module, a, b, alpha)` per torch module stored in a (stacked, fused) LoRA leaf.

    Each module gets its layer of `a`, its output columns of `b`, and only the rank
    columns that are non-zero for it (pieces merged on a fused kernel are zero elsewhere),
    with alpha rescaled so that alpha / rank is unchanged.
    """
    a_all, b_all, alpha_all = to_host(leaf.a), to_host(leaf.b), to_host(leaf.alpha).astype(np.float64)
    for module, layer, cols in sources:
        a, b = (a_all, b_all) if layer is None else (a_all[layer], b_all[layer])
        alpha = float(alpha_all if alpha_all.ndim == 0 else alpha_all[layer])
        if cols:
            b = np.concatenate([b[:, d0 : d0 + s1 - s0] for s0, s1, d0 in sorted(cols)], axis=1)
        if layer is not None or cols:
            used = (np.abs(a.reshape(-1, a.shape[-1])).sum(0) > 0) & (np.abs(b).sum(1) > 0)
            if not used.any():
                continue
            scale = alpha / a.shape[-1]
            a, b = a[..., used], b[used]
            alpha = scale * a.shape[-1]
        yield module, a, b, alpha


def _pattern_key(module: str, modules) -> str:
    """A PEFT pattern key for exactly this module.

    PEFT matches pattern keys as `(.*\.)?key$`, so `proj_out` would also match
    `single_transformer_blocks.0.proj_out`; such names are anchored with `^`.
    """
    return f"^{module}" if any(m != module and m.endswith("." + module) for m in modules) else module


def lora_config(ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict:
    """PEFT `LoraConfig` fields describing per-module ranks and alphas (for the file header)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": _number(alpha),
        "rank_pattern": {_pattern_key(m, ranks): v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {_pattern_key(m, ranks): _number(v) for m, v in sorted(alphas.items()) if v != alpha},
        "target_modules": sorted(ranks),
        "use_dora": False,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def save_lora_weights(
    save_directory: str | os.PathLike,
    adapters: Mapping[str, PyTree],
    *,
    weight_name: str = WEIGHT_NAME,
    schemes: Mapping[str, str | NamingScheme] | None = None,
    dtype=None,
    is_main_process: bool = True,
    format: str = "diffusers",
) -> str:
    """Write adapters as a LoRA file that diffusers' `load_lora_weights` (and ComfyUI / A1111) read.

    `format="diffusers"`: keys `{component}.{module}.lora_A.weight` / `lora_B.weight` in PyTorch
    layout; the header carries `lora_adapter_metadata` (per-component `r`, `lora_alpha`,
    `rank_pattern`, `alpha_pattern`, `target_modules`). `format="kohya"`: kohya / A1111 keys
    `lora_unet_...`, `lora_te_...` (SDXL: `lora_te1_`, `lora_te2_`) with `lora_down` / `lora_up`
    and an `.alpha` per module; Flux in BFL module names.

    Args:
      save_directory: created if missing.
      adapters: component name (`unet`, `text_encoder`, ...) -> adapter tree.
      weight_name: file name inside the directory.
      schemes: component -> naming scheme (default: detected from each adapter tree).
      dtype: cast factors (e.g. `np.float16`) before writing.
      is_main_process: only the main process writes (multi-host); others return the path. Every
        process must call it: factors sharded across hosts are gathered first (a collective).

    Returns:
      The path of the written file.

    >>> jlora.save_lora_weights("out/", {"unet": adapters["unet"]})
    """
    if (not isinstance(weight_name, str) or not weight_name or weight_name in (".", "..")
            or os.path.basename(weight_name) != weight_name or "/" in weight_name or "\\" in weight_name
            or "\x00" in weight_name):
        raise JloraError(f"save_lora_weights: weight_name must be a plain file name (no directories), got "
                         f"{weight_name!r}; put the directory in save_directory.")
    path = os.path.join(os.fspath(save_directory), weight_name)
    if not isinstance(adapters, Mapping):
        raise JloraError("save_lora_weights: adapters must be a dict {component: adapter}, e.g. {'unet': adapter}.")
    if format not in ("diffusers", "kohya"):
        raise JloraError(f"save_lora_weights: format must be 'diffusers' or 'kohya', got {format!r}.")
    tensors, metadata = {}, {}
    present = [c for c, a in adapters.items() if a is not None]
    for component, adapter in adapters.items():
        if adapter is None:
            continue
        if format == "kohya":
            tensors.update(_kohya_state(component, adapter, (schemes or {}).get(component), dtype, present))
            continue
        comp_tensors, ranks, alphas = _component_state(component, adapter, (schemes or {}).get(component), dtype)
        tensors.update(comp_tensors)
        if not ranks:
            continue
        metadata.update({f"{component}.{k}": v for k, v in lora_config(ranks, alphas).items()})
    if not tensors:
        raise JloraError("save_lora_weights: the adapters hold no LoRA or LoKr leaves; nothing to save.")
    if is_main_process:
        os.makedirs(os.fspath(save_directory), exist_ok=True)
        header = {"format": "pt"}
        if metadata:
            header[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
        save_file(tensors, path, header)
    return path
