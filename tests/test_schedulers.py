"""jlora.pipelines.schedulers against diffusers 0.35.2's torch schedulers.

Reference: the diffusers scheduler built from the same config, `set_timesteps` with the same step
count, then `scale_model_input` and `step` on the same model outputs. The whole JAX loop runs in
one `jax.lax.fori_loop` under `jax.jit`, as the pipelines run it.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jlora.pipelines import schedulers as S

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

DDIM_CONFIGS = {
    "sd15": dict(SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False),
    "trailing-v": dict(SD, timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False),
    "linspace-clip": dict(beta_schedule="linear", timestep_spacing="linspace", clip_sample=True),
    "cosine-sample": dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", set_alpha_to_one=True),
}
EULER_CONFIGS = {
    "sdxl": dict(SD, steps_offset=1, timestep_spacing="leading", interpolation_type="linear"),
    "linspace": dict(SD, timestep_spacing="linspace"),
    "trailing-v": dict(SD, timestep_spacing="trailing", prediction_type="v_prediction"),
    "sigma-min-sample": dict(beta_schedule="linear", final_sigmas_type="sigma_min", prediction_type="sample"),
}
FLUX = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
            shift=3.0, use_dynamic_shifting=True)


def _outputs(n, shape=(2, 4, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal((n,) + shape).astype(np.float32)


def _jax_loop(sched, x0, outs, *, scale_input=True):
    """x_{i+1} = step(out_i + 0.1 * scale_model_input(x_i)); the model output depends on the input,
    so a wrong input scaling shows in the result."""

    @jax.jit
    def run(sched, x, outs):
        def body(i, x):
            xin = S.scale_model_input(sched, x, i) if scale_input else x
            return S.step(sched, outs[i] + 0.1 * xin, i, x)

        return jax.lax.fori_loop(0, sched.num_steps, body, x * sched.init_noise_sigma)

    return np.asarray(run(sched, jnp.asarray(x0), jnp.asarray(outs)))


def _torch_loop(ref, x0, outs):
    x = torch.from_numpy(x0) * getattr(ref, "init_noise_sigma", 1.0)
    for i, t in enumerate(ref.timesteps):
        xin = ref.scale_model_input(x, t) if hasattr(type(ref), "scale_model_input") else x
        x = ref.step(torch.from_numpy(outs[i]) + 0.1 * xin, t, x, return_dict=False)[0]
    return x.numpy()


@pytest.mark.parametrize("name", DDIM_CONFIGS)
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_ddim_matches_diffusers(name, steps):
    cfg = DDIM_CONFIGS[name]
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(steps)
    sched = S.ddim(dict(ref.config), steps)
    np.testing.assert_array_equal(np.asarray(sched.timesteps), ref.timesteps.numpy())
    x0, outs = _outputs(steps)
    want = _torch_loop(ref, x0, outs)
    got = _jax_loop(sched, x0, outs)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", EULER_CONFIGS)
@pytest.mark.parametrize("steps", [1, 8, 25])
def test_euler_discrete_matches_diffusers(name, steps):
    cfg = EULER_CONFIGS[name]
    ref = diffusers.EulerDiscreteScheduler(**cfg)
    ref.set_timesteps(steps)
    sched = S.euler_discrete(dict(ref.config), steps)
    np.testing.assert_allclose(np.asarray(sched.timesteps), ref.timesteps.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sched.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(float(sched.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
    x0, outs = _outputs(steps)
    want = _torch_loop(ref, x0, outs)
    got = _jax_loop(sched, x0, outs)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("steps,size", [(4, 256), (28, 1024), (50, 512)])
def test_flow_match_euler_with_flux_shift_matches_diffusers(steps, size):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ref = diffusers.FlowMatchEulerDiscreteScheduler(**FLUX)
    seq = (size // 16) * (size // 16)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(seq, FLUX["base_image_seq_len"], FLUX["max_image_seq_len"], FLUX["base_shift"], FLUX["max_shift"])
    ref.set_timesteps(steps, sigmas=sigmas, mu=mu)
    sched = S.flow_match_euler(FLUX, steps, image_seq_len=seq, sigmas=sigmas)
    np.testing.assert_allclose(np.asarray(sched.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sched.timesteps), ref.timesteps.numpy(), rtol=1e-6)
    x0, outs = _outputs(steps, (2, 64, 16))
    want = _torch_loop(ref, x0, outs)
    got = _jax_loop(sched, x0, outs)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))


def test_flow_match_static_shift_without_sigmas_matches_diffusers():
    cfg = dict(num_train_timesteps=1000, shift=3.0)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    ref.set_timesteps(12)
    sched = S.flow_match_euler(cfg, 12)
    np.testing.assert_allclose(np.asarray(sched.sigmas), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sched.timesteps), ref.timesteps.numpy(), rtol=1e-6)


def test_ddim_eta_noise_matches_diffusers():
    cfg = DDIM_CONFIGS["sd15"]
    ref = diffusers.DDIMScheduler(**cfg)
    ref.set_timesteps(5)
    sched = S.ddim(cfg, 5)
    x0, outs = _outputs(5)
    noise = np.random.default_rng(1).standard_normal((5,) + x0.shape).astype(np.float32)
    x = torch.from_numpy(x0)
    for i, t in enumerate(ref.timesteps):
        x = ref.step(torch.from_numpy(outs[i]), t, x, eta=0.5, variance_noise=torch.from_numpy(noise[i]), return_dict=False)[0]
    y = jnp.asarray(x0)
    for i in range(5):
        y = S.step(sched, jnp.asarray(outs[i]), i, y, eta=0.5, noise=jnp.asarray(noise[i]))
    np.testing.assert_allclose(np.asarray(y), x.numpy(), rtol=0, atol=2e-5 * np.abs(x.numpy()).max())


@pytest.mark.parametrize("build,config,match", [
    (S.ddim, dict(thresholding=True), "thresholding"),
    (S.ddim, dict(timestep_spacing="karras"), "timestep_spacing"),
    (S.euler_discrete, dict(use_karras_sigmas=True), "use_karras_sigmas"),
    (S.flow_match_euler, dict(use_dynamic_shifting=True), "image_seq_len"),
    (S.flow_match_euler, dict(stochastic_sampling=True), "stochastic_sampling"),
])
def test_unsupported_options_are_typed_errors(build, config, match):
    with pytest.raises(S.SchedulerConfigError, match=match):
        build(config, 10)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, 1001])
def test_bad_step_counts_are_typed_errors(steps):
    with pytest.raises(S.SchedulerConfigError, match="num_inference_steps"):
        S.ddim({}, steps)
