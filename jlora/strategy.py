"""Merge each LoRA into its weight, or run it unmerged beside its layer: chosen per module at trace time.

Merging costs about the weight's size (`fan_in * out * r` multiply-adds for `a @ b`, plus a pass over
the weight); running the LoRA beside the layer costs about the tokens the layer sees
(`tokens * (fan_in + out) * r`, plus the add to its output). The tokens are known only when the layer
is called, so the choice is made there, while jax traces: big weights that see few tokens (SD's low
resolution blocks, cross-attention keys and values over 77 text tokens) run unmerged, small weights
over many tokens merge.

>>> step = jax.jit(lambda p, a, s, x, t, c: jlora.apply(p, a, s, strategy="auto", apply_fn=fn)(x, t, c))
>>> jlora.strategy_plan(fn, params, adapter, x, t, c)["down_blocks_0/attentions_0/proj_in/kernel"].strategy
'merge'

The unmerged path intercepts linen `nn.Dense` / `nn.Conv` calls with the same mechanism as
`jlora.per_sample` (`per_sample.intercept_adapted`); leaves it cannot run that way (LoHa, LoKr, DoRA,
sums of several kinds, layer-stacked leaves, non-kernel weights) are merged before the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jlora.errors import InvalidAdapterError
from jlora.hotswap import _flat, _name
from jlora.leaf import LoraLeaf, is_adapter_leaf
from jlora.per_sample import _down, intercept_adapted

PyTree = Any

STRATEGIES = ("merge", "unmerged", "auto")


@dataclasses.dataclass(frozen=True)
class Decision:
    """How one adapted module ran: `strategy` ("merge" or "unmerged"), the `tokens` it saw (input rows
    times output positions for a conv) and both estimated costs in multiply-adds."""

    strategy: str
    tokens: int
    merge_cost: int
    unmerged_cost: int
    reason: str = ""


def merge_cost(kernel_shape: tuple, rank: int) -> int:
    """Multiply-adds to merge: `a @ b` over the kernel, plus scaling, adding and casting it."""
    return math.prod(kernel_shape) * (rank + 3)


def unmerged_cost(kernel_shape: tuple, rank: int, tokens: int) -> int:
    """Multiply-adds to run the LoRA beside the layer: down and up projections of every token, and the add."""
    fan_in, out = math.prod(kernel_shape[:-1]), kernel_shape[-1]
    return tokens * ((fan_in + out) * rank + out)


def tokens_of(module, x) -> int:
    """The output rows a Dense / Conv call produces from input `x` (strides divide a conv's positions)."""
    rows = math.prod(x.shape[:-1])
    if isinstance(module, nn.Conv):
        strides = module.strides if module.strides is not None else 1
        n = len(module.kernel_size)
        strides = (strides,) * n if isinstance(strides, int) else tuple(strides)
        rows = math.prod(x.shape[:-1 - n]) * math.prod(-(-x.shape[-n - 1 + i] // strides[i]) for i in range(n))
    return int(rows)


def _runnable(module, leaf: LoraLeaf) -> str:
    """Why `module` cannot run `leaf` unmerged ("" when it can)."""
    if not isinstance(module, (nn.Dense, nn.Conv)):
        return f"{type(module).__name__} is not nn.Dense / nn.Conv"
    if isinstance(module, nn.Conv) and (module.feature_group_count != 1 or module.mask is not None):
        return "grouped or masked conv"
    spatial = len(module.kernel_size) if isinstance(module, nn.Conv) else 0
    if leaf.a.ndim != spatial + 2:
        return "factor layout does not fit the module"
    return ""


def decide(module, leaf: LoraLeaf, x, strategy: str) -> Decision:
    """The `Decision` for one call of `module` on input `x` under `strategy` ("merge", "unmerged", "auto")."""
    shape, rank = leaf.shape, leaf.rank
    tokens = tokens_of(module, x)
    m, u = merge_cost(shape, rank), unmerged_cost(shape, rank, tokens)
    why = _runnable(module, leaf)
    if why:
        return Decision("merge", tokens, m, u, why)
    if strategy == "auto":
        return Decision("unmerged" if u < m else "merge", tokens, m, u, "cost")
    return Decision(strategy, tokens, m, u, "asked")


def _merged_call(module, leaf: LoraLeaf, s, args, kwargs):
    """The module's call with its kernel replaced by the merged one."""
    params = dict(module.variables["params"])
    w = params["kernel"]
    params["kernel"] = leaf.merge(w, s).astype(w.dtype)
    return module.clone(parent=None).apply({"params": params}, *args, **kwargs)


def _unmerged(module, leaf: LoraLeaf, s, x, y):
    """`y + s * alpha / r * (x @ a) @ b` (a conv's `a` runs with the module's strides and padding)."""
    dtype = jnp.promote_types(x.dtype, leaf.a.dtype)
    h = _down(module, x.astype(dtype), leaf.a.astype(dtype))
    coef = (s * jnp.asarray(leaf.alpha, jnp.float32) / leaf.rank).astype(h.dtype)
    d = jnp.tensordot(h * coef, leaf.b.astype(dtype), axes=1, precision=module.precision)
    return y + d.astype(y.dtype)


def split(adapter: PyTree) -> tuple[PyTree, dict]:
    """`(rest, table)`: `table` maps module paths to the LoRA leaves that may run beside their layer
    (plain `LoraLeaf` on a kernel, not layer-stacked); `rest` is the adapter with those set to None."""
    flat, treedef = _flat(adapter)
    table, rest = {}, []
    for path, leaf in flat:
        if isinstance(leaf, LoraLeaf) and path and path[-1] == "kernel" and jnp.ndim(leaf.b) == 2 and jnp.ndim(leaf.alpha) == 0:
            table[path[:-1]] = leaf
            rest.append(None)
        else:
            rest.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, rest), table


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise InvalidAdapterError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")


@contextlib.contextmanager
def lora_layers(table: dict, scale, *, strategy: str = "auto", strict: bool = True):
    """Inside the block, each linen call of a module in `table` (module path -> `LoraLeaf`) runs with its
    LoRA, merged into the kernel or beside the layer as `strategy` says. Run the model on base params.

    Yields:
      `{kernel path: Decision}`, filled while the model is traced (the latest call of each module).
    """
    _check_strategy(strategy)
    s = jnp.asarray(scale, jnp.float32)
    decisions: dict = {}

    def run(module, leaf, x, call, args, kwargs):
        d = decide(module, leaf, x, strategy)
        decisions[_name(tuple(module.path) + ("kernel",))] = d
        if d.strategy == "merge":
            return _merged_call(module, leaf, s, args, kwargs)
        return _unmerged(module, leaf, s, x, call())

    with intercept_adapted(table, run, "apply(strategy=...)", strict=strict):
        yield decisions


def with_lora(apply_fn: Callable, *, strategy: str = "auto", strict: bool = True) -> Callable:
    """`apply_fn(params, *args, **kwargs)` with a LoRA: `fn(params, adapter, scale, *args, **kwargs)`.

    Leaves that can run beside their layer go by `strategy` (see `lora_layers`); the others are merged
    into `params` first. `apply_fn` takes the params tree first (e.g. `lambda p, *a: unet.apply({"params": p}, *a)`).
    Jit the result; the choice is made per module while jax traces.
    """
    from jlora.core import apply

    _check_strategy(strategy)

    @functools.wraps(apply_fn)
    def fn(params, adapter, scale, *args, **kwargs):
        if strategy == "merge":
            return apply_fn(apply(params, adapter, scale), *args, **kwargs)
        rest, table = split(adapter)
        merged = apply(params, rest, scale)
        if not table:
            return apply_fn(merged, *args, **kwargs)
        with lora_layers(table, scale, strategy=strategy, strict=strict):
            return apply_fn(merged, *args, **kwargs)

    return fn


def strategy_plan(apply_fn: Callable, params: PyTree, adapter: PyTree, *args, strategy: str = "auto", **kwargs) -> dict:
    """`{kernel path: Decision}` for `with_lora(apply_fn, strategy=strategy)` on these inputs (shapes only:
    the call is traced with `jax.eval_shape`, nothing is computed). Leaves merged before the call
    (not plain kernel LoRAs) are listed with reason "merged before the call"."""
    _check_strategy(strategy)
    table = split(adapter)[1] if strategy != "merge" else {}
    out: dict = {}
    if table:

        def traced(p, *xs, **kw):  # the base params: shapes are all the decisions need
            with lora_layers(table, 1.0, strategy=strategy) as decisions:
                result = apply_fn(p, *xs, **kw)
            out.update(decisions)
            return result

        jax.eval_shape(traced, params, *args, **kwargs)
    for path, leaf in _flat(adapter)[0]:
        name = _name(path)
        if leaf is not None and name not in out:
            out[name] = Decision("merge", 0, 0, 0, "merged before the call")
    return out
