"""PyTorch reference side of the jlora parity tests.

Everything here is built from configs (no downloads), tiny, fp32, on CPU and seeded.

* ``build_sd15_unet`` / ``build_sdxl_unet`` / ``build_clip_text`` / ``build_clip_text_proj`` return a
  :class:`Ref`: the base torch model, the matching Flax module (diffusers-Flax UNet or
  transformers-Flax CLIP), the base weights converted to the Flax layout by diffusers'/transformers'
  own converters, and seeded numpy inputs. Builders are cached, so treat a ``Ref`` as read-only.
* ``make_peft_lora_file`` writes a LoRA the way diffusers' training scripts do (PEFT ``add_adapter``
  + ``get_peft_model_state_dict`` + ``<Mixin>.save_lora_weights`` with ``*_lora_adapter_metadata``).
* ``torch_model_with_lora`` loads such a file with diffusers' own loaders (the independent reference)
  and ``torch_fused_flax_params`` fuses it with diffusers and converts the fused weights to Flax.

Forward outputs (what diffusers pipelines consume):

* UNets: ``sample`` (noise prediction, NCHW).
* ``CLIPTextModel`` (SD-1.5 ``text_encoder``): ``last_hidden_state`` (SD-1.5 ``prompt_embeds``).
* ``CLIPTextModelWithProjection`` (SDXL ``text_encoder_2``): ``text_embeds`` (SDXL
  ``pooled_prompt_embeds``). It depends on every layer, the final layer norm and ``text_projection``.

``output=`` on the forward helpers selects another output: ``"last_hidden_state"``,
``"penultimate"`` (``hidden_states[-2]``, what SDXL uses as ``prompt_embeds``) or ``"text_embeds"``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

UNET_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
)
ATTENTION_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

BATCH = 2
CLIP_SEQ_LEN = 8
CLIP_VOCAB = 99


# --------------------------------------------------------------------------------------------
# Ref
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Ref:
    """A tiny model in both frameworks. Shared by the builders' cache: never mutate it."""

    name: str
    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    torch_model: torch.nn.Module
    flax_module: Any
    flax_params: dict
    inputs: dict
    output: str = "sample"  # default output of the forward helpers
    flax_shapes: Optional[dict] = dataclasses.field(default=None, repr=False)

    @property
    def is_unet(self) -> bool:
        return self.component == UNET

    @property
    def target_modules(self) -> tuple:
        if self.is_unet:
            return UNET_TARGET_MODULES
        if self.component == TEXT_ENCODER_2:
            return CLIP_TARGET_MODULES + ("text_projection",)
        return CLIP_TARGET_MODULES


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------------------------
# torch -> flax conversion
# --------------------------------------------------------------------------------------------


class _ShapeOnlyUNet:
    """Stands in for a Flax UNet in diffusers' converter: it only reads shapes and key names."""

    def __init__(self, shapes):
        self._shapes = shapes

    def init_weights(self, rng):  # noqa: ARG002 - signature of the real method
        return self._shapes


class _ShapeOnlyTransformersModel:
    """Stands in for a transformers Flax model in transformers' converter."""

    def __init__(self, shapes, base_model_prefix):
        self.params = shapes
        self.base_model_prefix = base_model_prefix


def _strip_peft_names(state_dict: dict) -> dict:
    """A PEFT-injected (possibly fused) model's state dict, renamed like the plain model's."""
    out = {}
    for k, v in state_dict.items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out


def torch_state_dict_to_flax(ref: Ref, state_dict: dict) -> dict:
    """Convert a plain torch state dict of ``ref``'s architecture to the Flax params tree (jnp)."""
    sd = {k: v.detach().to(torch.float32).cpu().clone() for k, v in _strip_peft_names(state_dict).items()}
    if ref.is_unet:
        from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

        params = convert_pytorch_state_dict_to_flax(sd, _ShapeOnlyUNet(ref.flax_shapes))
    else:
        from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

        wrapper = _ShapeOnlyTransformersModel(ref.flax_shapes, ref.flax_module.base_model_prefix)
        params = convert_pytorch_state_dict_to_flax(sd, wrapper)
    params = _plain(params)
    _check_tree(params, ref.flax_shapes, ref.name)
    return params


def _plain(tree):
    """Nested plain dicts (no FrozenDict)."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _check_tree(params, shapes, name):
    got = {k: v.shape for k, v in flatten_dict(params).items()}
    want = {k: tuple(v.shape) for k, v in flatten_dict(_plain(shapes)).items()}
    if got.keys() != want.keys():
        missing = sorted(want.keys() - got.keys())[:5]
        extra = sorted(got.keys() - want.keys())[:5]
        raise AssertionError(f"{name}: flax params differ from the module's: missing {missing}, extra {extra}")
    bad = [k for k in got if tuple(got[k]) != want[k]]
    if bad:
        raise AssertionError(f"{name}: shape mismatch at {bad[:5]}")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

_UNET_COMMON = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    flip_sin_to_cos=True,
    freq_shift=0,
)


def _unet_ref(name: str, cfg: dict, seed: int, extra_inputs: Callable[[np.random.Generator], dict]) -> Ref:
    from diffusers import FlaxUNet2DConditionModel, UNet2DConditionModel

    _seed(seed)
    torch_model = UNet2DConditionModel(**cfg, norm_num_groups=32).eval()
    torch_model.requires_grad_(False)
    flax_module = FlaxUNet2DConditionModel(**cfg, dtype=jnp.float32)
    shapes = jax.eval_shape(flax_module.init_weights, jax.random.PRNGKey(0))

    rng = np.random.default_rng(seed)
    inputs = {
        "sample": rng.standard_normal((BATCH, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])).astype(
            np.float32
        ),
        "timesteps": np.array([10.0, 700.0], dtype=np.float32)[:BATCH],
        "encoder_hidden_states": rng.standard_normal((BATCH, 7, cfg["cross_attention_dim"])).astype(np.float32),
    }
    inputs.update(extra_inputs(rng))
    ref = Ref(name, UNET, torch_model, flax_module, {}, inputs, "sample", shapes)
    ref.flax_params = torch_state_dict_to_flax(ref, torch_model.state_dict())
    return ref


@functools.lru_cache(maxsize=None)
def build_sd15_unet() -> Ref:
    """SD-1.5 shaped UNet: conv proj_in/proj_out, cross-attn down/mid/up blocks, no added conditioning."""
    cfg = dict(
        _UNET_COMMON,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=False,
    )
    return _unet_ref("sd15_unet", cfg, 0, lambda rng: {})


@functools.lru_cache(maxsize=None)
def build_sdxl_unet() -> Ref:
    """SDXL shaped UNet: linear proj_in/proj_out, 2 transformer layers on the cross-attn block (and
    mid block), ``text_time`` added conditioning (text_embeds (B, 32) + time_ids (B, 6))."""
    text_embeds_dim, add_time_dim = 32, 8
    cfg = dict(
        _UNET_COMMON,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=add_time_dim,
        projection_class_embeddings_input_dim=text_embeds_dim + 6 * add_time_dim,
    )

    def extra(rng):
        return {
            "text_embeds": rng.standard_normal((BATCH, text_embeds_dim)).astype(np.float32),
            "time_ids": np.tile(np.array([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]], np.float32), (BATCH, 1)),
        }

    return _unet_ref("sdxl_unet", cfg, 1, extra)


def _clip_config(projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB + 1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_SEQ_LEN,
        hidden_act="quick_gelu",
        projection_dim=32 if projection else 512,
        bos_token_id=CLIP_VOCAB - 1,
        eos_token_id=CLIP_VOCAB,
        pad_token_id=CLIP_VOCAB,
        layer_norm_eps=1e-5,
        attn_implementation="eager",
    )


def _clip_input_ids(seed: int) -> np.ndarray:
    """[bos, tokens..., eos, eos(pad)...] like CLIPTokenizer with padding to max length (SD pads with eos)."""
    rng = np.random.default_rng(seed)
    ids = np.full((BATCH, CLIP_SEQ_LEN), CLIP_VOCAB, dtype=np.int32)
    for b, n in enumerate((5, CLIP_SEQ_LEN - 2)[:BATCH]):
        ids[b, 0] = CLIP_VOCAB - 1
        ids[b, 1 : 1 + n] = rng.integers(0, CLIP_VOCAB - 1, size=n)
    return ids


def _clip_ref(name: str, component: str, projection: bool, seed: int) -> Ref:
    import transformers

    cfg = _clip_config(projection)
    torch_cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    flax_cls = transformers.FlaxCLIPTextModelWithProjection if projection else transformers.FlaxCLIPTextModel
    _seed(seed)
    torch_model = torch_cls(cfg).eval()
    torch_model.requires_grad_(False)
    flax_model = flax_cls(cfg, _do_init=False, dtype=jnp.float32)
    shapes = jax.eval_shape(lambda key: flax_model.init_weights(key, (1, CLIP_SEQ_LEN)), jax.random.PRNGKey(0))
    inputs = {"input_ids": _clip_input_ids(seed)}
    output = "text_embeds" if projection else "last_hidden_state"
    ref = Ref(name, component, torch_model, flax_model, {}, inputs, output, shapes)
    ref.flax_params = torch_state_dict_to_flax(ref, torch_model.state_dict())
    return ref


@functools.lru_cache(maxsize=None)
def build_clip_text() -> Ref:
    """CLIPTextModel (SD-1.5 / SDXL ``text_encoder``): 2 layers, hidden 32, vocab 100."""
    return _clip_ref("clip_text", TEXT_ENCODER, False, 2)


@functools.lru_cache(maxsize=None)
def build_clip_text_proj() -> Ref:
    """CLIPTextModelWithProjection (SDXL ``text_encoder_2``): 2 layers, hidden 32, projection 32."""
    return _clip_ref("clip_text_proj", TEXT_ENCODER_2, True, 3)


# --------------------------------------------------------------------------------------------
# Forwards
# --------------------------------------------------------------------------------------------


def flax_apply_fn(ref: Ref, output: Optional[str] = None) -> Callable[..., jax.Array]:
    """A pure, jittable ``f(params, **ref.inputs) -> array`` running the Flax module."""
    output = output or ref.output
    module = ref.flax_module

    if ref.is_unet:

        def unet_fn(params, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = None
            if text_embeds is not None:
                added = {"text_embeds": text_embeds, "time_ids": time_ids}
            out = module.apply(
                {"params": params}, sample, timesteps, encoder_hidden_states, added, train=False
            )
            return out.sample

        return unet_fn

    inner = module.module  # the linen module of the transformers Flax model

    def clip_fn(params, input_ids):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        attention_mask = jnp.ones_like(input_ids)
        out = inner.apply(
            {"params": params},
            input_ids,
            attention_mask,
            position_ids,
            deterministic=True,
            output_hidden_states=output == "penultimate",
        )
        if output == "penultimate":
            return out.hidden_states[-2]
        return getattr(out, output)

    return clip_fn


@functools.lru_cache(maxsize=None)
def _jitted_apply(ref: Ref, output: Optional[str]):
    return jax.jit(flax_apply_fn(ref, output))


def flax_forward(ref: Ref, params, output: Optional[str] = None) -> np.ndarray:
    """Run the Flax model on ``ref.inputs`` and return the selected output as numpy. The jitted
    function is cached per (ref, output), so calls with same-structured params compile once."""
    fn = _jitted_apply(ref, output or ref.output)
    return np.asarray(fn(params, **{k: jnp.asarray(v) for k, v in ref.inputs.items()}))


def torch_forward(model: torch.nn.Module, ref: Ref, scale: float = 1.0, output: Optional[str] = None) -> np.ndarray:
    """Torch forward of ``model`` (``ref``'s architecture, with or without LoRA) on ``ref.inputs``.

    The LoRA call scale goes through ``cross_attention_kwargs={"scale": scale}`` for a UNet and through
    ``scale_lora_layers``/``unscale_lora_layers`` around the forward for text encoders, as diffusers
    pipelines do. ``scale`` has no effect on a model without LoRA layers.
    """
    output = output or ref.output
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in ref.inputs.items()}
    with torch.no_grad():
        if ref.is_unet:
            added = None
            if "text_embeds" in t:
                added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}
            out = model(
                t["sample"],
                t["timesteps"],
                t["encoder_hidden_states"],
                added_cond_kwargs=added,
                cross_attention_kwargs={"scale": scale},
            ).sample
        else:
            from diffusers.utils import scale_lora_layers, unscale_lora_layers

            scale_lora_layers(model, scale)
            try:
                res = model(t["input_ids"].long(), output_hidden_states=output == "penultimate")
            finally:
                unscale_lora_layers(model, scale)
            out = res.hidden_states[-2] if output == "penultimate" else getattr(res, output)
    return out.detach().cpu().numpy()


# --------------------------------------------------------------------------------------------
# LoRA files
# --------------------------------------------------------------------------------------------


def _mixin(pipeline: str):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if pipeline == "sd":
        return StableDiffusionLoraLoaderMixin
    if pipeline == "sdxl":
        return StableDiffusionXLLoraLoaderMixin
    raise ValueError(f"pipeline must be 'sd' or 'sdxl', got {pipeline!r}")


def peft_lora_model(
    ref: Ref,
    *,
    rank: int = 4,
    alpha: float = 8,
    rank_pattern: Optional[dict] = None,
    alpha_pattern: Optional[dict] = None,
    seed: int = 0,
    init_scale: float = 1.0,
    target_modules: Optional[tuple] = None,
):
    """A deep copy of ``ref.torch_model`` with a seeded random PEFT LoRA ("default") injected, and its
    ``LoraConfig``. ``lora_B`` is multiplied by ``init_scale`` after PEFT's ``init_lora_weights=False`` init."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules or ref.target_modules),
        init_lora_weights=False,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    model = copy.deepcopy(ref.torch_model)
    torch.manual_seed(seed)
    model.add_adapter(config)  # diffusers' PeftAdapterMixin / transformers' PeftAdapterMixin
    if init_scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.mul_(init_scale)
    model.eval()
    return model, config


def make_peft_lora_file(
    tmp_dir,
    refs,
    *,
    rank: int = 4,
    alpha: float = 8,
    rank_pattern: Optional[dict] = None,
    alpha_pattern: Optional[dict] = None,
    seed: int = 0,
    pipeline: str = "sd",
    init_scale: float = 1.0,
    key_style: str = "peft",
    with_metadata: bool = True,
    weight_name: str = LORA_WEIGHT_NAME,
    target_modules: Optional[dict] = None,
) -> str:
    """Write a diffusers/PEFT LoRA for ``refs`` (one per component) and return the file path.

    ``rank_pattern``/``alpha_pattern`` are PEFT patterns applied to every ref's ``LoraConfig``.
    ``key_style``: ``"peft"`` saves ``get_peft_model_state_dict`` as is (``...to_q.lora_A.weight``);
    ``"diffusers"`` first applies ``convert_state_dict_to_diffusers`` as diffusers' SD/SDXL dreambooth
    scripts do (``...to_q.lora.down.weight``, text encoder ``...q_proj.lora_linear_layer.down.weight``).
    diffusers 0.35.2 reads a UNet file only if all its keys use one style (``load_lora_adapter`` checks
    the first key), so ``"diffusers"`` requires attention-only UNet targets (the scripts' default).
    ``with_metadata=False`` omits the ``lora_adapter_metadata`` header (older files; diffusers then
    uses alpha = rank, i.e. scale 1).
    ``target_modules``: optional ``{component: tuple_of_targets}`` overriding ``Ref.target_modules``.
    LoRA factors: PEFT's ``init_lora_weights=False`` init seeded by ``seed`` (and the ref's position),
    ``lora_B`` times ``init_scale``.
    """
    from peft.utils import get_peft_model_state_dict

    mixin = _mixin(pipeline)
    kwargs = {}
    for i, ref in enumerate(refs):
        targets = (target_modules or {}).get(ref.component) or ref.target_modules
        if key_style == "diffusers" and ref.is_unet and not set(targets) <= set(ATTENTION_TARGET_MODULES):
            raise ValueError(
                "key_style='diffusers' with non-attention UNet targets gives mixed key styles that diffusers "
                f"0.35.2 cannot load; pass target_modules={{'unet': {ATTENTION_TARGET_MODULES}}}"
            )
        model, config = peft_lora_model(
            ref,
            rank=rank,
            alpha=alpha,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            seed=seed * 1000 + i,
            init_scale=init_scale,
            target_modules=targets,
        )
        sd = get_peft_model_state_dict(model)
        if key_style == "diffusers":
            from diffusers.utils import convert_state_dict_to_diffusers

            sd = convert_state_dict_to_diffusers(sd)
        elif key_style != "peft":
            raise ValueError(f"key_style must be 'peft' or 'diffusers', got {key_style!r}")
        sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
        if ref.component in kwargs or f"{ref.component}_lora_layers" in kwargs:
            raise ValueError(f"two refs for component {ref.component!r}")
        kwargs[f"{ref.component}_lora_layers"] = sd
        if with_metadata:
            kwargs[f"{ref.component}_lora_adapter_metadata"] = config.to_dict()
    if pipeline == "sd" and "text_encoder_2_lora_layers" in kwargs:
        raise ValueError("text_encoder_2 needs pipeline='sdxl'")
    os.makedirs(tmp_dir, exist_ok=True)
    mixin.save_lora_weights(str(tmp_dir), weight_name=weight_name, **kwargs)
    return os.path.join(str(tmp_dir), weight_name)


def read_lora_file(path):
    """(state dict of numpy arrays, header metadata dict) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _infer_pipeline(ref: Ref, path) -> str:
    if ref.component == TEXT_ENCODER_2 or ref.name.startswith("sdxl"):
        return "sdxl"
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        if any(k.startswith("text_encoder_2.") for k in f.keys()):
            return "sdxl"
    return "sd"


_DOWN_SUFFIXES = (".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight")
_UP_SUFFIXES = (".lora_B.weight", ".lora.up.weight", "_lora.up.weight", ".lora_linear_layer.up.weight")


def _file_ranks(state_dict: dict, component: str) -> dict:
    """{module: rank} of the ``component.``-prefixed LoRA modules of a PEFT/diffusers-style state dict."""
    ranks = {}
    for k, v in state_dict.items():
        if not k.startswith(component + "."):
            continue
        for suf in _UP_SUFFIXES:
            if k.endswith(suf):
                ranks[k[len(component) + 1 : -len(suf)]] = int(v.shape[1])
    return ranks


def torch_model_with_lora(
    ref: Ref,
    path,
    adapter_name: str = "default",
    pipeline: Optional[str] = None,
    fix_rank_alpha: bool = False,
):
    """A deep copy of ``ref.torch_model`` with the LoRA at ``path`` loaded by diffusers' own loaders
    (``<Mixin>.lora_state_dict(..., return_lora_metadata=True)`` + ``load_lora_into_unet`` /
    ``load_lora_into_text_encoder(prefix=ref.component)``). ``pipeline`` ("sd"/"sdxl") picks the
    mixin; by default SDXL for SDXL refs/``text_encoder_2`` or files with ``text_encoder_2.`` keys.

    Checks that diffusers injected every module of the file (it can silently drop some).
    A file with no metadata and no alphas whose modules have different ranks hits diffusers 0.35.2's
    known flaw (lora_alpha = first module's rank): this raises, unless ``fix_rank_alpha=True``, which
    resets every module to alpha = rank (scale 1, the format's meaning) after diffusers loads it.
    """
    path = str(path)
    mixin = _mixin(pipeline or _infer_pipeline(ref, path))
    state_dict, network_alphas, metadata = mixin.lora_state_dict(
        os.path.dirname(path) or ".", weight_name=os.path.basename(path), return_lora_metadata=True
    )
    ranks = _file_ranks(state_dict, ref.component)
    flawed = metadata is None and not network_alphas and len(set(ranks.values())) > 1
    if flawed and not fix_rank_alpha:
        raise ValueError(
            f"{path}: {ref.component} modules have ranks {sorted(set(ranks.values()))} and the file has no "
            "alphas/metadata; diffusers 0.35.2 mis-scales such files (pass fix_rank_alpha=True)"
        )
    model = copy.deepcopy(ref.torch_model)
    if ref.is_unet:
        mixin.load_lora_into_unet(state_dict, network_alphas, model, adapter_name=adapter_name, metadata=metadata)
    else:
        mixin.load_lora_into_text_encoder(
            state_dict, network_alphas, model, prefix=ref.component, adapter_name=adapter_name, metadata=metadata
        )
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if not layers or len(layers) != len(ranks):
        raise AssertionError(
            f"diffusers injected {len(layers)} LoRA modules into {ref.component} but {path} has {len(ranks)}"
        )
    if flawed:
        for m in layers.values():
            m.lora_alpha[adapter_name] = m.r[adapter_name]
            m.scaling[adapter_name] = 1.0
    model.eval()
    return model


def torch_fused_flax_params(
    ref: Ref,
    path,
    scale: float = 1.0,
    adapter_name: str = "default",
    pipeline: Optional[str] = None,
    fix_rank_alpha: bool = False,
) -> dict:
    """Load the LoRA at ``path`` as :func:`torch_model_with_lora` does, fuse it with diffusers at
    ``lora_scale=scale`` (``unet.fuse_lora`` / ``fuse_text_encoder_lora``, what ``pipe.fuse_lora`` runs)
    and return the fused weights in the Flax layout (nested dict of numpy arrays, same tree as
    ``ref.flax_params``)."""
    model = torch_model_with_lora(
        ref, path, adapter_name=adapter_name, pipeline=pipeline, fix_rank_alpha=fix_rank_alpha
    )
    if ref.is_unet:
        model.fuse_lora(lora_scale=scale)
    else:
        from diffusers.loaders.lora_base import fuse_text_encoder_lora

        fuse_text_encoder_lora(model, lora_scale=scale)
    params = torch_state_dict_to_flax(ref, model.state_dict())
    return jax.tree_util.tree_map(np.asarray, params)


def flax_params_numpy(ref: Ref) -> dict:
    """A fresh numpy copy of the base Flax params (safe to mutate)."""
    return jax.tree_util.tree_map(lambda x: np.array(x), ref.flax_params)


ALL_BUILDERS = {
    "sd15_unet": build_sd15_unet,
    "sdxl_unet": build_sdxl_unet,
    "clip_text": build_clip_text,
    "clip_text_proj": build_clip_text_proj,
}
