"""diffusers `FluxTransformer2DModel` weights <-> the params of `jlora.models.flux` (BFL layout).

One table (`_rules`) says which diffusers modules make each param: q|k|v (and the single
blocks' mlp input) concatenated along the output axis, blocks stacked on a leading layer
axis, RMSNorm weights as `scale`, and the final modulation's halves swapped.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from jlora.errors import KeyMismatchError, ShapeMismatchError
from jlora.models.flux import FluxConfig, PyTree, make_apply, param_shapes

class _Rule(NamedTuple):
    path: tuple[str, ...]
    sources: tuple[tuple[str, int], ...]  # (diffusers module, its output size), concatenated along outputs
    stack: str = ""  # "", or the diffusers block list the leading layer axis runs over
    norm: bool = False  # RMSNorm weight -> scale, instead of a linear
    swap: bool = False  # output halves swapped (diffusers scale|shift -> BFL shift|scale)


def _rules(cfg: FluxConfig) -> list[_Rule]:
    d, m, hd = cfg.dim, cfg.mlp_dim, cfg.attention_head_dim
    tte = "time_text_embed"
    rules = [
        _Rule(("img_in",), (("x_embedder", d),)),
        _Rule(("txt_in",), (("context_embedder", d),)),
        _Rule(("time_in", "in_layer"), ((f"{tte}.timestep_embedder.linear_1", d),)),
        _Rule(("time_in", "out_layer"), ((f"{tte}.timestep_embedder.linear_2", d),)),
        _Rule(("vector_in", "in_layer"), ((f"{tte}.text_embedder.linear_1", d),)),
        _Rule(("vector_in", "out_layer"), ((f"{tte}.text_embedder.linear_2", d),)),
        _Rule(("final_layer", "adaLN_modulation_1"), (("norm_out.linear", 2 * d),), swap=True),
        _Rule(("final_layer", "linear"), (("proj_out", cfg.out_dim),)),
    ]
    if cfg.guidance_embeds:
        rules += [
            _Rule(("guidance_in", "in_layer"), ((f"{tte}.guidance_embedder.linear_1", d),)),
            _Rule(("guidance_in", "out_layer"), ((f"{tte}.guidance_embedder.linear_2", d),)),
        ]
    double = "transformer_blocks"
    streams = (
        ("img", "norm1", ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.norm_q", "attn.norm_k"), "attn.to_out.0",
         "ff"),
        ("txt", "norm1_context", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         ("attn.norm_added_q", "attn.norm_added_k"), "attn.to_add_out", "ff_context"),
    )
    for stream, mod, qkv, (q_norm, k_norm), proj, ff in streams:
        rules += [
            _Rule(("double_blocks", f"{stream}_mod", "lin"), ((f"{mod}.linear", 6 * d),), double),
            _Rule(("double_blocks", f"{stream}_attn", "qkv"), tuple((src, d) for src in qkv), double),
            _Rule(("double_blocks", f"{stream}_attn", "norm", "query_norm"), ((q_norm, hd),), double, norm=True),
            _Rule(("double_blocks", f"{stream}_attn", "norm", "key_norm"), ((k_norm, hd),), double, norm=True),
            _Rule(("double_blocks", f"{stream}_attn", "proj"), ((proj, d),), double),
            _Rule(("double_blocks", f"{stream}_mlp_0"), ((f"{ff}.net.0.proj", m),), double),
            _Rule(("double_blocks", f"{stream}_mlp_2"), ((f"{ff}.net.2", d),), double),
        ]
    single = "single_transformer_blocks"
    rules += [
        _Rule(("single_blocks", "modulation", "lin"), (("norm.linear", 3 * d),), single),
        _Rule(("single_blocks", "linear1"), (("attn.to_q", d), ("attn.to_k", d), ("attn.to_v", d), ("proj_mlp", m)),
              single),
        _Rule(("single_blocks", "linear2"), (("proj_out", d),), single),
        _Rule(("single_blocks", "norm", "query_norm"), (("attn.norm_q", hd),), single, norm=True),
        _Rule(("single_blocks", "norm", "key_norm"), (("attn.norm_k", hd),), single, norm=True),
    ]
    return rules


def _layers(cfg: FluxConfig, rule: _Rule) -> list[str]:
    """Key prefixes of the diffusers modules a rule reads, one per stacked layer ([""] if unstacked)."""
    if not rule.stack:
        return [""]
    n = cfg.num_layers if rule.stack == "transformer_blocks" else cfg.num_single_layers
    return [f"{rule.stack}.{i}." for i in range(n)]


def _leaves(rule: _Rule) -> tuple[str, ...]:
    return ("scale",) if rule.norm else ("kernel", "bias")


def _torch_name(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


def _swap(x):
    half = x.shape[-1] // 2
    return np.concatenate([x[..., half:], x[..., :half]], axis=-1)


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().float()
    return np.asarray(t)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def from_diffusers(state_dict: Mapping[str, Any], config: FluxConfig | Mapping[str, Any], *, dtype=jnp.float32,
                   strict: bool = True) -> tuple[Callable, dict]:
    """`(apply_fn, params)` from a diffusers `FluxTransformer2DModel.state_dict()` and its config.

    Tensors may be torch tensors or numpy arrays; the caller's dict is not modified.
    Every expected key must be present with its torch shape (`KeyMismatchError`,
    `ShapeMismatchError` name the key); with `strict`, unused keys are an error too.

    >>> apply_fn, params = flux.from_diffusers(model.state_dict(), model.config)
    """
    cfg = FluxConfig.of(config)
    shapes, rules = param_shapes(cfg, dtype), _rules(cfg)
    expected = {f"{pre}{src}.{_torch_name(leaf)}" for r in rules for leaf in _leaves(r)
                for pre in _layers(cfg, r) for src, _ in r.sources}
    missing = sorted(expected - set(state_dict))
    if missing:
        raise KeyMismatchError(f"the Flux state dict lacks {len(missing)} keys, e.g. {missing[:5]}; "
                               "are config's num_layers, num_single_layers and guidance_embeds the checkpoint's?")
    unused = sorted(set(state_dict) - expected)
    if strict and unused:
        raise KeyMismatchError(f"{len(unused)} state-dict keys are not FluxTransformer2DModel weights, e.g. "
                               f"{unused[:5]}; pass strict=False to ignore them.")
    params: dict = {}
    for rule in rules:
        target = _get(shapes, rule.path)
        for leaf in _leaves(rule):
            layers = []
            for pre in _layers(cfg, rule):
                parts = []
                for src, size in rule.sources:
                    key = f"{pre}{src}.{_torch_name(leaf)}"
                    want = (size, target["kernel"].shape[-2]) if leaf == "kernel" else (size,)
                    a = _to_numpy(state_dict[key])
                    if a.shape != want:
                        raise ShapeMismatchError(f"{key} has shape {a.shape}, expected {want} for "
                                                 f"{'/'.join(rule.path + (leaf,))} under {cfg}.")
                    parts.append(a.T if leaf == "kernel" else a)
                x = np.concatenate(parts, axis=-1)
                layers.append(_swap(x) if rule.swap else x)
            node = params
            for p in rule.path:
                node = node.setdefault(p, {})
            node[leaf] = jnp.asarray(np.stack(layers) if rule.stack else layers[0], dtype)
    return make_apply(cfg), params


def to_diffusers_state_dict(params: PyTree, config: FluxConfig | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of `from_diffusers`: diffusers `FluxTransformer2DModel` keys, torch layout, numpy arrays.

    >>> sd = flux.to_diffusers_state_dict(params, config)
    >>> torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    """
    cfg = FluxConfig.of(config)
    out: dict[str, np.ndarray] = {}
    for rule in _rules(cfg):
        bounds = np.cumsum([size for _, size in rule.sources])[:-1]
        for leaf in _leaves(rule):
            value = np.asarray(_get(params, rule.path + (leaf,)))
            for i, pre in enumerate(_layers(cfg, rule)):
                x = value[i] if rule.stack else value
                x = _swap(x) if rule.swap else x
                for (src, _), part in zip(rule.sources, np.split(x, bounds, axis=-1)):
                    out[f"{pre}{src}.{_torch_name(leaf)}"] = np.ascontiguousarray(part.T if leaf == "kernel" else part)
    return out
