"""Bad input raises a typed `JloraError` that names the file, key and shapes, and changes nothing.

Every case goes through the public loaders with the tiny SD-1.5 UNet / CLIP models and a
PEFT LoRA file written by diffusers (tests/reference.py). Each test also checks that the
caller's params trees and state dicts are the same objects with the same keys and values.
"""

import re

import jax
import numpy as np
import pytest
import safetensors.numpy

import jlora
import reference as R
from jlora import errors
from untouched import untouched

ATTN_KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _save(path, tensors, metadata=None):
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return str(path)


def _modules(keys, component):
    return {k.split(".lora_")[0] for k in keys if k.startswith(component + ".") and ".lora_" in k}


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def sd_tensors(sd_file):
    """(tensors, header) of the SD LoRA read with the safetensors library."""
    return R.read_lora_file(sd_file)


@pytest.fixture
def params(unet, clip):
    return {"unet": unet.flax_params, "text_encoder": clip.flax_params}


# --------------------------------------------------------------------------------------------
# 1. missing file
# --------------------------------------------------------------------------------------------


def test_missing_file_is_lora_file_not_found(tmp_path, params):
    path = str(tmp_path / "nowhere" / "style.safetensors")
    with untouched(params), pytest.raises(errors.LoraFileNotFoundError) as e:
        jlora.load_lora_weights(path, params, family="sd")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, jlora.JloraError)
    assert path in str(e.value)
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        jlora.lora_state_dict(path)


# --------------------------------------------------------------------------------------------
# 2. not a LoRA
# --------------------------------------------------------------------------------------------


def test_base_weights_are_not_a_lora(tmp_path, unet, params):
    flat = jax.tree_util.tree_flatten_with_path(unet.flax_params)[0]
    weights = {".".join(jlora.loading.path_of(kp)): np.asarray(x) for kp, x in flat}
    path = _save(tmp_path / "unet_base.safetensors", weights)
    with untouched(params), pytest.raises(errors.UnsupportedFormatError) as e:
        jlora.load_lora_weights(path, params, family="sd")
    assert path in str(e.value)
    with pytest.raises(errors.UnsupportedFormatError, match=re.escape(path)):
        jlora.load_lora(path, unet.flax_params, "unet")


def test_file_without_tensors_is_unsupported(tmp_path, params):
    path = _save(tmp_path / "empty.safetensors", {}, {"lora_adapter_metadata": "{}"})
    with untouched(params), pytest.raises(errors.UnsupportedFormatError, match=re.escape(path)):
        jlora.load_lora_weights(path, params)


# --------------------------------------------------------------------------------------------
# 3. other architecture, wrong shapes
# --------------------------------------------------------------------------------------------


def test_sd15_lora_on_sdxl_unet(sd_file):
    sdxl = R.build_sdxl_unet()
    with untouched(sdxl.flax_params), pytest.raises((errors.ShapeMismatchError, errors.KeyMismatchError)) as e:
        jlora.load_lora(sd_file, sdxl.flax_params, "unet")
    msg = str(e.value)
    assert sd_file in msg
    assert re.search(r"unet\.(down|mid|up)_blocks?\.[\w.]+\.lora_[AB]\.weight", msg), msg


def test_wrong_out_size_is_shape_mismatch(tmp_path, sd_tensors, params):
    tensors, header = sd_tensors
    up_key = ATTN_KEY + ".lora_B.weight"
    down = tensors[ATTN_KEY + ".lora_A.weight"]
    up = tensors[up_key]
    bad_up = np.concatenate([up, up[:3]], axis=0)
    path = _save(tmp_path / "bad_shape.safetensors", {**tensors, up_key: bad_up}, header)
    with untouched(params), pytest.raises(errors.ShapeMismatchError) as e:
        jlora.load_lora_weights(path, params, family="sd")
    msg = str(e.value)
    kernel = (down.shape[1], up.shape[0])  # Flax Dense kernel (in, out) of to_k
    assert ATTN_KEY + ".lora_" in msg, msg
    assert str(tuple(bad_up.shape)) in msg and str(kernel) in msg, msg


def test_wrong_in_size_of_conv_is_shape_mismatch(tmp_path, sd_tensors, params):
    tensors, header = sd_tensors
    key = "unet.down_blocks.0.resnets.0.conv1.lora_A.weight"
    down = tensors[key]
    assert down.ndim == 4, down.shape
    bad = np.concatenate([down, down[:, :5]], axis=1)
    path = _save(tmp_path / "bad_conv.safetensors", {**tensors, key: bad}, header)
    with untouched(params), pytest.raises(errors.ShapeMismatchError) as e:
        jlora.load_lora_weights(path, params)
    msg = str(e.value)
    assert "unet.down_blocks.0.resnets.0.conv1.lora_" in msg and str(tuple(bad.shape)) in msg, msg


