"""save_lora_weights writes a diffusers/PEFT file that diffusers loads with the original's outputs."""

import json
import os

import jax

import numpy as np
import pytest

import jlora
from jlora import errors
import reference as R
from test_parity import PATTERNS, PIPELINES


@pytest.mark.parametrize("pipeline", ["sd", "sdxl", "sdxl-patterns"])
def test_round_trip_through_diffusers(tmp_path, pipeline):
    family = pipeline.split("-")[0]
    refs = [R.ALL_BUILDERS[n]() for n in PIPELINES[family]]
    kwargs = PATTERNS if pipeline.endswith("patterns") else {}
    original = R.make_peft_lora_file(tmp_path / "orig", refs, rank=4, alpha=8, pipeline=family, seed=2, **kwargs)
    adapters = jlora.load_lora_weights(original, {r.component: r.flax_params for r in refs}, family=family)
    saved = jlora.save_lora_weights(tmp_path / "saved", adapters)

    orig_sd, _ = R.read_lora_file(original)
    saved_sd, header = R.read_lora_file(saved)
    assert sorted(saved_sd) == sorted(orig_sd), "same diffusers/PEFT keys as the file diffusers wrote"
    for k, v in orig_sd.items():
        np.testing.assert_array_equal(saved_sd[k], v)
    meta = json.loads(header["lora_adapter_metadata"])
    for r in refs:
        assert meta[f"{r.component}.r"] == 4 and meta[f"{r.component}.lora_alpha"] == 8

    for ref in refs:
        want = R.torch_forward(R.torch_model_with_lora(ref, original), ref, scale=0.7)
        got = R.torch_forward(R.torch_model_with_lora(ref, saved), ref, scale=0.7)
        effect = np.abs(want - R.torch_forward(ref.torch_model, ref)).max()
        assert effect > 0.1
        assert np.abs(got - want).max() <= 1e-6 * max(1.0, np.abs(want).max()), ref.name


def test_saved_factors_reload_identically(tmp_path):
    ref = R.build_sd15_unet()
    path = R.make_peft_lora_file(tmp_path / "o", [ref], pipeline="sd", **PATTERNS)
    adapter = jlora.load_lora(path, ref.flax_params, "unet")
    again = jlora.load_lora(jlora.save_lora_weights(tmp_path / "s", {"unet": adapter}), ref.flax_params, "unet")

    for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_fp16_and_nothing_to_save(tmp_path):
    ref = R.build_clip_text()
    path = R.make_peft_lora_file(tmp_path / "o", [ref], pipeline="sd")
    adapter = jlora.load_lora(path, ref.flax_params, "text_encoder")
    saved = jlora.save_lora_weights(tmp_path / "s", {"text_encoder": adapter}, dtype=np.float16)
    sd, _ = R.read_lora_file(saved)
    assert {v.dtype for v in sd.values()} == {np.dtype(np.float16)}
    empty = jax.tree.map(lambda _: None, ref.flax_params)
    with pytest.raises(jlora.JloraError, match="nothing to save"):
        jlora.save_lora_weights(tmp_path / "e", {"text_encoder": empty})


def test_concurrent_saves_of_one_file_never_mix_and_leave_no_temporary_files(tmp_path):
    """Processes saving different adapters to the same path: every read-back is one whole adapter
    (unique temporary names, then os.replace), and no temporary file stays behind."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"""
import sys, numpy as np
sys.path.insert(0, {root!r})
from converters.safetensors_io import save_file
v = float(sys.argv[1])
for _ in range(30):
    save_file({{"a": np.full((64, 64), v, np.float32), "b": np.full((64,), v, np.float32)}}, {str(tmp_path / 'x.safetensors')!r})
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(v)]) for v in (1.0, 2.0, 3.0, 4.0)]
    from converters.safetensors_io import load_file

    seen = set()
    while any(p.poll() is None for p in procs):
        if (tmp_path / "x.safetensors").exists():
            try:
                tensors, _ = load_file(tmp_path / "x.safetensors")
            except errors.CorruptFileError as e:  # replaced between the name lookup and the open: said so
                assert "replaced while it was being opened" in str(e)
                continue
            values = {float(v) for t in tensors.values() for v in np.unique(t)}
            assert len(values) == 1, values  # one writer's whole file, never a mix
            seen |= values
    assert all(p.returncode == 0 for p in procs)
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    from converters.safetensors_io import save_file

    with pytest.raises(errors.InvalidAdapterError, match="no safetensors name"):
        save_file({"a": np.ones(3, np.complex64)}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []
