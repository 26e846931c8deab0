"""Base weights from diffusers/transformers safetensors checkpoints, straight onto devices or a mesh.

`load_component(path, component)` reads a component folder of a diffusers pipeline (`unet/`,
`vae/`, `text_encoder/`, `text_encoder_2/`, `transformer/`; one `*.safetensors` file or an
`*.safetensors.index.json` with shards) into the Flax model that runs it:

  =============================  ===============================================  ===============
  config `_class_name`           Flax model                                       naming scheme
  =============================  ===============================================  ===============
  UNet2DConditionModel           diffusers `FlaxUNet2DConditionModel`             diffusers_flax
  AutoencoderKL                  diffusers `FlaxAutoencoderKL`                    diffusers_flax
  CLIPTextModel                  transformers `FlaxCLIPTextModel`                 torch_mirror
  CLIPTextModelWithProjection    transformers `FlaxCLIPTextModelWithProjection`   torch_mirror
  T5EncoderModel                 `jlora.models.t5.T5Encoder`                      torch_mirror
  FluxTransformer2DModel         `jlora.models.flux.FluxTransformer`              jlora_flux
  =============================  ===============================================  ===============

Weights take the road LoRAs take (`converters.checkpoints`: naming scheme, then layout), and
each array is built with `jax.make_array_from_callback` on its sharding: the callback reads only
the slices of the torch tensors that the device's shard holds, casting on the host, so a process
reads just its own shards and host memory stays near one tensor. The diffusers and transformers
Flax models come with the `jlora[pipelines]` extra; torch is never needed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from converters import checkpoints as ckpts
from converters.errors import ModelFileNotFoundError, UnsupportedModelError
from jlora.loading import path_of

PyTree = Any

# torch-only config entries that the Flax models do not take: the value each must have (the
# torch default), or None when any value is fine because it only changes precision or the pipeline.
_UNET_FIXED = dict(
    center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    dual_cross_attention=False, class_embed_type=None, num_class_embeds=None, resnet_time_scale_shift="default",
    resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type="positional",
    time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None,
    conv_in_kernel=3, conv_out_kernel=3, attention_type="default", class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None, upcast_attention=None, addition_embed_type_num_heads=None,
)
_VAE_FIXED = dict(shift_factor=None, latents_mean=None, latents_std=None, force_upcast=None, use_quant_conv=None,
                  use_post_quant_conv=None, mid_block_add_attention=True)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a checkpoint folder holds: the Flax model, its params' shapes, and how to name them."""

    class_name: str
    config: Mapping[str, Any]
    model: Any
    shapes: PyTree
    scheme: str
    synthesized: Mapping[tuple[str, ...], Callable[[tuple[int, ...]], np.ndarray]] = dataclasses.field(default_factory=dict)


def _check_fixed(class_name: str, config: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    for key, want in fixed.items():
        if want is not None and key in config and config[key] != want and not (key == "norm_eps" and np.isclose(config[key], want)):
            raise UnsupportedModelError(
                f"{class_name} config has {key}={config[key]!r}; the Flax model supports only {key}={want!r}."
            )


def _kwargs(config: Mapping[str, Any], fields) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields}


def _unet(config, dtype) -> Spec:
    from diffusers import FlaxUNet2DConditionModel

    _check_fixed("UNet2DConditionModel", config, _UNET_FIXED)
    fields = {f.name for f in dataclasses.fields(FlaxUNet2DConditionModel)} - {"dtype", "parent", "name"}
    model = FlaxUNet2DConditionModel(**_kwargs(config, fields), dtype=dtype)
    return Spec("UNet2DConditionModel", config, model, jax.eval_shape(model.init_weights, jax.random.PRNGKey(0)),
                "diffusers_flax")


def _identity_conv(shape):
    kernel = np.zeros(shape, np.float32)
    kernel[0, 0] = np.eye(shape[-1], dtype=np.float32)
    return kernel


def _vae(config, dtype) -> Spec:
    from diffusers import FlaxAutoencoderKL

    _check_fixed("AutoencoderKL", config, _VAE_FIXED)
    fields = {f.name for f in dataclasses.fields(FlaxAutoencoderKL)} - {"dtype", "parent", "name"}
    model = FlaxAutoencoderKL(**_kwargs(config, fields), dtype=dtype)
    shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
    synthesized = {}
    # Flux-style VAEs have no quant convs; an identity 1x1 conv with zero bias is the same map.
    for name, flag in (("quant_conv", "use_quant_conv"), ("post_quant_conv", "use_post_quant_conv")):
        if config.get(flag, True) is False:
            synthesized[(name, "kernel")] = _identity_conv
            synthesized[(name, "bias")] = lambda shape: np.zeros(shape, np.float32)
    return Spec("AutoencoderKL", config, model, shapes, "diffusers_flax", synthesized)


def _transformers(flax_class: str, config_class: str, input_shape: Callable[[Any], tuple[int, int]]):
    def build(config, dtype) -> Spec:
        import transformers

        cfg = getattr(transformers, config_class).from_dict({k: v for k, v in config.items() if not k.startswith("_")})
        model = getattr(transformers, flax_class)(cfg, _do_init=False, dtype=dtype)
        shapes = jax.eval_shape(lambda key: model.init_weights(key, input_shape(cfg)), jax.random.PRNGKey(0))
        return Spec(config.get("architectures", [flax_class[4:]])[0], config, model, shapes, "torch_mirror")

    return build


def _t5(config, dtype) -> Spec:
    from jlora.models import t5

    cfg = t5.T5Config.of(config)
    return Spec("T5EncoderModel", config, t5.T5Encoder(cfg, dtype or jnp.float32),
                t5.param_shapes(cfg, dtype or jnp.float32), "torch_mirror")


def _flux(config, dtype) -> Spec:
    from jlora.models import flux

    cfg = flux.FluxConfig.of(config)
    return Spec("FluxTransformer2DModel", config, flux.FluxTransformer(cfg, dtype),
                flux.param_shapes(cfg, dtype or jnp.float32), "jlora_flux")


_BUILDERS: dict[str, Callable[[Mapping[str, Any], Any], Spec]] = {
    "UNet2DConditionModel": _unet,
    "AutoencoderKL": _vae,
    "CLIPTextModel": _transformers("FlaxCLIPTextModel", "CLIPTextConfig", lambda c: (1, c.max_position_embeddings)),
    "CLIPTextModelWithProjection": _transformers("FlaxCLIPTextModelWithProjection", "CLIPTextConfig",
                                                 lambda c: (1, c.max_position_embeddings)),
    "T5EncoderModel": _t5,
    "FluxTransformer2DModel": _flux,
}


def component_dir(path: str | os.PathLike, component: str | None = None) -> str:
    """The folder of `component` inside a pipeline folder `path` (or `path` itself when it is one)."""
    path = os.fspath(path)
    if component is not None and os.path.isdir(os.path.join(path, component)):
        return os.path.join(path, component)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if not os.path.exists(path):
        raise ModelFileNotFoundError(f"{path}: no such model folder.")
    where = f"{path}/{component}" if component else path
    raise ModelFileNotFoundError(f"{where}: no config.json; pass a diffusers component folder (unet/, vae/, "
                                 "text_encoder/, transformer/ ...) or a pipeline folder and component=.")


def read_config(directory: str) -> dict:
    """The `config.json` of a component folder."""
    return ckpts.read_json_object(os.path.join(directory, "config.json"))


def _class_name(config: Mapping[str, Any], directory: str) -> str:
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if name not in _BUILDERS:
        raise UnsupportedModelError(
            f"{directory}: model class {name!r} has no JAX model in jlora; supported: {sorted(_BUILDERS)}."
        )
    return name


def component_spec(path: str | os.PathLike, component: str | None = None, *, dtype=None) -> Spec:
    """The Flax model and the abstract params (`jax.ShapeDtypeStruct`s) of a component folder, nothing read.

    Use it to compute shardings before loading:

    >>> spec = component_spec("sdxl", "unet", dtype=jnp.bfloat16)
    >>> shardings = fsdp_shardings(spec.shapes, mesh)
    """
    directory = component_dir(path, component)
    config = read_config(directory)
    spec = _BUILDERS[_class_name(config, directory)](config, dtype)
    if dtype is not None:
        spec = dataclasses.replace(spec, shapes=jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), spec.shapes))
    return spec


def fsdp_spec(shape: tuple[int, ...], n: int, axis: str = "model", *, min_size: int = 2**14) -> PartitionSpec:
    """The FSDP partition of one weight: its largest dimension that `n` divides goes on `axis`."""
    spec = [None] * len(shape)
    if n > 1 and int(np.prod(shape)) >= min_size:
        for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[d] % n == 0:
                spec[d] = axis
                break
    return PartitionSpec(*spec)


