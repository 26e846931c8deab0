"""What the SD, SDXL and Flux pipelines share: requests, tokenizers, LoRA sets, latents, images.

A `Request` is one image to make (prompt, LoRAs with weights, seed, size, steps, guidance). A
batch of requests runs as one jitted call when they share size, step count and guidance mode;
their LoRA sets may differ. Each distinct LoRA set (files and weights) becomes one adapter per
component (`jlora.combine`); the sets of a batch are stacked (`jlora.stack_adapters`) and every
sample runs with its own through `jlora.per_sample`, at its own `lora_scale`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from converters.errors import ComponentNotInFileError, ModelFileNotFoundError, UnsupportedModelError
from jlora.errors import JloraError, KeyMismatchError

PyTree = Any
logger = logging.getLogger("jlora.pipelines")

_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "T5Tokenizer", "T5TokenizerFast")


class RequestError(JloraError, ValueError):
    """A generation request has a field of the wrong type or value."""


@dataclasses.dataclass(frozen=True)
class Lora:
    """One LoRA file of a request and its weight (diffusers' `set_adapters` weight)."""

    path: str
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Request:
    """One image: prompt, optional negative prompt, LoRAs, seed, size, steps and guidance.

    `lora_scale` is the call scale of all of the request's LoRAs (diffusers'
    `cross_attention_kwargs={"scale": s}` / `joint_attention_kwargs`), each file also has its weight.
    `None` for steps/guidance/size means the pipeline's default.
    """

    prompt: str
    negative_prompt: str | None = None
    loras: tuple[Lora, ...] = ()
    lora_scale: float = 1.0
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None

    @staticmethod
    def of(record: Mapping[str, Any]) -> "Request":
        """A request from a JSON object (a prompts-file line); unknown or mistyped fields raise `RequestError`."""
        if not isinstance(record, Mapping):
            raise RequestError(f"a request must be a JSON object, got {type(record).__name__}.")
        fields = {f.name for f in dataclasses.fields(Request)}
        unknown = sorted(set(record) - fields)
        if unknown:
            raise RequestError(f"unknown request fields {unknown}; known: {sorted(fields)}.")
        if not isinstance(record.get("prompt"), str):
            raise RequestError("a request needs 'prompt', a string.")
        out = dict(record)
        if out.get("negative_prompt") is not None and not isinstance(out["negative_prompt"], str):
            raise RequestError("'negative_prompt' must be a string or null.")
        out["loras"] = tuple(_lora_of(x) for x in _list(out.get("loras", []), "loras"))
        for key, kind in (("lora_scale", float), ("guidance", float), ("seed", int), ("steps", int), ("width", int),
                          ("height", int)):
            if out.get(key) is not None:
                out[key] = _number(out[key], key, kind)
        for key in ("steps", "width", "height"):
            if out.get(key) is not None and out[key] < 1:
                raise RequestError(f"'{key}' must be >= 1, got {out[key]}.")
        return Request(**out)

    def record(self) -> dict:
        """The request as a JSON-ready dict (the sidecar's fields)."""
        d = dataclasses.asdict(self)
        d["loras"] = [dataclasses.asdict(x) for x in self.loras]
        return d


def _list(value, key):
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"'{key}' must be a list, got {type(value).__name__}.")
    return value


def _number(value, key, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}.")
    if not np.isfinite(value):
        raise RequestError(f"'{key}' must be finite, got {value!r}.")
    return kind(value)


def _lora_of(x) -> Lora:
    if isinstance(x, str):
        return Lora(x)
    if isinstance(x, Mapping) and isinstance(x.get("path"), str) and set(x) <= {"path", "weight"}:
        return Lora(x["path"], _number(x.get("weight", 1.0), "weight", float))
    raise RequestError(f"each of 'loras' must be a path or {{'path': str, 'weight': number}}, got {x!r}.")


# --------------------------------------------------------------------------------------------
# Folders and tokenizers
# --------------------------------------------------------------------------------------------


