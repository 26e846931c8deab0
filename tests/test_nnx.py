"""Adapters on flax.nnx state (integer path keys, Variables) against PEFT in PyTorch."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

import jlora
from converters.safetensors_io import save_file


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(8, 16)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x):
        return x + self.proj(torch.tanh(self.to_q(x)))


class TorchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TorchBlock() for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class Block(nnx.Module):
    def __init__(self, rngs):
        self.to_q = nnx.Linear(8, 16, rngs=rngs)
        self.proj = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.proj(jnp.tanh(self.to_q(x)))


class Model(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(3)])

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _port(torch_model):
    model = Model(nnx.Rngs(0))
    for tb, b in zip(torch_model.blocks, model.blocks):
        for name in ("to_q", "proj"):
            layer, tl = getattr(b, name), getattr(tb, name)
            layer.kernel.value = jnp.asarray(tl.weight.detach().numpy().T)
            layer.bias.value = jnp.asarray(tl.bias.detach().numpy())
    return model


def test_nnx_state_matches_peft(tmp_path):
    torch.manual_seed(0)
    base = TorchModel().eval()
    model = _port(base)
    lora = TorchModel().eval()
    lora.load_state_dict(base.state_dict())
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "proj"], init_lora_weights=False)
    lora = inject_adapter_in_model(config, lora)
    sd = {f"transformer.{k}": v.detach().numpy() for k, v in get_peft_model_state_dict(lora).items()}
    meta = {f"transformer.{k}": v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
    path = str(tmp_path / "lora.safetensors")
    save_file(sd, path, {"lora_adapter_metadata": json.dumps(meta)})

    graphdef, state = nnx.split(model)
    adapter = jlora.load_lora_weights(path, {"transformer": state})["transformer"]
    assert jlora.count(adapter) == 6
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    step = jax.jit(lambda st, a, s, x: nnx.merge(graphdef, jlora.apply(st, a, s))(x))
    with torch.no_grad():
        want = lora(torch.from_numpy(x)).numpy()
        plain = base(torch.from_numpy(x)).numpy()
    got = np.asarray(step(state, adapter, 1.0, x))
    effect = np.abs(want - plain).max()
    assert effect > 0.1
    assert np.abs(got - want).max() <= 1e-4 * effect + 1e-6
    np.testing.assert_allclose(np.asarray(step(state, adapter, 0.0, x)), plain, atol=1e-5)
    # and back to the same diffusers/PEFT keys
    saved = jlora.save_lora_weights(tmp_path / "out", {"transformer": adapter})
    assert sorted(jlora.lora_state_dict(saved)) == sorted(sd)
