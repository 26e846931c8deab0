"""Stable Diffusion 1.x/2.x and SDXL text-to-image in JAX, with diffusers' math.

`StableDiffusion.load(path)` reads a diffusers pipeline folder (`model_index.json`, `tokenizer*/`,
`text_encoder*/`, `unet/`, `vae/`, `scheduler/`) with `jlora.models.load_component`, then
`generate(requests)` runs one batch:

1. prompts tokenized to the tokenizer's `model_max_length` (over-long ones truncated with a warning);
2. text encoding: SD takes CLIP's last hidden state; SDXL concatenates both encoders' penultimate
   hidden states and takes the second one's projected pooled output, plus the six size/crop ids
   `(height, width, 0, 0, height, width)`; an absent negative prompt is encoded as `""` (SD) or
   zeros (SDXL with `force_zeros_for_empty_prompt`);
3. classifier-free guidance on a `[uncond; cond]` batch when guidance > 1;
4. the scheduler loop (`jlora.pipelines.schedulers`) inside `jax.lax.fori_loop`;
5. VAE decode of `latents / scaling_factor`, images in [0, 1].

LoRAs act on the UNet and the text encoders, per sample (see `jlora.pipelines.common`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import UnsupportedModelError
from jlora.pipelines import common, schedulers

PyTree = Any

_SCHEDULERS = {
    "DDIMScheduler": schedulers.ddim,
    "EulerDiscreteScheduler": schedulers.euler_discrete,
}
# Schedulers whose betas a DDIM run can take (diffusers' `DDIMScheduler.from_config`).
_AS_DDIM = ("PNDMScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
            "UniPCMultistepScheduler", "DDPMScheduler", "HeunDiscreteScheduler")


def make_schedule(config: Mapping[str, Any], steps: int, name: str | None = None):
    """The schedule of `config` (a `scheduler_config.json` dict) for `steps`, or of scheduler `name`."""
    cls = name or config.get("_class_name")
    if cls in _AS_DDIM:
        common.logger.warning("%s is not implemented in JAX; sampling with DDIMScheduler on its betas.", cls)
        cls = "DDIMScheduler"
    if cls not in _SCHEDULERS:
        raise UnsupportedModelError(f"scheduler {cls!r} has no JAX version; supported: {sorted(_SCHEDULERS)}.")
    return _SCHEDULERS[cls](config, steps)


@dataclasses.dataclass
class StableDiffusion:
    """A loaded SD or SDXL pipeline: Flax models, their params, tokenizers and configs."""

    family: str  # "sd" or "sdxl"
    path: str
    tokenizers: list
    encoders: list  # Flax text models (transformers), one per tokenizer
    unet: Any
    vae: Any
    params: dict  # {"text_encoder", ["text_encoder_2"], "unet", "vae"} -> params
    scheduler_config: dict
    vae_scaling_factor: float
    vae_scale: int  # pixels per latent
    force_zeros_for_empty_prompt: bool = True
    scheduler: str | None = None  # override of the scheduler class
    dtype: Any = jnp.float32
    data_sharding: Any = None  # where a batch's latents go (e.g. NamedSharding(mesh, P("data")))

    @classmethod
    def load(cls, path: str, *, dtype=None, shardings=None, scheduler: str | None = None,
             single_file: str | None = None) -> "StableDiffusion":
        """Load a diffusers SD/SDXL folder. `dtype` (e.g. `jnp.bfloat16`) for params and compute;
        `shardings`: as `load_component`'s, or `f(component)` giving it per component; `single_file`: an
        original-layout checkpoint whose weights replace the folder's (the folder gives configs and tokenizers)."""
        index = common.read_json(os.path.join(path, "model_index.json"))
        family = "sdxl" if "text_encoder_2" in index else "sd"
        names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
        params, models = {}, {}
        for name in names + ["unet", "vae"]:
            models[name], params[name] = common.load_weights(path, name, single_file, dtype=dtype, shardings=shardings)
        toks = [common.load_tokenizer(os.path.join(path, t)) for t in (["tokenizer", "tokenizer_2"][: len(names)])]
        vae_cfg = common.read_json(os.path.join(path, "vae", "config.json"))
        sched = common.read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
        return cls(family, path, toks, [models[n] for n in names], models["unet"], models["vae"], params, sched,
                   float(vae_cfg.get("scaling_factor", 0.18215)), 2 ** (len(vae_cfg["block_out_channels"]) - 1),
                   bool(index.get("force_zeros_for_empty_prompt", True)), scheduler, dtype or jnp.float32)

    @property
    def encoder_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.encoders)]

    @property
    def lora_params(self) -> dict:
        """The params LoRAs attach to: UNet and text encoders."""
        return {n: self.params[n] for n in ["unet"] + self.encoder_names}

    @property
    def default_size(self) -> int:
        return int(self.unet.sample_size) * self.vae_scale

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (int(self.unet.in_channels), height // self.vae_scale, width // self.vae_scale)

    def check_size(self, height: int, width: int) -> None:
        step = self.vae_scale * 2 ** (len(self.unet.block_out_channels) - 1)
        if height % step or width % step:
            raise common.RequestError(f"height and width must be multiples of {step}, got {height}x{width}.")

    # ---- the jitted stages ----------------------------------------------------------------

    @functools.cached_property
    def _encode_fn(self):
        encoders, sdxl = self.encoders, self.family == "sdxl"

        def encode(params, ids, loras):
            hidden, pooled = [], None
            for i, (model, tokens) in enumerate(zip(encoders, ids)):
                name = ["text_encoder", "text_encoder_2"][i]
                position = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
                p, lora = common.resolve(params[name], loras.get(name))
                out = common.call(model.module.apply, lora, {"params": p}, tokens,
                                  jnp.ones_like(tokens), position, deterministic=True, output_hidden_states=sdxl)
                hidden.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)
                if sdxl and i == 1:
                    pooled = out.text_embeds
            return jnp.concatenate(hidden, axis=-1), pooled

        return jax.jit(encode)

    @functools.cached_property
    def _denoise_fn(self):
        unet = self.unet

        def denoise(params, lora, sched, latents, context, added, guidance, cfg: bool, progress: bool):
            params, lora = common.resolve(params, lora)

            def model(x, t):
                return common.call(unet.apply, lora, {"params": params}, x, t, context, added, train=False).sample

            def body(i, x):
                xin = schedulers.scale_model_input(sched, x, i)
                if cfg:
                    xin = jnp.concatenate([xin, xin])
                t = jnp.broadcast_to(schedulers.timestep(sched, i), (xin.shape[0],))
                eps = model(xin.astype(self.dtype), t).astype(jnp.float32)
                if cfg:
                    uncond, cond = jnp.split(eps, 2)
                    eps = uncond + guidance[:, None, None, None] * (cond - uncond)
                if progress:
                    common.report_step(i)
                return schedulers.step(sched, eps, i, x)

            return jax.lax.fori_loop(0, sched.num_steps, body, latents * sched.init_noise_sigma)

        return jax.jit(denoise, static_argnames=("cfg", "progress"))

    @functools.cached_property
    def _decode_fn(self):
        vae, factor = self.vae, self.vae_scaling_factor

        def decode(params, latents):
            image = vae.apply({"params": params}, common.nhwc(latents / factor).astype(self.dtype), method=vae.decode).sample
            return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

        return jax.jit(decode)

    # ---- one batch -----------------------------------------------------------------------

    def encode_prompts(self, prompts: Sequence[str], loras: Mapping[str, Any], what: str = "prompt"):
        ids = [jnp.asarray(i) for i in self.token_ids(prompts, what)]
        return self._encode_fn(self.params, ids, {k: v for k, v in loras.items() if v is not None})

    def token_ids(self, prompts: Sequence[str], what: str = "prompt") -> list[np.ndarray]:
        """Token ids `(B, L)` of `prompts`, one array per text encoder (padded, truncated with a warning)."""
        return [common.tokenize(t, prompts, t.model_max_length, what) for t in self.tokenizers]

    def encode_tokens(self, params: Mapping[str, Any], ids: Sequence[Any]):
        """`(context, pooled)` of token ids (from `token_ids`) through the text encoders in `params`.

        A pure function of `params` (`{"text_encoder": ..., ["text_encoder_2": ...]}`, e.g. with a LoRA
        merged by `jlora.apply`), so it can sit inside a loss: training text-encoder LoRAs goes through it.
        `pooled` is None for SD 1.x.
        """
        return self._encode_fn(params, [jnp.asarray(i) for i in ids], {})

    def generate(self, requests: Sequence[common.Request], lora_cache: common.LoraCache | None = None,
                 latents: np.ndarray | None = None, *, default_steps: int = 30,
                 default_guidance: float | None = None, lora_mode: str = "auto") -> np.ndarray:
        """Images `(B, H, W, 3)` float32 in [0, 1] for requests sharing size, steps and guidance mode.

        `latents` (B, C, H/8, W/8) overrides the seeded initial noise (diffusers' `latents=`).
        `lora_mode`: see `common.batch_loras`. Default guidance: 7.5 (SD), 5.0 (SDXL).
        """
        requests = list(requests)
        default_guidance = default_guidance if default_guidance is not None else (5.0 if self.family == "sdxl" else 7.5)
        height = common.uniform(requests, "height", self.default_size)
        width = common.uniform(requests, "width", self.default_size)
        steps = common.uniform(requests, "steps", default_steps)
        self.check_size(height, width)
        guidance = np.asarray([r.guidance if r.guidance is not None else default_guidance for r in requests], np.float32)
        cfg = bool(guidance[0] > 1)
        if any(bool(g > 1) != cfg for g in guidance):
            raise common.RequestError("one batch must be all with guidance > 1 or all without; group requests by it.")
        cache = lora_cache or common.LoraCache(self.lora_params, self.family)
        loras = common.batch_loras(cache, requests, lora_mode)
        text_loras = {n: loras[n] for n in self.encoder_names}
        context, pooled = self.encode_prompts([r.prompt for r in requests], text_loras)
        added = None
        time_ids = jnp.tile(jnp.asarray([[height, width, 0, 0, height, width]], jnp.float32), (len(requests), 1))
        if cfg:
            negatives = [r.negative_prompt for r in requests]
            if self.family == "sdxl" and self.force_zeros_for_empty_prompt and all(n is None for n in negatives):
                neg_context, neg_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
            else:
                neg_context, neg_pooled = self.encode_prompts([n or "" for n in negatives], text_loras, "negative prompt")
            context = jnp.concatenate([neg_context, context])
            if pooled is not None:
                pooled = jnp.concatenate([neg_pooled, pooled])
                time_ids = jnp.concatenate([time_ids, time_ids])
        if pooled is not None:
            added = {"text_embeds": pooled, "time_ids": time_ids}
        sched = make_schedule(self.scheduler_config, steps, self.scheduler)
        if latents is None:
            latents = common.seeded_normal([r.seed for r in requests], self.latent_shape(height, width))
        unet_lora = common.doubled(loras["unet"]) if cfg else loras["unet"]
        out = self._denoise_fn(self.params["unet"], unet_lora, sched, common.batch_put(latents, self.data_sharding),
                               context.astype(self.dtype), added, jnp.asarray(guidance), cfg=cfg,
                               progress=common.progress_enabled())
        return np.asarray(self._decode_fn(self.params["vae"], out))