# --------------------------------------------------------------------------------------------
# 4. unknown keys, strict and not
# --------------------------------------------------------------------------------------------

UNKNOWN = {
    "no_such_module": {
        "unet.not_a_block.lora_A.weight": np.ones((4, 32), np.float32),
        "unet.not_a_block.lora_B.weight": np.ones((32, 4), np.float32),
    },
    "no_rule_reads_it": {"unet.foo.hada_w1_a": np.ones((32, 4), np.float32)},
}


@pytest.fixture(scope="module")
def unknown_files(tmp_path_factory, sd_tensors):
    tensors, header = sd_tensors
    d = tmp_path_factory.mktemp("unknown")
    return {name: _save(d / f"{name}.safetensors", {**tensors, **extra}, header) for name, extra in UNKNOWN.items()}


@pytest.mark.parametrize("case", sorted(UNKNOWN))
def test_unknown_key_strict_raises(unknown_files, params, case):
    key = sorted(UNKNOWN[case])[0]
    with untouched(params), pytest.raises(errors.KeyMismatchError) as e:
        jlora.load_lora_weights(unknown_files[case], params, family="sd")
    msg = str(e.value)
    assert key in msg and "strict=False" in msg and unknown_files[case] in msg, msg
    # only the unknown keys are listed as problems
    assert len(re.findall(r"^  unet\.", msg, flags=re.M)) == len(UNKNOWN[case]), msg


@pytest.mark.parametrize("case", sorted(UNKNOWN))
def test_unknown_key_lenient_warns_and_loads_the_rest(unknown_files, sd_file, sd_tensors, params, case):
    tensors, _ = sd_tensors
    with untouched(params), pytest.warns(UserWarning, match=re.escape(sorted(UNKNOWN[case])[0])):
        adapters, report = jlora.load_lora_weights(
            unknown_files[case], params, family="sd", strict=False, return_report=True
        )
    leftovers = set(report.unmatched) | set(report.unplaced)
    assert leftovers == set(UNKNOWN[case])
    assert sorted(report.loaded_keys) == sorted(tensors)
    for component in ("unet", "text_encoder"):
        assert jlora.count(adapters[component]) == len(_modules(tensors, component)) > 0
    clean = jlora.load_lora_weights(sd_file, params, family="sd")
    got = jax.tree_util.tree_leaves(adapters, is_leaf=jlora.is_adapter_leaf)
    want = jax.tree_util.tree_leaves(clean, is_leaf=jlora.is_adapter_leaf)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            for x, y in ((g.a, w.a), (g.b, w.b), (g.alpha, w.alpha)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# 5. corrupt file
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["4 bytes", "half header", "all but 100 bytes"])
def test_truncated_file_is_corrupt(tmp_path, sd_file, params, keep):
    with open(sd_file, "rb") as f:
        raw = f.read()
    n_header = int.from_bytes(raw[:8], "little")
    cut = {"4 bytes": 4, "half header": 8 + n_header // 2, "all but 100 bytes": len(raw) - 100}[keep]
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(raw[:cut])
    with untouched(params), pytest.raises(errors.CorruptFileError) as e:
        jlora.load_lora_weights(str(path), params, family="sd")
    assert str(path) in str(e.value)
    with pytest.raises(errors.CorruptFileError, match=re.escape(str(path))):
        jlora.lora_state_dict(str(path))


# --------------------------------------------------------------------------------------------
# 6. inconsistent modules (state dict input, which must not be mutated either)
# --------------------------------------------------------------------------------------------


def test_rank_mismatch_names_both_keys(sd_tensors, params):
    tensors, _ = sd_tensors
    sd = dict(tensors)
    a_key, b_key = ATTN_KEY + ".lora_A.weight", ATTN_KEY + ".lora_B.weight"
    sd[a_key] = np.concatenate([sd[a_key], sd[a_key][:2]], axis=0)  # rank 6 against lora_B's 4
    with untouched(params, sd), pytest.raises(errors.InvalidAdapterError) as e:
        jlora.load_lora_weights(sd, params, family="sd")
    msg = str(e.value)
    assert a_key in msg and b_key in msg, msg
    assert str(tuple(sd[a_key].shape)) in msg and str(tuple(sd[b_key].shape)) in msg, msg


def test_down_without_up_is_invalid(sd_tensors, params):
    tensors, _ = sd_tensors
    sd = {k: v for k, v in tensors.items() if k != ATTN_KEY + ".lora_B.weight"}
    with untouched(params, sd), pytest.raises(errors.InvalidAdapterError) as e:
        jlora.load_lora_weights(sd, params, family="sd")
    msg = str(e.value)
    assert ATTN_KEY in msg and ATTN_KEY + ".lora_A.weight" in msg and "up" in msg, msg


def test_alpha_of_wrong_shape_is_invalid(sd_tensors, params):
    tensors, _ = sd_tensors
    alpha_key = ATTN_KEY + ".alpha"
    sd = {**tensors, alpha_key: np.array([8.0, 8.0], np.float32)}
    with untouched(params, sd), pytest.raises(errors.InvalidAdapterError) as e:
        jlora.load_lora_weights(sd, params, family="sd")
    msg = str(e.value)
    assert alpha_key in msg and "(2,)" in msg, msg


def test_text_encoder_only_file_onto_unet_only(tmp_path, sd_tensors, unet):
    tensors, header = sd_tensors
    te_only = {k: v for k, v in tensors.items() if k.startswith("text_encoder.")}
    assert te_only and len(te_only) < len(tensors)
    path = _save(tmp_path / "te_only.safetensors", te_only, header)
    params = {"unet": unet.flax_params}
    with untouched(params), pytest.raises(errors.KeyMismatchError) as e:
        jlora.load_lora_weights(path, params, family="sd")
    msg = str(e.value)
    assert path in msg and "'text_encoder'" in msg and "'unet'" in msg, msg


# --------------------------------------------------------------------------------------------
# 7. adapters on the params of another model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_adapters(sd_file, unet, clip):
    return jlora.load_lora_weights(sd_file, {"unet": unet.flax_params, "text_encoder": clip.flax_params}, family="sd")


@pytest.mark.parametrize("op", [jlora.apply, jlora.fuse, jlora.unfuse])
def test_adapter_on_another_models_params(sd_adapters, unet, clip, op):
    sdxl = R.build_sdxl_unet()
    with untouched(sdxl.flax_params, clip.flax_params):
        with pytest.raises(errors.InvalidAdapterError, match="structure"):
            op(sdxl.flax_params, sd_adapters["unet"])
        with pytest.raises(errors.InvalidAdapterError, match="structure"):
            op(clip.flax_params, sd_adapters["unet"])
        with pytest.raises(errors.InvalidAdapterError):
            op(unet.flax_params, sd_adapters["text_encoder"])


def test_adapter_on_same_tree_with_other_sizes(sd_adapters, unet):
    """Same tree structure, but one adapted kernel is wider (a bigger model of the same layout)."""
    path = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2", "to_k", "kernel")
    flat = {jlora.loading.path_of(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(unet.flax_params)[0]}
    kernel = flat[path]
    wider = np.zeros(kernel.shape[:-1] + (kernel.shape[-1] + 8,), np.float32)

    def swap(kp, x):
        return wider if jlora.loading.path_of(kp) == path else x

    other = jax.tree_util.tree_map_with_path(swap, unet.flax_params)
    with untouched(other, unet.flax_params), pytest.raises(errors.InvalidAdapterError) as e:
        jlora.apply(other, sd_adapters["unet"])
    assert str(tuple(kernel.shape)) in str(e.value) and str(wider.shape) in str(e.value)


# --------------------------------------------------------------------------------------------
# 8. wrong family / component names
# --------------------------------------------------------------------------------------------


def test_unknown_family(sd_file, params):
    with untouched(params), pytest.raises(jlora.JloraError, match="sd2"):
        jlora.load_lora_weights(sd_file, params, family="sd2")


def test_component_not_in_family(sd_file, unet, clip):
    params = {"unet": unet.flax_params, "text_encoder_3": clip.flax_params}
    with untouched(params), pytest.raises(jlora.JloraError, match="text_encoder_3"):
        jlora.load_lora_weights(sd_file, params, family="sd")


def test_component_named_wrong_without_family(sd_file, unet):
    params = {"unets": unet.flax_params}
    with untouched(params), pytest.raises(errors.KeyMismatchError) as e:
        jlora.load_lora_weights(sd_file, params)
    assert "'unet'" in str(e.value) and "'unets'" in str(e.value)
    with untouched(params), pytest.raises(errors.KeyMismatchError, match="unets"):
        jlora.load_lora(sd_file, unet.flax_params, "unets")


def test_params_must_be_a_dict_of_components(sd_file, unet):
    with pytest.raises(jlora.JloraError, match="unet"):
        jlora.load_lora_weights(sd_file, {}, family="sd")
    with pytest.raises(jlora.JloraError):
        jlora.load_lora_weights(sd_file, [unet.flax_params], family="sd")


def test_every_error_is_a_jlora_error():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), jlora.JloraError), name