def read_json(path: str) -> dict:
    """A JSON object from `path` (`model_index.json`, a scheduler or tokenizer config); typed errors."""
    from converters.checkpoints import read_json_object

    return read_json_object(path)


def load_weights(path: str, name: str, single_file: str | None, *, dtype=None, shardings=None):
    """`(model, params)` of component `name`: from `single_file` when given and it holds the component
    (configs from the folder `path`), else from the folder's own weights."""
    from jlora.models import load_component, load_single_file

    sharding = shardings(name) if callable(shardings) else shardings  # f(component), or one Sharding / None
    if single_file is not None:
        try:
            return load_single_file(single_file, name, config=path, dtype=dtype, shardings=sharding)
        except ComponentNotInFileError:
            logger.info("%s: %s comes from %s", single_file, name, path)
    return load_component(path, name, dtype=dtype, shardings=sharding)


def load_tokenizer(directory: str):
    """The transformers tokenizer saved in `directory`, of the class its `tokenizer_config.json` names."""
    import transformers

    config = read_json(os.path.join(directory, "tokenizer_config.json"))
    name = config.get("tokenizer_class")
    if name not in _TOKENIZERS:
        raise UnsupportedModelError(f"{directory}: tokenizer class {name!r} is not one of {list(_TOKENIZERS)}.")
    try:
        return getattr(transformers, name).from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        raise ModelFileNotFoundError(f"{directory}: cannot load the {name} ({type(e).__name__}: {e}).") from None


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, what: str = "prompt") -> np.ndarray:
    """`(B, max_length)` int32 ids padded to `max_length`; over-long prompts are truncated with a warning
    naming the dropped text, as diffusers does."""
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
    full = tokenizer(list(prompts), padding="longest")
    for i, (ids, whole) in enumerate(zip(out["input_ids"], full["input_ids"])):
        if len(whole) > max_length and whole[:max_length] != ids:
            dropped = tokenizer.batch_decode([whole[max_length - 1 : -1]])[0]
            logger.warning("%s %r is longer than %d tokens; truncated, dropping: %r", what, _short(prompts[i]),
                           max_length, dropped)
    return np.asarray(out["input_ids"], np.int32)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# LoRA sets
# --------------------------------------------------------------------------------------------


def lora_key(request: Request) -> tuple:
    """The LoRA set of a request: its files and weights (requests with equal keys share an adapter)."""
    return tuple((os.path.abspath(x.path), float(x.weight)) for x in request.loras)


class LoraCache:
    """Loads each LoRA file once per pipeline and combines the sets requests ask for.

    `files[path]` is `{component: adapter}`; `sets[key]` the combined adapters of one set.
    """

    def __init__(self, params: Mapping[str, PyTree], family: str):
        self.params, self.family = params, family
        self.files: dict[str, dict] = {}
        self.sets: dict[tuple, dict] = {}
        self.stacks: dict[tuple, PyTree] = {}

    def file(self, path: str) -> dict:
        if path not in self.files:
            adapters, report = jlora.load_lora_weights(path, dict(self.params), family=self.family, return_report=True)
            check_family(report, self.family, path)
            ignored = sorted(set(report.skipped.values()))
            if ignored:
                logger.warning("%s: its %s LoRA keys are not used (this pipeline applies LoRAs to %s).", path,
                               "/".join(ignored), ", ".join(self.params))
            self.files[path] = adapters
        return self.files[path]

    def stacked(self, component: str, keys: tuple) -> PyTree:
        """The adapters of LoRA sets `keys` on `component`, stacked for `jlora.per_sample` (cached)."""
        if (component, keys) not in self.stacks:
            per_set = [self.adapters(k)[component] for k in keys]
            used = [a for a in per_set if a is not None]
            template = jlora.hotswap_template(self.params[component], max(_max_rank(a) for a in used), used,
                                              dtype=jnp.float32)
            self.stacks[(component, keys)] = jlora.stack_adapters(
                [a if a is not None else _empty_like(template) for a in per_set], template)
        return self.stacks[(component, keys)]

    def adapters(self, key: tuple) -> dict:
        """`{component: combined adapter or None}` of a LoRA set."""
        if key not in self.sets:
            files = [self.file(p) for p, _ in key]
            weights = [w for _, w in key]
            self.sets[key] = {c: _combine([f[c] for f in files], weights) for c in self.params}
        return self.sets[key]


