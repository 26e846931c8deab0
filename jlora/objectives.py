"""Training objectives of diffusers' LoRA scripts, as pure JAX functions.

* `diffusion_loss`: `train_text_to_image_lora.py` / `train_dreambooth_lora_sdxl.py` — noise added with
  the DDPM schedule (`add_noise`), an epsilon or v-prediction target (`get_velocity`), mean squared
  error, optionally weighted by min-SNR-gamma (`compute_snr`).
* `flow_matching_loss`: `train_dreambooth_lora_flux.py` — `x_t = (1 - sigma) x0 + sigma noise`, target
  `noise - x0`, the SD3 loss weightings (`compute_loss_weighting_for_sd3`).
* `sample_flow_timesteps`: the scripts' timestep sampling (`compute_density_for_timestep_sampling`:
  uniform, logit-normal, mode) mapped through the scheduler's training timesteps and sigmas.

The model is a function `model_fn(noisy, timesteps) -> prediction` closed over the conditioning,
so one objective serves SD, SDXL (pass `added_cond_kwargs` inside) and Flux (pack and unpack inside).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import JloraError

__all__ = ["alphas_cumprod", "diffusion_loss", "flow_matching_loss", "flow_training_tables", "loss_weighting",
           "sample_flow_timesteps", "snr"]

WEIGHTINGS = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


def alphas_cumprod(config: Mapping) -> np.ndarray:
    """float32 alpha-bar of a DDPM-family scheduler config over its training timesteps (as diffusers)."""
    from jlora.pipelines.schedulers import _BETA_DEFAULTS, _alphas_cumprod

    return _alphas_cumprod({k: config.get(k, d) for k, d in _BETA_DEFAULTS.items()})


def _per_sample(x: jax.Array, ndim: int) -> jax.Array:
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def snr(alphas_cumprod: jax.Array, timesteps: jax.Array) -> jax.Array:
    """diffusers' `compute_snr`: `(sqrt(ac) / sqrt(1 - ac))**2` at each timestep."""
    ac = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    return (jnp.sqrt(ac) / jnp.sqrt(1.0 - ac)) ** 2


def diffusion_loss(model_fn: Callable, latents: jax.Array, noise: jax.Array, timesteps: jax.Array,
                   alphas_cumprod: jax.Array, *, prediction_type: str = "epsilon",
                   snr_gamma: float | None = None) -> jax.Array:
    """The epsilon / v-prediction MSE of diffusers' SD and SDXL LoRA scripts for one batch.

    Args:
      model_fn: `model_fn(noisy_latents, timesteps) -> prediction` (the UNet with its conditioning).
      latents: `(B, C, H, W)` scaled VAE latents; noise: the same shape; timesteps: `(B,)` int.
      alphas_cumprod: the scheduler's `(T,)` alpha-bar (`alphas_cumprod(config)`).
      prediction_type: `"epsilon"` or `"v_prediction"`.
      snr_gamma: min-SNR-gamma weighting (None: plain mean).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise JloraError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    ac = jnp.asarray(alphas_cumprod, jnp.float32)[timesteps]
    a, s = _per_sample(jnp.sqrt(ac), latents.ndim), _per_sample(jnp.sqrt(1.0 - ac), latents.ndim)
    x0, eps = latents.astype(jnp.float32), noise.astype(jnp.float32)
    noisy = a * x0 + s * eps
    target = eps if prediction_type == "epsilon" else a * eps - s * x0
    pred = model_fn(noisy.astype(latents.dtype), timesteps).astype(jnp.float32)
    if snr_gamma is None:
        return jnp.mean((pred - target) ** 2)
    ratio = snr(alphas_cumprod, timesteps)
    weights = jnp.minimum(ratio, snr_gamma)
    weights = weights / ratio if prediction_type == "epsilon" else weights / (ratio + 1)
    per = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
    return jnp.mean(per * weights)


def flow_training_tables(config: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """`(timesteps, sigmas)` of a `FlowMatchEulerDiscreteScheduler` config as its `__init__` makes them
    (the tables the Flux script indexes): `linspace(1, T, T)` reversed, `/ T`, shifted unless dynamic."""
    n = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))
    t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    sigmas = t / n
    if not config.get("use_dynamic_shifting", False):
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * n).astype(np.float32), sigmas.astype(np.float32)


def sample_flow_timesteps(key, batch: int, config: Mapping, *, weighting_scheme: str = "none",
                          logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
    """`(timesteps, sigmas)` `(B,)` as the Flux script draws them: `u` from the weighting scheme's density,
    `indices = int(u * T)`, then the scheduler's training tables at those indices."""
    if weighting_scheme not in WEIGHTINGS:
        raise JloraError(f"weighting_scheme must be one of {WEIGHTINGS}, got {weighting_scheme!r}.")
    if weighting_scheme == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
    else:
        u = jax.random.uniform(key, (batch,))
        if weighting_scheme == "mode":
            u = 1 - u - mode_scale * (jnp.cos(math.pi * u / 2) ** 2 - 1 + u)
    timesteps, sigmas = flow_training_tables(config)
    indices = (u * len(timesteps)).astype(jnp.int32)
    return jnp.asarray(timesteps)[indices], jnp.asarray(sigmas)[indices]


def loss_weighting(weighting_scheme: str, sigmas: jax.Array) -> jax.Array:
    """diffusers' `compute_loss_weighting_for_sd3`."""
    if weighting_scheme == "sigma_sqrt":
        return sigmas.astype(jnp.float32) ** -2.0
    if weighting_scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bot)
    return jnp.ones_like(sigmas, jnp.float32)


def flow_matching_loss(model_fn: Callable, latents: jax.Array, noise: jax.Array, timesteps: jax.Array,
                       sigmas: jax.Array, *, weighting_scheme: str = "none") -> jax.Array:
    """The flow-matching loss of diffusers' Flux DreamBooth LoRA script for one batch.

    Args:
      model_fn: `model_fn(noisy_latents, timesteps) -> prediction` in the latents' layout (for Flux: pack,
        run the transformer at `timesteps / 1000` with its guidance, unpack).
      latents: `(B, C, H, W)` VAE latents after `(x - shift_factor) * scaling_factor`; noise likewise.
      timesteps, sigmas: `(B,)` from `sample_flow_timesteps`.
    """
    s = _per_sample(jnp.asarray(sigmas, jnp.float32), latents.ndim)
    x0, eps = latents.astype(jnp.float32), noise.astype(jnp.float32)
    noisy = (1.0 - s) * x0 + s * eps
    pred = model_fn(noisy.astype(latents.dtype), timesteps).astype(jnp.float32)
    weights = _per_sample(loss_weighting(weighting_scheme, jnp.asarray(sigmas, jnp.float32)), latents.ndim)
    per = jnp.mean((weights * (pred - (eps - x0)) ** 2).reshape(latents.shape[0], -1), axis=1)
    return jnp.mean(per)
