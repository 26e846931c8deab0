"""The PyTorch reference itself: base parity between the torch models and their Flax ports, and
LoRA files that diffusers loads with a large, correctly scaled effect."""

import json

import numpy as np
import pytest

import reference as R


@pytest.mark.parametrize("name", sorted(R.ALL_BUILDERS))
def test_base_flax_matches_torch(name):
    ref = R.ALL_BUILDERS[name]()
    out_flax = R.flax_forward(ref, ref.flax_params)
    out_torch = R.torch_forward(ref.torch_model, ref)
    assert out_flax.shape == out_torch.shape
    assert np.abs(out_flax - out_torch).max() <= 1e-4 * max(1.0, np.abs(out_torch).max())


@pytest.mark.parametrize("name", ["clip_text", "clip_text_proj"])
def test_clip_penultimate_matches(name):
    ref = R.ALL_BUILDERS[name]()
    a = R.flax_forward(ref, ref.flax_params, output="penultimate")
    b = R.torch_forward(ref.torch_model, ref, output="penultimate")
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize(
    "pipeline,names",
    [("sd", ["sd15_unet", "clip_text"]), ("sdxl", ["sdxl_unet", "clip_text", "clip_text_proj"])],
)
def test_peft_file_load_and_fuse(tmp_path, pipeline, names):
    refs = [R.ALL_BUILDERS[n]() for n in names]
    path = R.make_peft_lora_file(tmp_path, refs, rank=4, alpha=8, pipeline=pipeline)
    sd, header = R.read_lora_file(path)
    meta = json.loads(header["lora_adapter_metadata"])
    for ref in refs:
        assert meta[f"{ref.component}.r"] == 4 and meta[f"{ref.component}.lora_alpha"] == 8
        assert any(k.startswith(ref.component + ".") for k in sd)
        model = R.torch_model_with_lora(ref, path)
        scalings = {s for m in model.modules() if hasattr(m, "scaling") for s in m.scaling.values()}
        assert scalings == {2.0}
        base = R.torch_forward(ref.torch_model, ref)
        with_lora = R.torch_forward(model, ref, scale=0.5)
        effect = np.abs(with_lora - base).max()
        assert effect >= 0.3 * np.abs(base).max()
        fused = R.torch_fused_flax_params(ref, path, scale=0.5)
        out = R.flax_forward(ref, fused)
        assert np.abs(out - with_lora).max() <= 1e-3 * effect


def test_rank_alpha_patterns(tmp_path):
    ref = R.build_sd15_unet()
    path = R.make_peft_lora_file(
        tmp_path, [ref], rank=4, alpha=8, rank_pattern={"to_q": 2, "conv1": 8}, alpha_pattern={"to_k": 3}
    )
    model = R.torch_model_with_lora(ref, path)
    seen = {}
    for name, m in model.named_modules():
        if hasattr(m, "scaling") and m.scaling:
            seen[name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0"] = (
                m.r["default"],
                m.scaling["default"],
            )
    assert seen["to_q"] == (2, 4.0) and seen["conv1"] == (8, 1.0)
    assert seen["to_k"] == (4, 0.75) and seen["to_v"] == (4, 2.0)


def test_mixed_rank_without_metadata_is_guarded(tmp_path):
    ref = R.build_clip_text()
    path = R.make_peft_lora_file(tmp_path, [ref], rank=4, rank_pattern={"fc1": 2}, with_metadata=False)
    with pytest.raises(ValueError, match="mis-scales"):
        R.torch_model_with_lora(ref, path)
    model = R.torch_model_with_lora(ref, path, fix_rank_alpha=True)
    assert {s for m in model.modules() if hasattr(m, "scaling") for s in m.scaling.values()} == {1.0}


def test_diffusers_key_style(tmp_path):
    unet, te = R.build_sd15_unet(), R.build_clip_text()
    path = R.make_peft_lora_file(
        tmp_path, [unet, te], key_style="diffusers", target_modules={"unet": R.ATTENTION_TARGET_MODULES}
    )
    sd, _ = R.read_lora_file(path)
    assert any(k.endswith("to_q.lora.down.weight") for k in sd)
    assert any(k.endswith("q_proj.lora_linear_layer.down.weight") for k in sd)
    for ref in (unet, te):
        model = R.torch_model_with_lora(ref, path)
        assert np.abs(R.torch_forward(model, ref) - R.torch_forward(ref.torch_model, ref)).max() > 0.1