def check_family(report, family: str, path: str) -> None:
    """Raise `KeyMismatchError` when a LoRA file has keys for components `family`'s pipelines do not have
    (a Flux LoRA given to SDXL, say), or places nothing at all."""
    from converters import get_family

    components = set(get_family(family).components)
    foreign = sorted({c for c in report.skipped.values()} - components)
    if foreign:
        n = sum(1 for c in report.skipped.values() if c in foreign)
        raise KeyMismatchError(f"{path}: {n} keys are for {'/'.join(foreign)}, which {family} pipelines do not "
                               f"have (components: {sorted(components)}); the LoRA is for another model family.")
    if not report.placed:
        raise KeyMismatchError(f"{path}: no key of this {report.format} file targets this {family} model.")


def _combine(adapters: list, weights: list):
    present = [(a, w) for a, w in zip(adapters, weights) if a is not None and jlora.count(a)]
    if not present:
        return None
    return jlora.combine([a for a, _ in present], [w for _, w in present])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Merged:
    """One LoRA set for a whole batch, merged into the weights (`jlora.apply`) once per call.

    Any adapter leaf works (LoHa, LoKr, DoRA...), unlike per-sample LoRAs, which need plain LoRA leaves.
    """

    adapter: PyTree
    scale: jax.Array


def lora_only(adapters: Mapping[str, PyTree | None]) -> bool:
    """Whether every leaf of a set's adapters is a plain `LoraLeaf` (so it can run per sample)."""
    return all(isinstance(leaf, jlora.LoraLeaf) for a in adapters.values() if a is not None
               for leaf in jax.tree.leaves(a, is_leaf=jlora.is_adapter_leaf) if leaf is not None)


def batch_loras(cache: LoraCache, requests: Sequence[Request], mode: str = "auto") -> dict:
    """`{component: lora or None}` for one batch.

    `mode="per_sample"`: the batch's distinct LoRA sets stacked, `(stacked, ids, scales)`; sample i uses
    set `ids[i]` (`jlora.NO_LORA` without LoRA) at `scales[i]`. `mode="merged"`: all requests share
    one set and scale, given as `Merged`. `"auto"` merges when the batch has a single set and scale,
    else runs per sample.
    """
    keys = [lora_key(r) for r in requests]
    distinct = list(dict.fromkeys(k for k in keys if k))
    single = len(set(keys)) == 1 and len({r.lora_scale for r in requests}) == 1
    if mode == "auto":
        mode = "merged" if single else "per_sample"
    if mode == "merged":
        if not single:
            raise RequestError("merged LoRAs need one LoRA set and lora_scale per batch; group requests by them.")
        if not distinct:
            return {c: None for c in cache.params}
        sets = cache.adapters(distinct[0])
        scale = jnp.float32(requests[0].lora_scale)
        return {c: (Merged(a, scale) if a is not None else None) for c, a in sets.items()}
    if mode != "per_sample":
        raise ValueError(f"mode must be 'auto', 'per_sample' or 'merged', got {mode!r}.")
    for k in distinct:
        if not lora_only(cache.adapters(k)):
            raise RequestError("a LoRA set with LoHa/LoKr/DoRA/full-weight leaves cannot run per sample; give it "
                               "its own batch (one LoRA set per batch merges it into the weights).")
    out = {}
    for component in cache.params:
        per_set = [cache.adapters(k)[component] for k in distinct]
        if not any(a is not None for a in per_set):
            out[component] = None
            continue
        stacked = cache.stacked(component, tuple(distinct))
        ids, scales = [], []
        for k, r in zip(keys, requests):
            has = bool(k) and per_set[distinct.index(k)] is not None
            ids.append(distinct.index(k) if has else jlora.NO_LORA)
            scales.append(float(r.lora_scale) if has else 0.0)
        out[component] = (stacked, np.asarray(ids, np.int32), np.asarray(scales, np.float32))
    return out


