"""scripts/train_lora.py on tiny saved SD and SDXL pipelines and a folder of images with captions.

References: the objective's parity with diffusers' scripts is tests/test_objectives.py; here the
written LoRA must load in diffusers' torch pipeline (and change its images), a resumed run must
equal an uninterrupted one, and the kohya export must give diffusers the same images as the
diffusers export.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import jlora
import pipelines_ref as P
from converters.safetensors_io import load_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import train_lora  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red cat", "a blue dog", "a green river", "a cat in the city"]):
        h, w = 40 + 4 * i, 48
        img = (rng.uniform(0, 255, (h, w, 3)) * np.linspace(0.3, 1.0, w)[None, :, None]).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return str(folder)


def _args(model, photos, out, *extra):
    return ["--model", model, "--data", photos, "--out", str(out), "--resolution", "32", "--batch", "2",
            "--rank", "4", "--lr", "5e-3", "--save-every", "2", "--no-progress", "--random-flip", *extra]


def _torch_images(family, lora_dir=None, weight_name="pytorch_lora_weights.safetensors"):
    pipe = P.torch_pipeline(family)
    if lora_dir:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    latents = P.initial_latents(family, 1, 32, 32, seed=9)
    kw = {"max_sequence_length": P.T5_LEN} if family == "flux" else {}
    with torch.no_grad():
        return pipe(["a red cat"], height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                    latents=torch.from_numpy(latents), output_type="np", **kw).images


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_trains_checkpoints_validates_and_writes_a_lora_diffusers_loads(tmp_path, photos, family, capsys):
    out = tmp_path / "run"
    assert train_lora.main(_args(P.pipeline_dir(family), photos, out, "--steps", "4", "--validation-prompt",
                                 "a red cat", "--validate-every", "4", "--validation-steps", "2")) == 0
    log = capsys.readouterr().out
    assert "loss first" in log
    names = set(os.listdir(out))
    assert {"pytorch_lora_weights.safetensors", "cache.safetensors", "checkpoints", "validation"} <= names
    assert training_steps(out) == [2, 4]
    assert (out / "validation" / "000004.png").exists()
    tensors, header = load_file(out / "pytorch_lora_weights.safetensors")
    denoiser = "transformer" if family == "flux" else "unet"
    assert all(k.startswith(denoiser + ".") for k in tensors) and "lora_adapter_metadata" in header
    base, tuned = _torch_images(family), _torch_images(family, out)
    assert np.abs(tuned - base).max() > 1e-3  # the trained LoRA changes diffusers' images


def training_steps(out):
    from jlora import training

    return training.committed_steps(out / "checkpoints")


def test_resume_equals_an_uninterrupted_run_and_kohya_export_matches(tmp_path, photos):
    """A run stopped at step 2 and resumed to 4 (writing kohya keys) gives diffusers the images of an
    uninterrupted run's diffusers-format file, and jlora the same deltas."""
    model = P.pipeline_dir("sd")
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--accumulate", "2", "--warmup", "1")
    assert train_lora.main(_args(model, photos, straight, "--steps", "4", *common)) == 0
    assert train_lora.main(_args(model, photos, split, "--steps", "2", *common)) == 0
    assert train_lora.main(_args(model, photos, split, "--steps", "4", *common, "--resume", "--format", "kohya")) == 0
    keys = load_file(split / "lora_kohya.safetensors")[0]
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    params = jlora.pipelines.load_pipeline(model).params
    params = {c: params[c] for c in ("unet", "text_encoder")}
    a = jlora.load_lora_weights(straight, params)
    b = jlora.load_lora_weights(split / "lora_kohya.safetensors", params)
    for c in a:
        for x, y in zip(jax.tree.leaves(jlora.delta(b[c])), jax.tree.leaves(jlora.delta(a[c]))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    want = _torch_images("sd", straight)
    got = _torch_images("sd", split, "lora_kohya.safetensors")
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(want - _torch_images("sd")).max() > 1e-3


def test_bad_input(tmp_path, photos, capsys):
    model = P.pipeline_dir("sd")
    assert train_lora.main(_args(model, str(tmp_path / "none"), tmp_path / "o", "--steps", "1")) == 2
    assert train_lora.main(_args(model, photos, tmp_path / "o", "--steps", "1", "--resolution", "30")) == 2
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(nocap / "x.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(nocap / "y.png")
    assert train_lora.main(_args(model, str(nocap), tmp_path / "o", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert "x.png" in err and "Traceback" not in err
    assert train_lora.main(_args(model, str(nocap), tmp_path / "o2", "--steps", "1", "--instance-prompt", "sks")) == 0


def _torch_grads(model, placed):
    """{flax path: (a, b)} gradients of a PEFT-wrapped torch model's LoRA factors, in Flax layout."""
    from test_training import _torch_factors

    return _torch_factors(model, placed, attr="grad")


def _exact_geglu_as_tanh(unet):
    """diffusers' Flax GEGLU uses the tanh GELU where the torch one uses the exact GELU (a port difference);
    with this the torch reference computes the Flax UNet's function (see tests/test_training.py)."""
    import types

    from diffusers.models.activations import GEGLU

    for m in unet.modules():
        if isinstance(m, GEGLU):
            m.gelu = types.MethodType(lambda self, g: torch.nn.functional.gelu(g, approximate="tanh"), m)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoder_lora_loss_and_gradients_match_the_dreambooth_scripts(tmp_path, family):
    """`train_dreambooth_lora.py` / `train_dreambooth_lora_sdxl.py --train_text_encoder`: the CLIP encoders
    with their LoRAs run inside the loss (SD: last hidden state; SDXL: both encoders' penultimate hidden
    states concatenated, pooled from the second's projection). Reference: diffusers' torch pipeline with
    the same adapters loaded by `load_lora_weights`, the scripts' loss lines, torch autograd."""
    from diffusers import DDPMScheduler

    import jax
    import jax.numpy as jnp

    from jlora import data, objectives
    from jlora.pipelines import load_pipeline

    pipe = load_pipeline(P.pipeline_dir(family))
    args = train_lora.parse_args(["--model", "m", "--data", "d", "--out", "o", "--train-text-encoder"])
    key = jax.random.key(1)
    adapter = {"unet": jlora.init_adapter(pipe.params["unet"], key, rank=4, alpha=8,
                                          targets=train_lora.DEFAULT_TARGETS[family], b_std=0.05)}
    for i, name in enumerate(pipe.encoder_names):
        adapter[name] = jlora.init_adapter(pipe.params[name], jax.random.fold_in(key, i + 1), rank=4, alpha=8,
                                           targets=train_lora.TEXT_ENCODER_TARGETS, b_std=0.05)
    path = jlora.save_lora_weights(tmp_path, adapter)

    prompts = ["a red cat", "a photo of the blue dog riding a horse"]
    ids = pipe.token_ids(prompts)
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    timesteps = np.array([77, 901], np.int32)
    time_ids = data.sdxl_time_ids(np.array([[40, 48], [32, 36]]), np.array([[0, 4], [2, 0]]), 32)

    tp = P.torch_pipeline(family)
    tp.load_lora_weights(str(tmp_path), weight_name=os.path.basename(path), adapter_name="default")
    encoders = [tp.text_encoder] + ([tp.text_encoder_2] if family == "sdxl" else [])
    _exact_geglu_as_tanh(tp.unet)
    for m in [tp.unet, *encoders]:
        for n, prm in m.named_parameters():
            prm.requires_grad_(".lora_" in n)
    if family == "sd":
        context_t = encoders[0](torch.from_numpy(ids[0]))[0]
        added = None
    else:
        hidden, pooled_t = [], None
        for enc, i in zip(encoders, ids):
            out = enc(torch.from_numpy(i), output_hidden_states=True)
            pooled_t = out[0]
            hidden.append(out.hidden_states[-2])
        context_t = torch.cat(hidden, dim=-1)
        added = {"text_embeds": pooled_t, "time_ids": torch.from_numpy(np.asarray(time_ids))}
    sched = DDPMScheduler.from_config(tp.scheduler.config)
    x0, eps, t = torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(timesteps).long()
    pred = tp.unet(sched.add_noise(x0, eps, t), t, context_t, added_cond_kwargs=added).sample
    loss_t = torch.nn.functional.mse_loss(pred.float(), eps.float(), reduction="mean")
    loss_t.backward()

    batch = {"latents": latents, "noise": noise, "timesteps": timesteps, "context": np.zeros((2, 1, 1), np.float32),
             "pooled": np.zeros((2, 1), np.float32), "time_ids": np.asarray(time_ids)}
    batch.update({f"ids{i}": v for i, v in enumerate(ids)})
    batch = {k: jnp.asarray(v) for k, v in batch.items()}  # as the script's sharded batches
    loss_fn = train_lora.make_loss(pipe, args, objectives.alphas_cumprod(pipe.scheduler_config))
    params = {k: pipe.params[k] for k in adapter}
    value, grads = jax.jit(jax.value_and_grad(lambda a: loss_fn(jlora.apply(params, a), batch)))(adapter)
    np.testing.assert_allclose(float(value), float(loss_t.detach()), rtol=1e-4)
    for name, torch_model in [("unet", tp.unet)] + list(zip(pipe.encoder_names, encoders)):
        _, report = jlora.load_lora(path, pipe.params[name], name, return_report=True)
        for n, prm in torch_model.named_parameters():  # unused by the loss (SDXL: encoder 1's last layer)
            if ".lora_" in n and prm.grad is None:
                prm.grad = torch.zeros_like(prm)
        want = _torch_grads(torch_model, report.placed)
        assert want, name
        d2 = n2 = 0.0
        for leaf_path, (a_t, b_t) in want.items():
            node = grads[name]
            for k in leaf_path.split("/"):
                node = node[k]
            d = np.concatenate([(np.asarray(node.a) - a_t).ravel(), (np.asarray(node.b) - b_t).ravel()])
            g = np.concatenate([a_t.ravel(), b_t.ravel()])
            d2, n2 = d2 + float(d @ d), n2 + float(g @ g)
        assert n2 > 1e-12 and np.sqrt(d2) <= 1e-4 * np.sqrt(n2), (name, np.sqrt(d2 / n2))


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_train_text_encoder_writes_encoder_loras_that_diffusers_loads(tmp_path, photos, family):
    """`--train-text-encoder` adds text-encoder LoRAs to the file (Flux: CLIP only); diffusers' pipeline
    loads them and its prompt embeddings change."""
    out = tmp_path / "run"
    assert train_lora.main(_args(P.pipeline_dir(family), photos, out, "--steps", "2", "--train-text-encoder",
                                 "--text-encoder-lr", "1e-2")) == 0
    tensors, _ = load_file(out / "pytorch_lora_weights.safetensors")
    prefixes = {k.split(".", 1)[0] for k in tensors}
    assert prefixes == {P.DENOISER[family], "text_encoder"}
    tp = P.torch_pipeline(family)
    kw = {"prompt_2": None} if family == "flux" else {"device": "cpu", "num_images_per_prompt": 1,
                                                      "do_classifier_free_guidance": False}
    with torch.no_grad():
        before = tp.encode_prompt("a red cat", **kw)
        tp.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        after = tp.encode_prompt("a red cat", **kw)
    changed = before[1] if family == "flux" else before[0]  # Flux: CLIP's pooled embedding
    new = after[1] if family == "flux" else after[0]
    assert float((new - changed).abs().max()) > 1e-4


def test_model_axis_equals_one_device(tmp_path, photos):
    """`--model-parallel 4` (8 devices: data 2 x model 4; kernels, factors and AdamW moments split over
    `model`, UNet and text encoder) trains the same LoRA as one device (batch 2 does not split over 8)."""
    model = P.pipeline_dir("sd")
    runs = {}
    for mp in (1, 4):
        out = tmp_path / f"mp{mp}"
        assert train_lora.main(_args(model, photos, out, "--steps", "3", "--train-text-encoder",
                                     "--model-parallel", str(mp))) == 0
        runs[mp] = load_file(out / "pytorch_lora_weights.safetensors")[0]
    assert runs[1].keys() == runs[4].keys()
    # Sharded reductions sum in another order; where a gradient is near AdamW's eps a step (about
    # lr = 5e-3) carries that rounding: atol is 0.2% of one step (as tests/test_distributed_training.py).
    for k in runs[1]:
        np.testing.assert_allclose(runs[4][k], runs[1][k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert train_lora.main(_args(model, photos, tmp_path / "bad", "--steps", "1", "--model-parallel", "3")) == 2
