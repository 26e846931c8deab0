"""`save_lora_weights(..., format="kohya")`: kohya / A1111 files that diffusers and LyCORIS load to the same outputs.

Reference: LyCORIS's kohya loader, and diffusers' own kohya readers (`StableDiffusion(XL)LoraLoaderMixin.lora_state_dict` and
`FluxPipeline.lora_state_dict`, which convert `lora_unet_` / `lora_te_` keys) loading the written file
into the torch models; their forwards must equal the torch forward of the original PEFT LoRA.
"""

import os

import numpy as np
import pytest
import torch

import jax
import jlora
import reference as R
from converters.safetensors_io import load_file


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_file_loads_in_diffusers_to_the_same_outputs(tmp_path, family):
    unet = R.build_sd15_unet() if family == "sd" else R.build_sdxl_unet()
    refs = [unet, R.build_clip_text()] + ([R.build_clip_text_proj()] if family == "sdxl" else [])
    peft = R.make_peft_lora_file(tmp_path / "peft", refs, rank=4, alpha=8, pipeline=family)
    adapters = jlora.load_lora_weights(peft, {r.component: r.flax_params for r in refs})
    path = jlora.save_lora_weights(tmp_path / "kohya", adapters, weight_name="style.safetensors", format="kohya")
    tensors, header = load_file(path)
    prefixes = {k.split("_", 2)[1] if not k.startswith("lora_unet") else "unet" for k in tensors}
    assert prefixes == ({"unet", "te"} if family == "sd" else {"unet", "te1", "te2"})
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    for ref in refs:
        want = R.torch_forward(R.torch_model_with_lora(ref, peft, pipeline=family), ref, scale=0.8)
        got = R.torch_forward(R.torch_model_with_lora(ref, path, pipeline=family), ref, scale=0.8)
        effect = np.abs(want - R.torch_forward(ref.torch_model, ref)).max()
        assert effect > 1e-2
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, effect), ref.component
    again = jlora.load_lora_weights(path, {r.component: r.flax_params for r in refs})
    for c in adapters:
        for x, y in zip(jax.tree.leaves(jlora.delta(again[c])), jax.tree.leaves(jlora.delta(adapters[c]))):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_kohya_file_loads_in_lycoris_to_the_same_outputs(tmp_path, monkeypatch):
    """Reference: LyCORIS 4.1.3's own loader (`lycoris.kohya.create_network_from_weights`) reading the kohya
    file jlora wrote onto fresh torch models, run at multiplier s; it must equal the torch forward of the
    original PEFT LoRA at scale s (the `.alpha` of every module honoured)."""
    os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")
    kohya = pytest.importorskip("lycoris.kohya", reason="lycoris-lora (test extra) is the reference")
    import copy

    unet, te = R.build_sd15_unet(), R.build_clip_text()
    peft = R.make_peft_lora_file(tmp_path / "peft", [unet, te], rank=4, alpha=8, pipeline="sd")
    adapters = jlora.load_lora_weights(peft, {r.component: r.flax_params for r in (unet, te)})
    path = jlora.save_lora_weights(tmp_path / "kohya", adapters, format="kohya")
    models = {r.component: copy.deepcopy(r.torch_model) for r in (unet, te)}
    K = kohya.LycorisNetworkKohya  # the loader first builds its class's preset network: make that one empty
    for attr in ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
                 "TEXT_ENCODER_TARGET_REPLACE_NAME"):
        monkeypatch.setattr(K, attr, [])
    net, _ = kohya.create_network_from_weights(1.0, path, None, models[te.component], models[unet.component])
    net.apply_to(models[te.component], models[unet.component], True, True)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == sum(map(jlora.count, adapters.values()))
    for ref in (unet, te):
        for scale in (1.0, 0.6):
            want = R.torch_forward(R.torch_model_with_lora(ref, peft, pipeline="sd"), ref, scale=scale)
            net.set_multiplier(scale)
            got = R.torch_forward(models[ref.component], ref)
            effect = np.abs(want - R.torch_forward(ref.torch_model, ref)).max()
            assert effect > 1e-2
            assert np.abs(got - want).max() <= 1e-4 * max(1.0, effect), (ref.component, scale)


def test_flux_kohya_file_in_bfl_names_loads_in_diffusers(tmp_path):
    """The double blocks' fused q|k|v (image and text streams). Two limits of diffusers 0.35.2's kohya-Flux
    reader keep the rest out of this comparison: it splits `single_blocks.N.linear1` with Flux.1's widths
    written in (3072 x 3 + 12288), which a tiny model does not have; and it bakes the alphas into the
    factors and drops them, so a file whose converted modules have different ranks (a fused q|k|v of rank 3r
    next to a plain rank-r module) gets diffusers' known rank/alpha mis-scaling (see TESTING.md). jlora's own
    reload of the whole file is checked above for SD/SDXL and here for every module."""
    import test_flux_model as F
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from jlora.models import flux

    torch_model = F._build(True)
    base = {k: v.clone() for k, v in torch_model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)")
    torch_model.add_adapter(config)
    with torch.no_grad():
        for n, p in torch_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn_like(p))
    FluxPipeline.save_lora_weights(tmp_path / "peft", transformer_lora_layers=get_peft_model_state_dict(torch_model),
                                   transformer_lora_adapter_metadata=config.to_dict())
    inputs = F._inputs(True)
    want = F._torch_forward(torch_model, inputs)

    _, params = flux.from_diffusers(base, dict(torch_model.config))
    adapter = jlora.load_lora_weights(tmp_path / "peft", {"transformer": params}, family="flux")["transformer"]
    path = jlora.save_lora_weights(tmp_path / "kohya", {"transformer": adapter}, format="kohya")
    keys = load_file(path)[0]
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys)
    assert any(k.startswith("lora_unet_double_blocks_1_txt_attn_qkv.") for k in keys)

    plain = F._build(True)
    sd = FluxPipeline.lora_state_dict(os.path.dirname(path), weight_name=os.path.basename(path))
    sd = sd[0] if isinstance(sd, tuple) else sd
    FluxPipeline.load_lora_into_transformer(sd, None, plain)
    got = F._torch_forward(plain, inputs)
    effect = np.abs(want - F._torch_forward(F._build(True), inputs)).max()
    assert effect > 1e-2
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, effect)
    again = jlora.load_lora_weights(path, {"transformer": params}, family="flux")["transformer"]
    for x, y in zip(jax.tree.leaves(jlora.delta(again)), jax.tree.leaves(jlora.delta(adapter))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
