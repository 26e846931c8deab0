"""Flux text-to-image in JAX, with diffusers' `FluxPipeline` math.

`Flux.load(path)` reads a diffusers Flux folder (`tokenizer/` + `text_encoder/` CLIP,
`tokenizer_2/` + `text_encoder_2/` T5, `transformer/`, `vae/`, `scheduler/`), then
`generate(requests)` runs one batch:

1. CLIP's pooled output (prompt padded to the CLIP tokenizer's length) and T5's last hidden state
   (padded to `max_sequence_length`, no attention mask), text position ids all zero;
2. latents packed 2x2 into tokens with (0, row, col) position ids;
3. flow-match Euler with sigmas `linspace(1, 1/n, n)` shifted by `mu` of the image token count
   (`use_dynamic_shifting`), the guidance embedding at each request's guidance (guidance-distilled
   models; no classifier-free guidance);
4. unpack, `latents / scaling_factor + shift_factor`, VAE decode, images in [0, 1].

LoRAs act on the transformer (layer-stacked, per sample) and the CLIP text encoder.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import flux as flux_model
from jlora.pipelines import common, schedulers

PyTree = Any


def pack(latents: jax.Array) -> jax.Array:
    """`(B, C, H, W)` -> `(B, H/2 * W/2, 4C)`: 2x2 patches as tokens, as `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: jax.Array, h: int, w: int) -> jax.Array:
    """The inverse of `pack` for a latent grid of `h x w`."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> np.ndarray:
    """`(h/2 * w/2, 3)` (frame 0, row, col) ids of the packed tokens of an `h x w` latent grid."""
    ids = np.zeros((h // 2, w // 2, 3), np.float32)
    ids[..., 1] = np.arange(h // 2)[:, None]
    ids[..., 2] = np.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


@dataclasses.dataclass
class Flux:
    """A loaded Flux pipeline: CLIP, T5, jlora's Flux transformer, the VAE, and their params."""

    path: str
    tokenizers: list  # CLIP, T5
    clip: Any
    t5: Any
    transformer: Any
    vae: Any
    params: dict  # text_encoder, text_encoder_2, transformer, vae
    scheduler_config: dict
    vae_config: dict
    guidance_embeds: bool
    max_sequence_length: int = 512
    dtype: Any = jnp.float32
    family: str = "flux"
    data_sharding: Any = None  # where a batch's latents go (e.g. NamedSharding(mesh, P("data")))

    @classmethod
    def load(cls, path: str, *, dtype=None, shardings=None, max_sequence_length: int | None = None,
             single_file: str | None = None) -> "Flux":
        """Load a diffusers Flux folder; arguments as `StableDiffusion.load` (a BFL `single_file` gives the
        transformer; the folder the rest)."""
        models, params = {}, {}
        for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
            models[name], params[name] = common.load_weights(path, name, single_file, dtype=dtype, shardings=shardings)
        toks = [common.load_tokenizer(os.path.join(path, t)) for t in ("tokenizer", "tokenizer_2")]
        sched = common.read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
        vae_cfg = common.read_json(os.path.join(path, "vae", "config.json"))
        seq = max_sequence_length or min(512, int(toks[1].model_max_length))
        return cls(path, toks, models["text_encoder"], models["text_encoder_2"], models["transformer"], models["vae"],
                   params, sched, vae_cfg, bool(models["transformer"].config.guidance_embeds), seq, dtype or jnp.float32)

    @property
    def lora_params(self) -> dict:
        return {"transformer": self.params["transformer"], "text_encoder": self.params["text_encoder"]}

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        return 1024

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return 2 * (height // (self.vae_scale * 2)), 2 * (width // (self.vae_scale * 2))

    @functools.cached_property
    def _encode_fn(self):
        clip, t5 = self.clip, self.t5

        def encode(params, clip_ids, t5_ids, loras):
            position = jnp.broadcast_to(jnp.arange(clip_ids.shape[-1]), clip_ids.shape)
            p, lora = common.resolve(params["text_encoder"], loras.get("text_encoder"))
            out = common.call(clip.module.apply, lora, {"params": p},
                              clip_ids, jnp.ones_like(clip_ids), position, deterministic=True)
            hidden = t5.apply({"params": params["text_encoder_2"]}, t5_ids)
            return hidden, out.pooler_output

        return jax.jit(encode)

    @functools.cached_property
    def _denoise_fn(self):
        apply_fn = flux_model.make_apply(self.transformer.config, self.dtype)

        def denoise(params, lora, sched, latents, txt, pooled, img_ids, txt_ids, guidance, progress: bool):
            params, lora = common.resolve(params, lora)

            def body(i, x):
                t = jnp.broadcast_to(schedulers.timestep(sched, i), (x.shape[0],)) / 1000
                v = common.call(apply_fn, lora, {"params": params}, x.astype(self.dtype), txt, pooled, t, img_ids,
                                txt_ids, guidance)
                if progress:
                    common.report_step(i)
                return schedulers.step(sched, v.astype(jnp.float32), i, x)

            return jax.lax.fori_loop(0, sched.num_steps, body, latents)

        return jax.jit(denoise, static_argnames="progress")

    @functools.cached_property
    def _decode_fn(self):
        vae = self.vae
        factor = float(self.vae_config.get("scaling_factor", 1.0))
        shift = float(self.vae_config.get("shift_factor") or 0.0)

        def decode(params, tokens, h, w):
            latents = unpack(tokens, h, w) / factor + shift
            image = vae.apply({"params": params}, common.nhwc(latents).astype(self.dtype), method=vae.decode).sample
            return jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

        return jax.jit(decode, static_argnums=(2, 3))

    def encode_prompts(self, prompts: Sequence[str], loras):
        clip_ids, t5_ids = self.token_ids(prompts)
        return self._encode_fn(self.params, jnp.asarray(clip_ids), jnp.asarray(t5_ids),
                               {k: v for k, v in loras.items() if v is not None})

    def token_ids(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """`[clip_ids, t5_ids]` `(B, L)` of `prompts` (padded, truncated with a warning)."""
        clip_tok, t5_tok = self.tokenizers
        return [common.tokenize(clip_tok, prompts, clip_tok.model_max_length),
                common.tokenize(t5_tok, prompts, self.max_sequence_length)]

    def encode_pooled(self, params: Mapping[str, Any], clip_ids):
        """CLIP's pooled output `(B, D)` of `clip_ids` with `params["text_encoder"]` (e.g. a LoRA merged
        in): a pure function, so training a CLIP LoRA puts it inside the loss (T5 stays frozen)."""
        clip = self.clip
        clip_ids = jnp.asarray(clip_ids)
        position = jnp.broadcast_to(jnp.arange(clip_ids.shape[-1]), clip_ids.shape)
        return clip.module.apply({"params": params["text_encoder"]}, clip_ids, jnp.ones_like(clip_ids), position,
                                 deterministic=True).pooler_output

    def generate(self, requests: Sequence[common.Request], lora_cache: common.LoraCache | None = None,
                 latents: np.ndarray | None = None, *, default_steps: int = 28,
                 default_guidance: float = 3.5, lora_mode: str = "auto") -> np.ndarray:
        """Images `(B, H, W, 3)` float32 in [0, 1] for requests sharing size and steps.

        `latents` (B, h/2 * w/2, 4C) packed overrides the seeded initial noise (diffusers' `latents=`).
        """
        requests = list(requests)
        height = common.uniform(requests, "height", self.default_size)
        width = common.uniform(requests, "width", self.default_size)
        steps = common.uniform(requests, "steps", default_steps)
        step = self.vae_scale * 2
        if height % step or width % step:
            raise common.RequestError(f"height and width must be multiples of {step}, got {height}x{width}.")
        h, w = self.latent_hw(height, width)
        cache = lora_cache or common.LoraCache(self.lora_params, self.family)
        loras = common.batch_loras(cache, requests, lora_mode)
        txt, pooled = self.encode_prompts([r.prompt for r in requests], {"text_encoder": loras["text_encoder"]})
        channels = int(self.transformer.config.in_channels) // 4
        if latents is None:
            latents = np.asarray(pack(jnp.asarray(common.seeded_normal([r.seed for r in requests], (channels, h, w)))))
        seq = latents.shape[1]
        sched = schedulers.flow_match_euler(self.scheduler_config, steps, image_seq_len=seq,
                                            sigmas=np.linspace(1.0, 1 / steps, steps))
        guidance = None
        if self.guidance_embeds:
            guidance = jnp.asarray([r.guidance if r.guidance is not None else default_guidance for r in requests],
                                   jnp.float32)
        txt_ids = jnp.zeros((txt.shape[1], 3), jnp.float32)
        out = self._denoise_fn(self.params["transformer"], loras["transformer"], sched,
                               common.batch_put(latents, self.data_sharding), txt.astype(self.dtype),
                               pooled.astype(self.dtype), jnp.asarray(image_ids(h, w)), txt_ids, guidance,
                               progress=common.progress_enabled())
        return np.asarray(self._decode_fn(self.params["vae"], out, h, w))