def _max_rank(adapter) -> int:
    leaves = jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf)
    return max(int(leaf.rank) for leaf in leaves if leaf is not None)


def _empty_like(template):
    """An adapter of `template`'s targets whose every leaf is absent (a set without this component)."""
    return jax.tree.map(lambda leaf: None, template, is_leaf=jlora.is_adapter_leaf)


def doubled(lora):
    """The LoRA of a `[uncond; cond]` batch: per-sample ids and scales twice (merged ones as they are)."""
    if lora is None or isinstance(lora, Merged):
        return lora
    stacked, ids, scales = lora
    return stacked, jnp.concatenate([ids, ids]), jnp.concatenate([scales, scales])


def resolve(params: PyTree, lora):
    """`(params, per-sample lora or None)`: a `Merged` LoRA is folded into the params (inside `jit`)."""
    if isinstance(lora, Merged):
        return jlora.apply(params, lora.adapter, lora.scale), None
    return params, lora


def call(apply_fn, lora, variables, *args, **kwargs):
    """`apply_fn(variables, *args, **kwargs)`, with per-sample LoRAs when `lora` is `(stacked, ids, scales)`."""
    if lora is None:
        return apply_fn(variables, *args, **kwargs)
    stacked, ids, scales = lora
    return jlora.per_sample_apply(apply_fn)(stacked, ids, scales, variables, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Latents and images
# --------------------------------------------------------------------------------------------


_STEP_HANDLERS: list = []


def report_step(i) -> None:
    """Inside a jitted sampling loop: tell the host that step `i` finished (for progress bars)."""
    jax.debug.callback(_on_step, i)


def _on_step(i) -> None:
    for handler in list(_STEP_HANDLERS):
        handler(int(i))


def progress_enabled() -> bool:
    return bool(_STEP_HANDLERS)


class on_step:
    """Context manager: call `handler(i)` after each denoising step of the pipelines' loops.

    >>> with on_step(lambda i: bar.update(1)):
    ...     images = pipe.generate(requests)
    """

    def __init__(self, handler):
        self.handler = handler

    def __enter__(self):
        _STEP_HANDLERS.append(self.handler)
        return self

    def __exit__(self, *exc):
        _STEP_HANDLERS.remove(self.handler)


def batch_put(latents, sharding) -> jax.Array:
    """float32 latents on `sharding` when the batch divides over it (else left for `jit` to place)."""
    x = jnp.asarray(latents, jnp.float32)
    if sharding is None:
        return x
    n = sharding.mesh.shape[sharding.spec[0]] if getattr(sharding, "spec", None) else 1
    return jax.device_put(x, sharding) if x.shape[0] % n == 0 else x


def seeded_normal(seeds: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """`(len(seeds), *shape)` float32 unit normals, sample i from `jax.random.key(seeds[i])` alone, so an
    image does not depend on the batch it ran in."""
    return np.stack([np.asarray(jax.random.normal(jax.random.key(int(s)), shape, jnp.float32)) for s in seeds])


def nhwc(latents: jax.Array) -> jax.Array:
    """`(B, C, H, W)` latents as `(B, H, W, C)`, the layout FlaxAutoencoderKL.decode takes without guessing
    (it transposes only when the last axis differs from its latent channels, so a grid as wide as the
    channel count would otherwise be misread)."""
    return latents.transpose(0, 2, 3, 1)


def to_uint8(images) -> np.ndarray:
    """`(B, H, W, 3)` floats in [0, 1] as uint8, rounded as diffusers' `numpy_to_pil`."""
    return np.asarray(np.round(np.asarray(images, np.float32) * 255), np.uint8)


def uniform(requests: Sequence[Request], field: str, default):
    """The one value of `field` in a batch (None means `default`); raises when requests disagree."""
    values = {getattr(r, field) if getattr(r, field) is not None else default for r in requests}
    if len(values) != 1:
        raise RequestError(f"one batch must share '{field}', got {sorted(values)}; group requests by it.")
    return values.pop()
