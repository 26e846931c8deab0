"""Training objectives against diffusers' LoRA training scripts' math in torch.

Reference: the loss lines of `train_text_to_image_lora.py` (DDPMScheduler.add_noise, get_velocity,
`diffusers.training_utils.compute_snr` min-SNR weighting) and of `train_dreambooth_lora_flux.py`
(`compute_density_for_timestep_sampling`, the scheduler's timesteps and sigmas,
`compute_loss_weighting_for_sd3`, `FluxPipeline._pack_latents` / `_unpack_latents`), run on
diffusers + PEFT models with the same noise and timesteps; gradients by torch autograd on the
PEFT factors.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

import jlora
import reference as R
from jlora import objectives as O
from test_training import SCALE, _leaf, _torch_factors, _torch_lora_model

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(scope="module")
def unet():
    return R.build_sd15_unet()


@pytest.fixture(scope="module")
def lora(unet, tmp_path_factory):
    return R.make_peft_lora_file(tmp_path_factory.mktemp("obj") / "lora", [unet], rank=4, alpha=8, pipeline="sd")


def _grad_error(grads, want):
    d2 = n2 = 0.0
    for path, (a_t, b_t) in want.items():
        leaf = _leaf(grads, path)
        d = np.concatenate([(np.asarray(leaf.a) - a_t).ravel(), (np.asarray(leaf.b) - b_t).ravel()])
        g = np.concatenate([a_t.ravel(), b_t.ravel()])
        d2, n2 = d2 + float(d @ d), n2 + float(g @ g)
    return np.sqrt(d2), np.sqrt(n2)


@pytest.mark.parametrize("prediction_type,snr_gamma", [("epsilon", None), ("v_prediction", None), ("epsilon", 5.0),
                                                       ("v_prediction", 5.0)])
def test_sd_loss_and_lora_gradients_match_the_text_to_image_script(unet, lora, prediction_type, snr_gamma):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    rng = np.random.default_rng(3)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    timesteps = np.array([37, 811])
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)

    scheduler = DDPMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    model = _torch_lora_model(unet, lora, tanh_gelu=True)
    x0, eps, t = torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(timesteps)
    noisy = scheduler.add_noise(x0, eps, t)
    target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    pred = model(noisy, t, torch.from_numpy(context), cross_attention_kwargs={"scale": SCALE}).sample
    if snr_gamma is None:
        loss_t = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    else:
        snr = compute_snr(scheduler, t)
        w = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        loss_t = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        loss_t = (loss_t.mean(dim=list(range(1, len(loss_t.shape)))) * w).mean()
    loss_t.backward()

    adapter, report = jlora.load_lora(lora, unet.flax_params, "unet", return_report=True)
    want = _torch_factors(model, report.placed, attr="grad")
    fn = R.flax_apply_fn(unet)
    ac = O.alphas_cumprod(SD_SCHEDULER)

    def loss(a):
        p = jlora.apply(unet.flax_params, a, SCALE)
        return O.diffusion_loss(lambda x, ts: fn(p, x, ts, context), jnp.asarray(latents), jnp.asarray(noise),
                                jnp.asarray(timesteps), ac, prediction_type=prediction_type, snr_gamma=snr_gamma)

    value, grads = jax.jit(jax.value_and_grad(loss))(adapter)
    np.testing.assert_allclose(float(value), float(loss_t), rtol=1e-4)
    err, total = _grad_error(grads, want)
    assert total > 1e-4 and err <= 1e-4 * total, err / total


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_flux_timestep_sampling_and_weighting_match_the_flux_script(scheme):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    config = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    t_j, s_j = O.flow_training_tables(config)
    np.testing.assert_allclose(t_j, scheduler.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(s_j, scheduler.sigmas.numpy(), rtol=1e-6)
    static = dict(config, use_dynamic_shifting=False)
    t_s, s_s = O.flow_training_tables(static)
    np.testing.assert_allclose(s_s, FlowMatchEulerDiscreteScheduler(**static).sigmas.numpy(), rtol=1e-6)

    # the density: same u from the same uniform / normal draws
    torch.manual_seed(0)
    u_t = compute_density_for_timestep_sampling(scheme if scheme in ("logit_normal", "mode") else "none", 4096,
                                                logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    t, s = O.sample_flow_timesteps(jax.random.key(0), 4096, config, weighting_scheme=scheme)
    # distributions agree (independent draws): compare quantiles of the sampled sigmas
    want_sigmas = scheduler.sigmas[(u_t * 1000).long()].numpy()
    q = np.linspace(0.05, 0.95, 10)
    np.testing.assert_allclose(np.quantile(np.asarray(s), q), np.quantile(want_sigmas, q), atol=0.04)
    assert set(np.round(np.asarray(t), 3)) <= set(np.round(t_j, 3))
    sig = torch.linspace(0.05, 1.0, 9)
    np.testing.assert_allclose(np.asarray(O.loss_weighting(scheme, jnp.asarray(sig.numpy()))),
                               compute_loss_weighting_for_sd3(scheme, sig).numpy(), rtol=1e-6)


def test_flux_flow_matching_loss_and_gradients_match_the_flux_script(tmp_path):
    """Loss of `train_dreambooth_lora_flux.py` for one batch (packed latents, guidance, sigma weighting),
    with a PEFT LoRA on the torch transformer and the same file loaded by jlora onto its fused, stacked
    Flux; the LoRA gradients compared module by module inside the fused leaves."""
    import test_flux_model as F
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from jlora.models import flux
    from jlora.pipelines.flux import image_ids, pack, unpack

    torch_model = F._build(True)
    cfg = dict(torch_model.config)
    lora_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "proj_mlp", "ff.net.2"])
    torch_model.add_adapter(lora_config)
    for n, p in torch_model.named_parameters():
        p.requires_grad_("lora_" in n)
    path = str(tmp_path / "flux_lora")
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(torch_model),
                                   transformer_lora_adapter_metadata=lora_config.to_dict())
    base = {k.replace(".base_layer", ""): v for k, v in torch_model.state_dict().items() if "lora_" not in k}
    apply_fn, params = flux.from_diffusers(base, cfg)

    c = cfg["in_channels"] // 4
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((2, c, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    timesteps = np.array([870.0, 215.0], np.float32)
    sigmas = timesteps / 1000
    txt = rng.standard_normal((2, F.S_TXT, cfg["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, cfg["pooled_projection_dim"])).astype(np.float32)
    ids, txt_ids = image_ids(8, 8), np.zeros((F.S_TXT, 3), np.float32)

    s = torch.from_numpy(sigmas)[:, None, None, None]
    x0, eps = torch.from_numpy(latents), torch.from_numpy(noise)
    noisy = (1.0 - s) * x0 + s * eps
    packed = FluxPipeline._pack_latents(noisy, 2, c, 8, 8)
    pred = torch_model(hidden_states=packed, timestep=torch.from_numpy(timesteps) / 1000,
                       guidance=torch.full((2,), 3.5), pooled_projections=torch.from_numpy(pooled),
                       encoder_hidden_states=torch.from_numpy(txt), txt_ids=torch.from_numpy(txt_ids),
                       img_ids=torch.from_numpy(ids), return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, 8 * 8, 8 * 8, 8)  # (h * vae_scale, w * vae_scale, vae_scale)
    weighting = compute_loss_weighting_for_sd3("sigma_sqrt", s)
    loss_t = torch.mean((weighting.float() * (pred.float() - (eps - x0).float()) ** 2).reshape(2, -1), 1).mean()
    loss_t.backward()

    adapter = jlora.load_lora_weights(path, {"transformer": params}, family="flux")["transformer"]

    def loss(a):
        p = jlora.apply(params, a)

        def model_fn(x, ts):
            out = apply_fn(p, pack(x), jnp.asarray(txt), jnp.asarray(pooled), ts / 1000, jnp.asarray(ids),
                           jnp.asarray(txt_ids), jnp.full((2,), 3.5))
            return unpack(out, 8, 8)

        return O.flow_matching_loss(model_fn, jnp.asarray(latents), jnp.asarray(noise), jnp.asarray(timesteps),
                                    jnp.asarray(sigmas), weighting_scheme="sigma_sqrt")

    value, grads = jax.jit(jax.value_and_grad(loss))(adapter)
    np.testing.assert_allclose(float(value), float(loss_t), rtol=1e-4)
    without = float(loss(jax.tree.map(lambda l: None, adapter, is_leaf=jlora.is_adapter_leaf)))
    assert abs(without - float(value)) > 1e-3 * float(value)  # the LoRA is in the loss

    # gradients per torch module: jlora's fused, stacked leaf holds each module's factors in its own
    # rank rows and output columns, b scaled so that c * a @ b (c = leaf alpha / leaf rank) is the
    # module's delta; so a-gradients are torch's A-gradients transposed, and b-gradients times
    # (torch alpha / r) / c are torch's B-gradients transposed
    from converters.naming import get_scheme

    scheme, named = get_scheme("jlora_flux"), dict(torch_model.named_parameters())
    flat = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=jlora.is_adapter_leaf)[0]
    d2 = n2 = 0.0
    checked = 0
    for kp, leaf in flat:
        if leaf is None:
            continue
        path = jlora.loading.path_of(kp)
        g = _leaf(grads, "/".join(path))
        for module, layer, cols in scheme.sources(path[:-1], leaf.shape):
            key = f"{module}.lora_A.default.weight"
            if key not in named:
                continue
            b = np.asarray(leaf.b if layer is None else leaf.b[layer])
            ga, gb = (np.asarray(g.a), np.asarray(g.b)) if layer is None else (np.asarray(g.a[layer]), np.asarray(g.b[layer]))
            out = np.concatenate([np.arange(s0, s1) - s0 + d0 for s0, s1, d0 in cols]) if cols else np.arange(b.shape[1])
            rows = np.flatnonzero(np.abs(b[:, out]).sum(1) > 0)
            c = float(np.asarray(leaf.alpha if layer is None or np.ndim(leaf.alpha) == 0 else leaf.alpha[layer])) / b.shape[0]
            s_torch = lora_config.lora_alpha / lora_config.r
            want_a = named[key].grad.numpy().T
            want_b = named[f"{module}.lora_B.default.weight"].grad.numpy().T
            got_a, got_b = ga[:, rows], gb[np.ix_(rows, out)] * (s_torch / c)
            for x, y in ((got_a, want_a), (got_b, want_b)):
                assert x.shape == y.shape, (module, x.shape, y.shape)
                d2, n2 = d2 + float(((x - y) ** 2).sum()), n2 + float((y**2).sum())
            checked += 1
    assert checked == len([k for k in named if k.endswith("lora_A.default.weight")])
    assert np.sqrt(n2) > 1e-4 and np.sqrt(d2) <= 1e-4 * np.sqrt(n2), np.sqrt(d2 / n2)


def test_sdxl_loss_and_lora_gradients_match_the_sdxl_script(tmp_path_factory):
    """`train_dreambooth_lora_sdxl.py`'s loss: the UNet gets the pooled text embeddings and the six
    size/crop time ids (`added_cond_kwargs`), epsilon target, plain MSE."""
    from diffusers import DDPMScheduler

    unet = R.build_sdxl_unet()
    lora = R.make_peft_lora_file(tmp_path_factory.mktemp("objxl") / "lora", [unet], rank=4, alpha=8, pipeline="sdxl")
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    timesteps = np.array([120, 640])
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    pooled = rng.standard_normal((2, 32)).astype(np.float32)
    time_ids = np.array([[48, 40, 4, 0, 32, 32], [32, 36, 0, 2, 32, 32]], np.float32)

    scheduler = DDPMScheduler(**SD_SCHEDULER)
    model = _torch_lora_model(unet, lora, tanh_gelu=True)
    x0, eps, t = torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(timesteps)
    pred = model(scheduler.add_noise(x0, eps, t), t, torch.from_numpy(context),
                 added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)},
                 cross_attention_kwargs={"scale": SCALE}).sample
    loss_t = torch.nn.functional.mse_loss(pred.float(), eps.float(), reduction="mean")
    loss_t.backward()

    adapter, report = jlora.load_lora(lora, unet.flax_params, "unet", return_report=True)
    want = _torch_factors(model, report.placed, attr="grad")
    fn = R.flax_apply_fn(unet)
    ac = O.alphas_cumprod(SD_SCHEDULER)

    def loss(a):
        p = jlora.apply(unet.flax_params, a, SCALE)
        return O.diffusion_loss(lambda x, ts: fn(p, x, ts, context, text_embeds=pooled, time_ids=time_ids),
                                jnp.asarray(latents), jnp.asarray(noise), jnp.asarray(timesteps), ac)

    value, grads = jax.jit(jax.value_and_grad(loss))(adapter)
    np.testing.assert_allclose(float(value), float(loss_t), rtol=1e-4)
    err, total = _grad_error(grads, want)
    assert total > 1e-4 and err <= 1e-4 * total, err / total
