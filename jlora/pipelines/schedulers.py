"""Sampling schedulers: DDIM, Euler discrete and flow-match Euler, with diffusers' math.

A builder turns a diffusers scheduler config (the dict in `scheduler/scheduler_config.json`;
`_`-prefixed keys and keys the scheduler does not read are ignored, as diffusers ignores them)
and a step count into a `Schedule`. Its tables are computed on the host with numpy in the
dtypes and order diffusers 0.35.2 uses in torch, then held as jnp arrays. `timestep`,
`scale_model_input` and `step` are pure functions of `(schedule, ..., i)` with `i` a step index
that may be traced, so the whole denoising loop runs inside `jax.lax.fori_loop`:

>>> sched = ddim({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 30)
>>> def body(i, x):
...     eps = unet(scale_model_input(sched, x, i), timestep(sched, i))
...     return step(sched, eps, i, x)
>>> x = jax.lax.fori_loop(0, sched.num_steps, body, noise * sched.init_noise_sigma)

Options these schedulers do not implement raise `SchedulerConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.errors import JloraError

__all__ = ["Schedule", "SchedulerConfigError", "ddim", "euler_discrete", "flow_match_euler",
           "scale_model_input", "step", "timestep"]

_F32 = np.float32
_SPACINGS = ("leading", "trailing", "linspace")
_BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
_BETA_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                  "beta_schedule": "linear", "trained_betas": None, "steps_offset": 0}
_NO_SIGMA_CONVERSION = {k: (False, None) for k in
                        ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")}


class SchedulerConfigError(JloraError, ValueError):
    """A scheduler config option or argument has a value these schedulers do not support."""


def _static():
    return dataclasses.field(metadata={"static": True})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """Host-computed tables of one sampling run; a pytree whose numbers are array leaves.

    Attributes:
      kind: `"ddim"`, `"euler"` or `"flow_match"` (static).
      prediction_type: `"epsilon"`, `"v_prediction"`, `"sample"` or `"flow"` (static).
      clip_sample_range: DDIM's clip of the predicted sample, or None (static).
      timesteps: `(n,)` model timesteps (int32 for DDIM, float32 otherwise).
      sigmas: `(n + 1,)` float32 noise levels ending in the final one (Euler, flow); `(0,)` for DDIM.
      alphas_cumprod: `(n,)` float32 alpha-bar at each step's timestep (DDIM); `(0,)` otherwise.
      alphas_cumprod_prev: `(n,)` float32 alpha-bar of the step it goes to (DDIM); `(0,)` otherwise.
      init_noise_sigma: float32 scalar to multiply unit initial noise by.

    >>> euler_discrete({"timestep_spacing": "leading", "steps_offset": 1}, 4).timesteps
    Array([751., 501., 251.,   1.], dtype=float32)
    """

    kind: str = _static()
    prediction_type: str = _static()
    clip_sample_range: float | None = _static()
    timesteps: jax.Array
    sigmas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    init_noise_sigma: jax.Array

    @property
    def num_steps(self) -> int:
        """The number of denoising steps (the length of `timesteps`)."""
        return self.timesteps.shape[0]


def _options(name: str, config: Mapping, defaults: dict, choices: dict, neutral: dict) -> dict:
    """Reads `defaults`' keys from `config`; checks `choices` and that `neutral` keys stay neutral."""
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    opts = {k: cfg.get(k, d) for k, d in defaults.items()}
    checks = [(k, opts[k], allowed) for k, allowed in choices.items()]
    checks += [(k, cfg.get(k, allowed[0]), allowed) for k, allowed in neutral.items()]
    for key, value, allowed in checks:
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            supported = ", ".join(repr(a) for a in allowed)
            raise SchedulerConfigError(
                f"{name}: config option {key}={value!r} is not supported (supported: {supported})")
    return opts


def _check_steps(n: int, num_train: int | None = None) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SchedulerConfigError(f"num_inference_steps={n!r} is not supported (supported: an int >= 1)")
    if num_train is not None and n > num_train:
        raise SchedulerConfigError(f"num_inference_steps={n} is not supported (supported: at most "
                                   f"num_train_timesteps={num_train})")
    return int(n)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 `torch.linspace` as torch's CPU kernel computes it: a fused multiply-add from the
    start for the first half, from the end for the second."""
    s, e = _F32(start), _F32(end)
    if n == 1:
        return np.array([s], _F32)
    d = np.float64(_F32((e - s) / _F32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, s + d * i, e - d * (n - 1 - i)).astype(_F32)


def _alphas_cumprod(o: dict) -> np.ndarray:
    """float32 alpha-bar over the training timesteps (torch's float32 betas, float64 cumprod)."""
    n = o["num_train_timesteps"]
    if o["trained_betas"] is not None:
        betas = np.asarray(o["trained_betas"], dtype=_F32)
    elif o["beta_schedule"] == "linear":
        betas = _linspace_f32(o["beta_start"], o["beta_end"], n)
    elif o["beta_schedule"] == "scaled_linear":
        betas = _linspace_f32(o["beta_start"] ** 0.5, o["beta_end"] ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2, in Python floats as diffusers' betas_for_alpha_bar
        bar = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        betas = np.array([min(1 - bar[i + 1] / bar[i], 0.999) for i in range(n)], dtype=_F32)
    return np.cumprod((_F32(1.0) - betas).astype(np.float64)).astype(_F32)


def _train_timesteps(o: dict, n: int, *, round_linspace: bool) -> np.ndarray:
    """The `n` training timesteps (descending, float64) that `timestep_spacing` picks."""
    num_train, spacing = o["num_train_timesteps"], o["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n)
        return (ts.round() if round_linspace else ts.astype(_F32).astype(np.float64))[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (num_train // n))[::-1].astype(np.float64) + o["steps_offset"]
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1


def ddim(config: Mapping, num_inference_steps: int) -> Schedule:
    """A DDIM schedule (diffusers' `DDIMScheduler.set_timesteps`), from a DDIM/PNDM-style config.

    Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule` (linear, scaled_linear,
    squaredcos_cap_v2), `trained_betas`, `steps_offset`, `set_alpha_to_one`, `clip_sample`,
    `clip_sample_range`, `prediction_type` (epsilon, v_prediction, sample) and `timestep_spacing`
    (leading, trailing, linspace), with DDIMScheduler's defaults. Refuses `thresholding=True` and
    `rescale_betas_zero_snr=True`.

    >>> s = ddim({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    ...           "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}, 4)
    >>> s.timesteps
    Array([751, 501, 251,   1], dtype=int32)
    """
    o = _options("DDIMScheduler", config,
                 {**_BETA_DEFAULTS, "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 1.0,
                  "prediction_type": "epsilon", "timestep_spacing": "leading"},
                 {"beta_schedule": _BETAS, "prediction_type": ("epsilon", "v_prediction", "sample"),
                  "timestep_spacing": _SPACINGS},
                 {"thresholding": (False, None), "rescale_betas_zero_snr": (False, None)})
    num_train = o["num_train_timesteps"]
    n = _check_steps(num_inference_steps, num_train)
    ac = _alphas_cumprod(o)
    ts = _train_timesteps(o, n, round_linspace=True).astype(np.int64)
    if ts.min() < 0 or ts.max() >= num_train:
        raise SchedulerConfigError(
            f"DDIMScheduler: timesteps {ts.tolist()} leave [0, {num_train}) with steps_offset="
            f"{o['steps_offset']} and {n} steps (supported: fewer steps or a smaller steps_offset)")
    final = _F32(1.0) if o["set_alpha_to_one"] else ac[0]
    prev = ts - num_train // n
    ac_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(_F32)
    clip = float(o["clip_sample_range"]) if o["clip_sample"] else None
    empty = jnp.zeros((0,), jnp.float32)
    return Schedule("ddim", o["prediction_type"], clip, jnp.asarray(ts, jnp.int32), empty,
                    jnp.asarray(ac[ts]), jnp.asarray(ac_prev), jnp.float32(1.0))


def euler_discrete(config: Mapping, num_inference_steps: int) -> Schedule:
    """A deterministic Euler schedule (diffusers' `EulerDiscreteScheduler`, `s_churn=0`).

    Reads the beta options and `steps_offset` as `ddim` does, `prediction_type` (epsilon,
    v_prediction, sample/original_sample), `timestep_spacing` (linspace, leading, trailing),
    `interpolation_type` (linear only) and `final_sigmas_type` (zero, sigma_min), with
    EulerDiscreteScheduler's defaults. Refuses Karras/exponential/beta sigmas, continuous
    timesteps and zero-terminal-SNR rescaling.

    >>> s = euler_discrete({"timestep_spacing": "leading", "steps_offset": 1}, 30)
    >>> s.sigmas.shape, s.timesteps.dtype
    ((31,), dtype('float32'))
    """
    o = _options("EulerDiscreteScheduler", config,
                 {**_BETA_DEFAULTS, "prediction_type": "epsilon", "timestep_spacing": "linspace",
                  "interpolation_type": "linear", "final_sigmas_type": "zero"},
                 {"beta_schedule": _BETAS, "timestep_spacing": _SPACINGS, "interpolation_type": ("linear",),
                  "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
                  "final_sigmas_type": ("zero", "sigma_min")},
                 {**_NO_SIGMA_CONVERSION, "timestep_type": ("discrete",), "rescale_betas_zero_snr": (False, None)})
    n = _check_steps(num_inference_steps, o["num_train_timesteps"])
    ac = _alphas_cumprod(o)
    train_sigmas = np.sqrt((_F32(1.0) - ac) / ac)
    ts = _train_timesteps(o, n, round_linspace=False).astype(_F32)
    sig = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    last = train_sigmas[0] if o["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sig, [last]]).astype(_F32)
    top = sigmas.max()
    init = top if o["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top * top + _F32(1.0))
    pred = "sample" if o["prediction_type"] == "original_sample" else o["prediction_type"]
    empty = jnp.zeros((0,), jnp.float32)
    return Schedule("euler", pred, None, jnp.asarray(ts), jnp.asarray(sigmas), empty, empty, jnp.float32(init))


def flow_match_euler(config: Mapping, num_inference_steps: int, *, image_seq_len: int | None = None,
                     sigmas: Sequence[float] | np.ndarray | None = None) -> Schedule:
    """A flow-matching Euler schedule (diffusers' `FlowMatchEulerDiscreteScheduler`).

    Reads `num_train_timesteps`, `shift`, `use_dynamic_shifting`, `base_shift`, `max_shift`,
    `base_image_seq_len`, `max_image_seq_len`, `time_shift_type` (exponential, linear) and
    `shift_terminal`. With dynamic shifting, `mu` is diffusers' `calculate_shift(image_seq_len, ...)`
    (Flux: `image_seq_len = (height // 16) * (width // 16)`). `sigmas` (length
    `num_inference_steps`) are the unshifted sigmas a pipeline passes (Flux:
    `np.linspace(1.0, 1 / n, n)`); without them the scheduler's own default is used (as SD3's
    pipeline does). Refuses `invert_sigmas`, `stochastic_sampling` and Karras/exponential/beta sigmas.

    >>> cfg = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}
    >>> s = flow_match_euler(cfg, 4, image_seq_len=4096, sigmas=np.linspace(1.0, 0.25, 4))
    >>> float(s.sigmas[0]), float(s.sigmas[-1])
    (1.0, 0.0)
    """
    o = _options("FlowMatchEulerDiscreteScheduler", config,
                 {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                  "time_shift_type": "exponential", "shift_terminal": None},
                 {"time_shift_type": ("exponential", "linear")},
                 {**_NO_SIGMA_CONVERSION, "invert_sigmas": (False, None), "stochastic_sampling": (False, None)})
    n = _check_steps(num_inference_steps)
    num_train, shift, dynamic = o["num_train_timesteps"], o["shift"], o["use_dynamic_shifting"]

    def static_shift(s):
        return shift * s / (1 + (shift - 1) * s)

    if dynamic:
        if image_seq_len is None:
            raise SchedulerConfigError("FlowMatchEulerDiscreteScheduler: use_dynamic_shifting=True needs "
                                       "image_seq_len (the latent token count, e.g. (h // 16) * (w // 16))")
        m = (o["max_shift"] - o["base_shift"]) / (o["max_image_seq_len"] - o["base_image_seq_len"])
        mu = image_seq_len * m + (o["base_shift"] - m * o["base_image_seq_len"])
    if sigmas is None:
        train = np.arange(num_train, 0, -1).astype(_F32) / _F32(num_train)
        train = train if dynamic else static_shift(train)
        s = np.linspace(float(train[0]) * num_train, float(train[-1]) * num_train, n) / num_train
    else:
        s = np.array(sigmas).astype(_F32)
        if s.shape != (n,):
            raise SchedulerConfigError(f"FlowMatchEulerDiscreteScheduler: sigmas of shape {s.shape} are not "
                                       f"supported (supported: shape ({n},), one per inference step)")
    if not dynamic:
        s = static_shift(s)
    elif o["time_shift_type"] == "exponential":
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    else:
        s = mu / (mu + (1 / s - 1))
    if o["shift_terminal"]:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - o["shift_terminal"]))
    s = s.astype(_F32)
    full = np.concatenate([s, np.zeros(1, _F32)])
    empty = jnp.zeros((0,), jnp.float32)
    return Schedule("flow_match", "flow", None, jnp.asarray(s * _F32(num_train)), jnp.asarray(full),
                    empty, empty, jnp.float32(1.0))


def timestep(schedule: Schedule, i) -> jax.Array:
    """The timestep the model gets at step `i` (may be traced), as diffusers passes it.

    >>> timestep(ddim({}, 10), 0)
    Array(900, dtype=int32)
    """
    return schedule.timesteps[i]


def scale_model_input(schedule: Schedule, sample: jax.Array, i) -> jax.Array:
    """The model input at step `i`: Euler divides by `sqrt(sigma**2 + 1)`; DDIM and flow return `sample`.

    >>> x_in = scale_model_input(sched, x, i)
    """
    if schedule.kind != "euler":
        return sample
    sigma = schedule.sigmas[i]
    return (sample.astype(jnp.float32) / jnp.sqrt(sigma * sigma + 1)).astype(sample.dtype)


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _ddim_step(sch: Schedule, out, i, x, eta, noise):
    a_t, a_prev = sch.alphas_cumprod[i], sch.alphas_cumprod_prev[i]
    b_t = 1 - a_t
    if sch.prediction_type == "epsilon":
        x0, eps = (x - jnp.sqrt(b_t) * out) / jnp.sqrt(a_t), out
    elif sch.prediction_type == "sample":
        x0, eps = out, (x - jnp.sqrt(a_t) * out) / jnp.sqrt(b_t)
    else:  # v_prediction
        x0, eps = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * out, jnp.sqrt(a_t) * out + jnp.sqrt(b_t) * x
    if sch.clip_sample_range is not None:
        x0 = jnp.clip(x0, -sch.clip_sample_range, sch.clip_sample_range)
    if noise is None:
        if not _is_zero(eta):
            raise SchedulerConfigError(f"DDIM step: eta={eta!r} needs noise (supported: eta=0.0 without noise)")
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps
    std = eta * jnp.sqrt(((1 - a_prev) / b_t) * (1 - a_t / a_prev))
    prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std * std) * eps
    return prev + std * noise.astype(jnp.float32)


def step(schedule: Schedule, model_output: jax.Array, i, sample: jax.Array, *, eta=0.0,
         noise: jax.Array | None = None) -> jax.Array:
    """One denoising step from step `i` (may be traced) to step `i + 1`; returns the previous sample.

    DDIM is deterministic with `eta=0`; with `eta > 0` (may be traced) pass the variance `noise`
    (diffusers' `variance_noise`). Euler is diffusers' deterministic step (`s_churn=0`), flow-match
    `sample + (sigma_next - sigma) * model_output`; they take no `eta`/`noise`. Math is float32;
    the result has `model_output`'s dtype (DDIM: the promoted dtype of both inputs).

    >>> x = step(sched, eps, i, x)
    """
    out, x = model_output.astype(jnp.float32), sample.astype(jnp.float32)
    if schedule.kind == "ddim":
        prev = _ddim_step(schedule, out, i, x, eta, noise)
        return prev.astype(jnp.promote_types(sample.dtype, model_output.dtype))
    if noise is not None or not _is_zero(eta):
        raise SchedulerConfigError(f"{schedule.kind} step: eta={eta!r} / noise are not supported "
                                   "(supported: eta=0.0 and noise=None; only DDIM adds noise)")
    sigma, sigma_next = schedule.sigmas[i], schedule.sigmas[i + 1]
    if schedule.kind == "flow_match":
        return (x + (sigma_next - sigma) * out).astype(model_output.dtype)
    if schedule.prediction_type == "epsilon":
        x0 = x - sigma * out
    elif schedule.prediction_type == "v_prediction":
        x0 = out * (-sigma / jnp.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    else:
        x0 = out
    derivative = (x - x0) / sigma
    return (x + derivative * (sigma_next - sigma)).astype(model_output.dtype)
