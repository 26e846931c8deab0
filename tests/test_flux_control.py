"""Flux Control LoRAs: the image input widened with zero rows, q/k norm weights replaced, LoRA biases.

Reference: diffusers' own Flux pipeline loader (`FluxLoraLoaderMixin.load_lora_weights`, which
expands `x_embedder`, loads the norm weights and the LoRA) on the tiny torch Flux, forward with
the control latents concatenated to the image latents. diffusers' BFL-layout converter hard-codes
Flux.1's 19/38 blocks and 3072 width, so the BFL-named file is checked to give exactly the adapters
of the diffusers-named file, which is the one compared with diffusers.
"""

import copy
import os

import jax
import numpy as np
import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin

import jlora
from converters.safetensors_io import save_file
from jlora.models import flux
from test_flux_model import _build, _inputs, _jax_args

D, HD, IN, WIDE, R = 32, 16, 16, 32, 4


class _Pipe(FluxLoraLoaderMixin):
    """The smallest object diffusers' pipeline loader works on."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.text_encoder = None
        self.hf_device_map = None
        self.components = {"transformer": transformer}


def _files(tmp_path, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    x_a, x_b, x_bias = f(R, WIDE), f(D, R), f(D)
    p_a, p_b = f(R, D), f(D, R)
    q_scale, k_scale, sq_scale = 1 + f(HD), 1 + f(HD), 1 + f(HD)
    diffusers_sd = {
        "transformer.x_embedder.lora_A.weight": x_a,
        "transformer.x_embedder.lora_B.weight": x_b,
        "transformer.x_embedder.lora_B.bias": x_bias,
        "transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight": p_a,
        "transformer.transformer_blocks.1.attn.to_out.0.lora_B.weight": p_b,
        "transformer.transformer_blocks.0.attn.norm_q.weight": q_scale,
        "transformer.transformer_blocks.0.attn.norm_added_k.weight": k_scale,
        "transformer.single_transformer_blocks.1.attn.norm_q.weight": sq_scale,
    }
    bfl_sd = {
        "img_in.lora_A.weight": x_a,
        "img_in.lora_B.weight": x_b,
        "img_in.lora_B.bias": x_bias,
        "double_blocks.1.img_attn.proj.lora_A.weight": p_a,
        "double_blocks.1.img_attn.proj.lora_B.weight": p_b,
        "double_blocks.0.img_attn.norm.query_norm.scale": q_scale,
        "double_blocks.0.txt_attn.norm.key_norm.scale": k_scale,
        "single_blocks.1.norm.query_norm.scale": sq_scale,
    }
    paths = str(tmp_path / "control_diffusers.safetensors"), str(tmp_path / "control_bfl.safetensors")
    save_file(diffusers_sd, paths[0])
    save_file(bfl_sd, paths[1])
    return paths


@pytest.fixture(scope="module")
def base():
    model = _build(True)
    apply_fn, params = flux.from_diffusers(model.state_dict(), dict(model.config))
    return model, jax.jit(apply_fn), params


def test_control_lora_matches_diffusers_pipeline_loader(base, tmp_path):
    model, apply_fn, params = base
    diffusers_file, bfl_file = _files(tmp_path)
    with pytest.raises(jlora.errors.ShapeMismatchError, match="expand_input_channels"):
        jlora.load_lora_weights(diffusers_file, {"transformer": params}, family="flux")
    wide = flux.expand_input_channels(params, WIDE)
    adapters, report = jlora.load_lora_weights(diffusers_file, {"transformer": wide}, family="flux", return_report=True)
    assert not report.unmatched and not report.unplaced
    assert {p.leaf for p in report.placed} == {"lora", "diff", "set"}

    reference = copy.deepcopy(model)
    _Pipe(reference).load_lora_weights(os.path.dirname(diffusers_file), weight_name=os.path.basename(diffusers_file),
                                        low_cpu_mem_usage=False)
    assert reference.x_embedder.in_features == WIDE
    inputs = _inputs(True)
    control = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(4))
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], control], dim=-1)
    args = _jax_args(inputs)
    step = jax.jit(lambda p, a, s: apply_fn(jlora.apply(p, a, s), **args))
    for s in (1.0, 0.5):
        with torch.no_grad():
            want = reference(**inputs, joint_attention_kwargs={"scale": s}).sample.numpy()
        got = np.asarray(step(wide, adapters["transformer"], s))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (s, np.abs(got - want).max())
    # the control input matters, and without the LoRA the widened model ignores it
    without = np.asarray(apply_fn(wide, **args))
    with torch.no_grad():
        base_out = model(**_inputs(True)).sample.numpy()
    np.testing.assert_allclose(without, base_out, rtol=1e-4, atol=1e-4)
    # the original params were never touched: going back is using them
    assert params["img_in"]["kernel"].shape[0] == IN


def test_bfl_control_file_gives_the_same_adapters(base, tmp_path):
    _, _, params = base
    diffusers_file, bfl_file = _files(tmp_path, seed=1)
    wide = flux.expand_input_channels(params, WIDE)
    a = jlora.load_lora_weights(diffusers_file, {"transformer": wide})["transformer"]
    b, report = jlora.load_lora_weights(bfl_file, {"transformer": wide}, return_report=True)
    assert report.format == "bfl_flux"
    b = b["transformer"]
    assert jax.tree.structure(a, is_leaf=jlora.is_adapter_leaf) == jax.tree.structure(b, is_leaf=jlora.is_adapter_leaf)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
