"""LoRA and full diffs on Conv3d weights (video DiT patch embeddings), against PEFT in PyTorch."""

import json

import jax
import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

import jlora
from converters.safetensors_io import save_file


class Patchify(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embedding = torch.nn.Conv3d(4, 8, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj = torch.nn.Linear(8, 8)


def _flax(model):
    """The torch weights in Flax layout (Conv3d OIDHW -> DHWIO, Linear (out, in) -> (in, out))."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return {
        "patch_embedding": {"kernel": sd["patch_embedding.weight"].transpose(2, 3, 4, 1, 0), "bias": sd["patch_embedding.bias"]},
        "proj": {"kernel": sd["proj.weight"].T, "bias": sd["proj.bias"]},
    }


def test_conv3d_lora_fuses_like_peft(tmp_path):
    torch.manual_seed(0)
    base = Patchify()
    params = jax.tree.map(np.asarray, _flax(base))
    lora = Patchify()
    lora.load_state_dict(base.state_dict())
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["patch_embedding", "proj"], init_lora_weights=False)
    lora = inject_adapter_in_model(config, lora)
    sd = {f"transformer.{k}": v.detach().numpy() for k, v in get_peft_model_state_dict(lora).items()}
    assert sd["transformer.patch_embedding.lora_A.weight"].ndim == 5
    meta = {"transformer.r": 3, "transformer.lora_alpha": 5}
    path = str(tmp_path / "lora.safetensors")
    save_file(sd, path, {"lora_adapter_metadata": json.dumps(meta)})

    adapter = jlora.load_lora_weights(path, {"transformer": params})["transformer"]
    assert jlora.count(adapter) == 2
    fused = jlora.fuse(params, adapter, 0.7)
    for module in lora.modules():
        if hasattr(module, "scale_layer"):
            module.scale_layer(0.7)
            module.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in lora.state_dict().items() if "lora_" not in k}
    want = _flax_from(merged)
    for key in ("patch_embedding", "proj"):
        got, ref = np.asarray(fused[key]["kernel"]), want[key]["kernel"]
        assert np.abs(got - np.asarray(params[key]["kernel"])).max() > 1e-2  # the LoRA changes it
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    saved = jlora.save_lora_weights(tmp_path / "out", {"transformer": adapter})
    back = jlora.lora_state_dict(saved)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v)


def _flax_from(state_dict):
    sd = {k: v.detach().numpy() for k, v in state_dict.items()}
    return {
        "patch_embedding": {"kernel": sd["patch_embedding.weight"].transpose(2, 3, 4, 1, 0)},
        "proj": {"kernel": sd["proj.weight"].T},
    }
