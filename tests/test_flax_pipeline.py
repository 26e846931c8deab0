"""LoRAs in diffusers' own `FlaxStableDiffusionPipeline` params dict (`jlora.apply_pipeline`).

Reference: diffusers' torch `StableDiffusionPipeline` on the same saved tiny pipeline, LoRA file and
initial latents; the Flax pipeline runs diffusers' Flax DDIM scheduler and Flax models.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jlora
import pipelines_ref as P
from jlora.models import load_component
from jlora.pipelines.common import load_tokenizer, read_json


def _flax_pipeline(directory):
    from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline

    models, params = {}, {}
    for name in ("text_encoder", "unet", "vae"):
        models[name], params[name] = load_component(directory, name)
    config = read_json(os.path.join(directory, "scheduler", "scheduler_config.json"))
    scheduler = FlaxDDIMScheduler.from_config(config)
    params["scheduler"] = scheduler.create_state()
    pipe = FlaxStableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                       tokenizer=load_tokenizer(os.path.join(directory, "tokenizer")),
                                       unet=models["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, dtype=jnp.float32)
    return pipe, params


def test_lora_into_a_flax_stable_diffusion_pipeline_matches_diffusers_torch():
    directory, path = P.pipeline_dir("sd"), P.lora_file("sd")
    pipe, params = _flax_pipeline(directory)
    adapters = jlora.load_lora_weights(path, params, family="sd")
    assert adapters["vae"] is None and adapters["scheduler"] is None
    assert jlora.count(adapters["unet"]) > 0 and jlora.count(adapters["text_encoder"]) > 0
    lora_params = jlora.apply_pipeline(params, adapters, 0.7)
    assert lora_params["vae"] is params["vae"] and lora_params["scheduler"] is params["scheduler"]

    prompts = ["a photo of a cat", "a dog"]
    latents = P.initial_latents("sd", 2, 32, 32, seed=6)
    ids = pipe.prepare_inputs(prompts)
    run = lambda p: np.asarray(pipe(ids, p, jax.random.key(0), num_inference_steps=3, height=32, width=32,  # noqa: E731
                                    guidance_scale=jnp.float32(5.0), latents=jnp.asarray(latents), jit=False).images)
    got, base = run(lora_params), run(params)

    torch_pipe = P.torch_pipeline("sd")
    torch_pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    with torch.no_grad():
        want = torch_pipe(prompts, height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                          latents=torch.from_numpy(latents), output_type="np", cross_attention_kwargs={"scale": 0.7}).images
    got = got.reshape(want.shape)
    assert np.abs(want - base.reshape(want.shape)).max() > 0.1
    assert np.abs(got - want).max() <= 2 / 255


def test_text_encoder_scale_is_separate():
    directory, path = P.pipeline_dir("sd"), P.lora_file("sd")
    _, params = _flax_pipeline(directory)
    adapters = jlora.load_lora_weights(path, params, family="sd")
    out = jlora.apply_pipeline(params, adapters, 0.7, text_encoder_scale=0.0)
    for x, y in zip(jax.tree.leaves(out["text_encoder"]), jax.tree.leaves(params["text_encoder"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(out["unet"]), jax.tree.leaves(params["unet"])))


def test_lora_into_a_flax_sdxl_pipeline_matches_diffusers_torch():
    from diffusers import FlaxEulerDiscreteScheduler, FlaxStableDiffusionXLPipeline

    directory, path = P.pipeline_dir("sdxl"), P.lora_file("sdxl")
    models, params = {}, {}
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        models[name], params[name] = load_component(directory, name)
    scheduler = FlaxEulerDiscreteScheduler.from_config(
        read_json(os.path.join(directory, "scheduler", "scheduler_config.json")))
    params["scheduler"] = scheduler.create_state()
    pipe = FlaxStableDiffusionXLPipeline(
        text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"], vae=models["vae"],
        tokenizer=load_tokenizer(os.path.join(directory, "tokenizer")),
        tokenizer_2=load_tokenizer(os.path.join(directory, "tokenizer_2")), unet=models["unet"], scheduler=scheduler,
        dtype=jnp.float32)
    adapters = jlora.load_lora_weights(path, params, family="sdxl")
    lora_params = jlora.apply_pipeline(params, adapters, 0.7)

    prompts = ["a photo of a cat", "a dog"]
    latents = P.initial_latents("sdxl", 2, 32, 32, seed=7)
    ids = pipe.prepare_inputs(prompts)
    neg = pipe.prepare_inputs(["", ""])
    got = np.asarray(pipe(ids, lora_params, jax.random.key(0), num_inference_steps=3, height=32, width=32,
                          guidance_scale=jnp.float32(5.0), latents=jnp.asarray(latents), neg_prompt_ids=neg,
                          jit=False).images)

    torch_pipe = P.torch_pipeline("sdxl")
    torch_pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    with torch.no_grad():
        want = torch_pipe(prompts, negative_prompt=["", ""], height=32, width=32, num_inference_steps=3,
                          guidance_scale=5.0, latents=torch.from_numpy(latents), output_type="np",
                          cross_attention_kwargs={"scale": 0.7}).images
    assert np.abs(got.reshape(want.shape) - want).max() <= 2 / 255