def fsdp_shardings(shapes: PyTree, mesh: jax.sharding.Mesh, axis: str = "model", *, min_size: int = 2**14) -> PyTree:
    """NamedShardings that split each weight over mesh axis `axis` (FSDP-style), the rest replicated.

    A leaf is split along its largest dimension that the axis size divides; leaves with fewer
    than `min_size` elements, or no such dimension, are replicated.
    """
    n = mesh.shape[axis]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, axis, min_size=min_size)), shapes)


def fsdp(mesh: jax.sharding.Mesh, axis: str = "model", *, min_size: int = 2**14) -> Callable:
    """`shardings=` for `load_component`: `f(path, shape_dtype) -> NamedSharding`, as `fsdp_shardings`."""
    n = mesh.shape[axis]
    return lambda path, x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, axis, min_size=min_size))


def bytes_per_device(tree: PyTree) -> dict:
    """`{device: bytes}` of the array shards of `tree` that each addressable device holds."""
    out: dict = {}
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", []):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def _sharding_for(shardings, path, x) -> Sharding:
    if shardings is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, Sharding):
        return shardings
    if callable(shardings):
        return shardings(path, x)
    node = shardings
    for key in path:
        node = node[key]
    return node


def load_component(
    path: str | os.PathLike,
    component: str | None = None,
    *,
    dtype=None,
    shardings=None,
    variant: str | None = None,
    stats: dict | None = None,
) -> tuple[Any, PyTree]:
    """`(model, params)` of one component of a diffusers checkpoint folder, read onto devices.

    Args:
      path: a component folder (with `config.json`) or a pipeline folder with `component`.
      component: `"unet"`, `"vae"`, `"text_encoder"`, `"text_encoder_2"`, `"transformer"`, ...
      dtype: dtype of the params and the model's computation (e.g. `jnp.bfloat16`); None keeps each
        tensor's stored dtype and computes in float32.
      shardings: None (first local device), one `Sharding` for every leaf, a pytree of shardings shaped
        like the params, or `f(path, shape_dtype_struct) -> Sharding` (see `fsdp_shardings`).
      variant: weight file variant, e.g. `"fp16"` for `diffusion_pytorch_model.fp16.safetensors`.
      stats: if given, filled with `bytes_read` (tensor bytes this process read) and `unused` keys.

    Returns:
      The Flax model (diffusers/transformers Flax model or jlora's Flux module) and its params.

    Raises:
      ModelFileNotFoundError, UnsupportedModelError, KeyMismatchError, ShapeMismatchError, CorruptFileError.

    >>> unet, params = load_component("stable-diffusion-v1-5", "unet", dtype=jnp.bfloat16)
    """
    spec = component_spec(path, component, dtype=dtype)
    directory = component_dir(path, component)
    with ckpts.open_checkpoint(ckpts.weight_files(directory, variant)) as ckpt:
        params = load_params(spec, ckpt, dtype=dtype, shardings=shardings, stats=stats)
    return spec.model, params


def load_params(spec: Spec, ckpt, *, dtype=None, shardings=None, stats: dict | None = None) -> PyTree:
    """The params of `spec` read from an open checkpoint, as `load_component` does.

    `ckpt` is a `converters.checkpoints.Checkpoint` or any object with its `where` (key -> an object
    with `dtype(key)`), `shape`, `read` and `bytes_read` in torch names, such as
    `converters.single_file.RenamedCheckpoint`.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(spec.shapes)
    index = {path_of(kp): (tuple(x.shape), x.dtype) for kp, x in flat}
    keys = {k: ckpt.shape(k) for k in ckpt.where}
    plan, unused = ckpts.plan(index, keys, spec.scheme,
                              synthesize=lambda p: "synthesized" if p in spec.synthesized else None)
    leaves = []
    for kp, x in flat:
        p = path_of(kp)
        sharding = _sharding_for(shardings, p, x)
        leaves.append(_make_array(ckpt, plan.get(p), spec.synthesized.get(p), p, x, sharding, dtype))
    if stats is not None:
        stats.update(bytes_read=ckpt.bytes_read, unused=unused)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _make_array(ckpt, reads, synth, path, x, sharding, dtype) -> jax.Array:
    shape = tuple(x.shape)
    if reads:
        stored = np.result_type(*[ckpt.where[r.key].dtype(r.key) for r in reads])
        out_dtype = np.dtype(dtype) if dtype is not None else stored
    else:
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
    cache: dict = {}

    def block(index):
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:  # devices holding the same block read it once
            if reads:
                cache[key] = ckpts.read_block(ckpt, reads, shape, index, out_dtype)
            else:
                cache[key] = synth(shape).astype(out_dtype)[tuple(index)]
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, block)
