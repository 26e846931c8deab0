"""jlora's runtime path (load, apply, fuse, save) imports no torch, diffusers, transformers or peft."""

import subprocess
import sys
import textwrap


def test_runtime_imports_no_torch(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        import jax, jax.numpy as jnp
        import jlora
        params = {{"blocks_0": {{"to_q": {{"kernel": jnp.ones((8, 16))}}, "conv": {{"kernel": jnp.ones((3, 3, 4, 8))}}}}}}
        adapter = jlora.init_adapter(params, jax.random.key(0), rank=2, b_std=0.1)
        path = jlora.save_lora_weights({str(tmp_path)!r}, {{"unet": adapter}})
        loaded = jlora.load_lora_weights(path, {{"unet": params}})["unet"]
        fused = jlora.fuse(params, loaded, 0.5)
        assert jlora.count(loaded) == 2
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout
