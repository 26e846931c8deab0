"""scripts/generate.py: LoRA batch generation on jlora's Flax Flux, data parallel over the 8 devices."""

import os
import sys

import jax
import numpy as np

import jlora
from converters.safetensors_io import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import generate  # noqa: E402


def _lora(path, params, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(2):
        for m in ("attn.to_q", "attn.to_v", "ff.net.0.proj"):
            n_out = 128 if m.startswith("ff") else 32
            out[f"transformer.transformer_blocks.{i}.{m}.lora_A.weight"] = rng.standard_normal((4, 32)).astype(np.float32)
            out[f"transformer.transformer_blocks.{i}.{m}.lora_B.weight"] = (rng.standard_normal((n_out, 4)) * 0.5).astype(np.float32)
    save_file(out, path)
    return path


def test_generate_with_two_loras(tmp_path, capsys):
    _, _, params = generate.load_transformer(None, 0)
    a, b = _lora(str(tmp_path / "a.safetensors"), params, 1), _lora(str(tmp_path / "b.safetensors"), params, 2)
    common = ["--batch", "8", "--steps", "3", "--height", "4", "--width", "4"]
    assert generate.main(common + ["--out", str(tmp_path / "base.npy")]) == 0
    assert generate.main(common + ["--lora", a, "--lora", b, "--weights", "0.7", "0.4", "--scale", "0.9",
                                   "--out", str(tmp_path / "lora.npy")]) == 0
    out = capsys.readouterr().out
    assert "8 cpu devices" in out and "2 LoRA(s)" in out
    applied_vs_fused = float(out.split("max |applied - fused| latents")[1].split()[0])
    base, lora = np.load(tmp_path / "base.npy"), np.load(tmp_path / "lora.npy")
    assert base.shape == lora.shape == (8, 16, 16) and np.isfinite(lora).all()
    assert np.abs(lora - base).max() > 0.05  # the LoRAs change the result
    assert applied_vs_fused < 1e-3 * np.abs(lora - base).max()

    # the combined adapter equals applying the two weighted LoRAs one after the other
    la = jlora.load_lora_weights(a, {"transformer": params})["transformer"]
    lb = jlora.load_lora_weights(b, {"transformer": params})["transformer"]
    both = jlora.apply(params, jlora.combine([la, lb], [0.7, 0.4]), 0.9)
    seq = jlora.apply(jlora.apply(params, la, 0.9 * 0.7), lb, 0.9 * 0.4)
    for x, y in zip(jax.tree.leaves(both), jax.tree.leaves(seq)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
