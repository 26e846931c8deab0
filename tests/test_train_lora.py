"""scripts/train_lora.py on tiny saved SD and SDXL pipelines and a folder of images with captions.

References: the objective's parity with diffusers' scripts is tests/test_objectives.py; here the
written LoRA must load in diffusers' torch pipeline (and change its images), a resumed run must
equal an uninterrupted one, and the kohya export must give diffusers the same images as the
diffusers export.
"""

import json
import os
import sys

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
    model = P.pipeline_dir("sd")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_lora.main(_args(model, photos, straight, "--steps", "4", "--accumulate", "2", "--warmup", "1")) == 0
    assert train_lora.main(_args(model, photos, split, "--steps", "2", "--accumulate", "2", "--warmup", "1")) == 0
    assert train_lora.main(_args(model, photos, split, "--steps", "4", "--accumulate", "2", "--warmup", "1",
                                 "--resume")) == 0
    a, _ = load_file(straight / "pytorch_lora_weights.safetensors")
    b, _ = load_file(split / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)

    assert train_lora.main(_args(model, photos, tmp_path / "kohya", "--steps", "4", "--accumulate", "2", "--warmup",
                                 "1", "--format", "kohya")) == 0
    keys = load_file(tmp_path / "kohya" / "lora_kohya.safetensors")[0]
    assert all(k.startswith("lora_unet_") for k in keys)
    want = _torch_images("sd", straight)
    got = _torch_images("sd", tmp_path / "kohya", "lora_kohya.safetensors")
    assert np.abs(got - want).max() <= 1e-4


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
