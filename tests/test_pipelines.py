"""JAX pipelines against diffusers' torch pipelines on tiny random pipelines saved with `save_pretrained`.

Reference: diffusers 0.35.2's `StableDiffusionPipeline` / `StableDiffusionXLPipeline` / `FluxPipeline`
loaded from the same folder, fp32 on CPU, given the same prompts, initial latents (`latents=`) and LoRA
files (`load_lora_weights`, `set_adapters`, the call's LoRA scale). Images compare as
`output_type="np"` floats; the bar is 2/255, and every LoRA case first checks that its effect on
the reference image is far larger than that.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pipelines_ref as P
from jlora.pipelines import load_pipeline
from jlora.pipelines.common import Lora, Request

SIZE = 32
STEPS = 3
TOL = 2 / 255
PROMPTS = ["a photo of a cat", "a blue dog in the city at night"]
GUIDANCE = {"sd": 5.0, "sdxl": 5.0, "flux": 3.5}


@pytest.fixture(scope="module", params=["sd", "sdxl", "flux"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def jax_pipe(family):
    return load_pipeline(P.pipeline_dir(family))


def _load(pipe, path, name):
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=name)


def _torch_images(family, pipe, prompts, latents, scale=None, negative=None, guidance=None):
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance or GUIDANCE[family],
              latents=torch.from_numpy(latents), output_type="np")
    if family == "flux":
        kw["max_sequence_length"] = P.T5_LEN
        if scale is not None:
            kw["joint_attention_kwargs"] = {"scale": scale}
    else:
        kw["negative_prompt"] = negative
        if scale is not None:
            kw["cross_attention_kwargs"] = {"scale": scale}
    with torch.no_grad():
        return pipe(prompts, **kw).images


def _requests(prompts, **kw):
    return [Request(p, steps=STEPS, width=SIZE, height=SIZE, **kw) for p in prompts]


def _generate(family, pipe, requests, latents):
    return pipe.generate(requests, latents=latents, default_guidance=GUIDANCE[family])


def test_images_match_diffusers_without_lora(family, jax_pipe):
    latents = P.initial_latents(family, len(PROMPTS), SIZE, SIZE)
    want = _torch_images(family, P.torch_pipeline(family), PROMPTS, latents)
    assert want.std() > 0.05 and np.abs(want[0] - want[1]).max() > 0.2  # prompts matter
    got = _generate(family, jax_pipe, _requests(PROMPTS), latents)
    assert got.shape == want.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("mode", ["merged", "per_sample"])
def test_images_match_diffusers_with_lora(family, jax_pipe, mode):
    latents = P.initial_latents(family, len(PROMPTS), SIZE, SIZE, seed=1)
    pipe = P.torch_pipeline(family)
    base = _torch_images(family, pipe, PROMPTS, latents)
    path = P.lora_file(family)
    _load(pipe, path, "style")
    want = _torch_images(family, pipe, PROMPTS, latents, scale=0.7)
    assert np.abs(want - base).max() > 30 * TOL
    got = jax_pipe.generate(_requests(PROMPTS, loras=(Lora(path),), lora_scale=0.7), latents=latents,
                            default_guidance=GUIDANCE[family], lora_mode=mode)
    assert np.abs(got - want).max() <= TOL


def test_a_different_lora_set_per_prompt_in_one_batch(family, jax_pipe):
    """One batch: LoRA A at scale 0.7, A (weight 0.8) + B (weight 0.5) at scale 1, and no LoRA. Reference:
    each prompt alone through diffusers with that adapter set (`set_adapters` weights, call scale)."""
    a, b = P.lora_file(family, seed=0), P.lora_file(family, seed=1, rank=2, text_encoder=family != "flux")
    latents = P.initial_latents(family, 3, SIZE, SIZE, seed=2)
    prompts = ["a red cat", "a painting of a river", "a mountain"]
    pipe = P.torch_pipeline(family)
    _load(pipe, a, "a")
    _load(pipe, b, "b")
    want = []
    for i, (names, weights, scale) in enumerate([(["a"], [1.0], 0.7), (["a", "b"], [0.8, 0.5], 1.0), (None, None, None)]):
        if names:
            pipe.set_adapters(names, weights)
            pipe.enable_lora()
        else:
            pipe.disable_lora()
        want.append(_torch_images(family, pipe, prompts[i : i + 1], latents[i : i + 1], scale=scale)[0])
    want = np.stack(want)
    requests = [
        Request(prompts[0], loras=(Lora(a),), lora_scale=0.7, steps=STEPS, width=SIZE, height=SIZE),
        Request(prompts[1], loras=(Lora(a, 0.8), Lora(b, 0.5)), steps=STEPS, width=SIZE, height=SIZE),
        Request(prompts[2], steps=STEPS, width=SIZE, height=SIZE),
    ]
    got = _generate(family, jax_pipe, requests, latents)
    assert np.abs(want[0] - want[1]).max() > 30 * TOL
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_negative_prompts_match_diffusers(name):
    pipe = load_pipeline(P.pipeline_dir(name))
    latents = P.initial_latents(name, 2, SIZE, SIZE, seed=3)
    negatives = ["blurry", ""]
    want = _torch_images(name, P.torch_pipeline(name), PROMPTS, latents, negative=negatives, guidance=7.0)
    got = pipe.generate([Request(p, negative_prompt=n, guidance=7.0, steps=STEPS, width=SIZE, height=SIZE)
                         for p, n in zip(PROMPTS, negatives)], latents=latents)
    assert np.abs(got - want).max() <= TOL


def test_over_long_prompts_are_truncated_with_a_warning(caplog):
    pipe = load_pipeline(P.pipeline_dir("sd"))
    long = " ".join(["a photo of the cat"] * 20)
    latents = P.initial_latents("sd", 1, SIZE, SIZE, seed=4)
    want = _torch_images("sd", P.torch_pipeline("sd"), [long], latents)
    with caplog.at_level("WARNING", logger="jlora.pipelines"):
        got = pipe.generate(_requests([long]), latents=latents, default_guidance=GUIDANCE["sd"])
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_bfloat16_pipeline_stays_close_to_diffusers_float32(name):
    """bf16 params and compute (`dtype=jnp.bfloat16`), against diffusers' fp32 images: bf16 rounding only."""
    pipe = load_pipeline(P.pipeline_dir(name), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(pipe.params)} == {jnp.dtype(jnp.bfloat16)}
    latents = P.initial_latents(name, 2, SIZE, SIZE, seed=5)
    want = _torch_images(name, P.torch_pipeline(name), PROMPTS, latents)
    got = _generate(name, pipe, _requests(PROMPTS), latents)
    assert np.abs(got - want).mean() < 0.02 and np.abs(got - want).max() < 0.15
