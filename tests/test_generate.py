"""scripts/generate.py on tiny saved pipelines: PNGs, sidecars, contact sheet, reruns, bad input.

Reference for the pixels: diffusers' torch pipeline from the same folder, given the initial latents
the script draws for each request's seed (`jlora.pipelines.common.seeded_normal`).
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

import pipelines_ref as P
from jlora.pipelines import common, images

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import generate  # noqa: E402

SIZE, STEPS = 32, 3


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def _args(model, prompts, out, *extra):
    return ["--model", model, "--prompts", prompts, "--out", str(out), "--steps", str(STEPS), "--no-progress", *extra]


def _torch_image(family, prompt, seed, lora=None, scale=1.0, guidance=5.0):
    pipe = P.torch_pipeline(family)
    latents = common.seeded_normal([seed], (4, SIZE // 2, SIZE // 2))
    kw = {}
    if lora:
        pipe.load_lora_weights(os.path.dirname(lora), weight_name=os.path.basename(lora))
        kw["cross_attention_kwargs"] = {"scale": scale}
    with torch.no_grad():
        out = pipe([prompt], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance,
                   latents=torch.from_numpy(latents), output_type="np", **kw).images[0]
    return common.to_uint8(out[None])[0]


def test_sdxl_prompts_file_to_pngs_with_per_prompt_loras(tmp_path, capsys):
    model, lora = P.pipeline_dir("sdxl"), P.lora_file("sdxl")
    prompts = _write(tmp_path / "prompts.jsonl", [
        {"prompt": "a photo of a cat", "seed": 7, "width": SIZE, "height": SIZE, "guidance": 5.0},
        "# a comment",
        {"prompt": "a dog", "seed": 8, "width": SIZE, "height": SIZE, "guidance": 5.0,
         "loras": [{"path": lora, "weight": 0.8}], "lora_scale": 0.9},
    ])
    out = tmp_path / "images"
    assert generate.main(_args(model, prompts, out, "--batch", "2", "--fsdp", "2")) == 0
    log = capsys.readouterr().out
    assert "mesh data=4 x model=2" in log and "GiB per device" in log and "2 made" in log
    assert sorted(os.listdir(out)) == ["000001.json", "000001.png", "000003.json", "000003.png", "contact_sheet.png"]
    side = json.loads((out / "000003.json").read_text())
    assert side["request"]["loras"] == [{"path": lora, "weight": 0.8}] and side["request"]["lora_scale"] == 0.9
    assert side["model"] == os.path.abspath(model) and side["steps"] == STEPS and side["height"] == SIZE
    got = images.read_png(str(out / "000001.png"))
    assert got.shape == (SIZE, SIZE, 3)
    assert np.abs(got.astype(int) - _torch_image("sdxl", "a photo of a cat", 7).astype(int)).max() <= 2
    sheet = images.read_png(str(out / "contact_sheet.png"))
    assert sheet.shape[2] == 3 and sheet.shape[0] > SIZE

    # a rerun makes nothing again; a changed request is made again
    assert generate.main(_args(model, prompts, out)) == 0
    assert "0 made, 2 skipped" in capsys.readouterr().out
    _write(tmp_path / "prompts.jsonl", [
        {"prompt": "a photo of a cat", "seed": 9, "width": SIZE, "height": SIZE, "guidance": 5.0},
        "# a comment",
        {"prompt": "a dog", "seed": 8, "width": SIZE, "height": SIZE, "guidance": 5.0,
         "loras": [{"path": lora, "weight": 0.8}], "lora_scale": 0.9},
    ])
    assert generate.main(_args(model, prompts, out)) == 0
    assert "1 made, 1 skipped" in capsys.readouterr().out


def test_lora_image_matches_diffusers(tmp_path):
    model, lora = P.pipeline_dir("sd"), P.lora_file("sd")
    prompts = _write(tmp_path / "p.jsonl", [
        {"prompt": "a red cat", "seed": 3, "width": SIZE, "height": SIZE, "guidance": 6.0,
         "loras": [lora], "lora_scale": 0.6},
        {"prompt": "a red cat", "seed": 3, "width": SIZE, "height": SIZE, "guidance": 6.0},
    ])
    assert generate.main(_args(model, prompts, tmp_path / "o")) == 0
    with_lora = images.read_png(str(tmp_path / "o" / "000001.png")).astype(int)
    without = images.read_png(str(tmp_path / "o" / "000002.png")).astype(int)
    assert np.abs(without - _torch_image("sd", "a red cat", 3, guidance=6.0)).max() <= 2
    assert np.abs(with_lora - _torch_image("sd", "a red cat", 3, lora, 0.6, guidance=6.0)).max() <= 2
    assert np.abs(with_lora - without).max() > 20


def test_bad_input_is_reported_and_the_rest_still_runs(tmp_path, capsys, caplog):
    model = P.pipeline_dir("sd")
    flux_lora = P.lora_file("flux")
    prompts = _write(tmp_path / "p.jsonl", [
        {"prompt": "a cat", "seed": 1, "width": SIZE, "height": SIZE},
        "{not json",
        {"prompt": "a dog", "loras": [flux_lora], "width": SIZE, "height": SIZE},
        {"prompt": "a dog", "loras": [str(tmp_path / "missing.safetensors")], "width": SIZE, "height": SIZE},
        {"prompt": "x", "steps": "many"},
        {"prompt": " ".join(["a photo of the cat"] * 30), "width": SIZE, "height": SIZE},
    ])
    out = tmp_path / "o"
    with caplog.at_level("WARNING", logger="jlora.pipelines"):
        assert generate.main(_args(model, prompts, out)) == 1
    err = capsys.readouterr().err
    assert "p.jsonl:2: not a JSON object" in err
    assert "line 3: a LoRA of" in err and "does not load into this sd model" in err
    assert "line 4: LoRA file" in err and "does not exist" in err
    assert "p.jsonl:5: 'steps' must be an integer" in err
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["000001.png", "000006.png", "contact_sheet.png"]


@pytest.mark.parametrize("case", ["no-model", "single-file", "no-prompts", "bad-fsdp"])
def test_usage_errors_exit_2_without_traceback(tmp_path, capsys, case):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "a"}])
    model = P.pipeline_dir("sd")
    argv = {
        "no-model": _args(str(tmp_path / "nowhere"), prompts, tmp_path / "o"),
        "single-file": _args(P.lora_file("sd"), prompts, tmp_path / "o"),
        "no-prompts": _args(model, str(tmp_path / "none.jsonl"), tmp_path / "o"),
        "bad-fsdp": _args(model, prompts, tmp_path / "o", "--fsdp", "3"),
    }[case]
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
