"""Naming schemes: detection, inverses, and a user-registered scheme (the README example)."""

import re

import jax
import numpy as np
import pytest

import jlora
import reference as R
from converters import get_scheme, naming_schemes
from converters.naming import NamingScheme, detect_scheme, register_naming_scheme

RENAMES = {".to_q": ".query", ".to_k": ".key", ".to_v": ".value", ".to_out.0": ".proj_attn"}
base = get_scheme("diffusers_flax")


def to_path(module):
    for torch_name, flax_name in RENAMES.items():
        if module.endswith(torch_name):
            module = module[: -len(torch_name)] + flax_name
    return base.to_path(module)


def to_module(path):
    module = base.to_module(path)
    for torch_name, flax_name in RENAMES.items():
        if module.endswith(flax_name):
            module = module[: -len(flax_name)] + torch_name
    return module


def _rename_tree(tree):
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
    if isinstance(tree, dict):
        return {names.get(k, k): _rename_tree(v) for k, v in tree.items()}
    return tree


@pytest.mark.parametrize(
    "module,path",
    [
        ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0", "down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0"),
        ("time_embedding.linear_1", "time_embedding/linear_1"),
        ("add_embedding.linear_2", "add_embedding/linear_2"),
        ("mid_block.resnets.1.conv_shortcut", "mid_block/resnets_1/conv_shortcut"),
        ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "up_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj"),
    ],
)
def test_diffusers_flax_names_both_ways(module, path):
    assert "/".join(base.to_path(module)) == path
    assert base.to_module(tuple(path.split("/"))) == module


def test_every_unet_and_clip_kernel_inverts():
    """Every kernel path of the real Flax trees maps to a torch module of the real torch model."""
    for ref in (R.build_sd15_unet(), R.build_sdxl_unet(), R.build_clip_text_proj()):
        flat = jax.tree_util.tree_flatten_with_path(ref.flax_params)[0]
        paths = [tuple(str(k.key) for k in kp) for kp, _ in flat]
        scheme = detect_scheme(paths)
        assert scheme.name == ("torch_mirror" if ref.component.startswith("text") else "diffusers_flax")
        torch_modules = dict(ref.torch_model.named_modules())
        kernels = [p for p in paths if p[-1] == "kernel"]
        assert len(kernels) > 10
        for p in kernels:
            module = scheme.to_module(p[:-1])
            assert module in torch_modules, (p, module)
            assert scheme.to_path(module) == p[:-1]


def test_registered_scheme_readme_example(tmp_path):
    ref = R.build_sd15_unet()
    path = R.make_peft_lora_file(tmp_path, [ref], pipeline="sd")
    register_naming_scheme(NamingScheme(name="qkv_names", to_path=to_path, to_module=to_module))
    assert "qkv_names" in naming_schemes()
    renamed = _rename_tree(ref.flax_params)
    adapters = jlora.load_lora_weights(path, {"unet": renamed}, schemes={"unet": "qkv_names"})
    default = jlora.load_lora(path, ref.flax_params, "unet")
    assert jlora.count(adapters["unet"]) == jlora.count(default)
    got = jax.tree.leaves(_rename_tree(jlora.apply(ref.flax_params, default, 0.5)))
    want = jax.tree.leaves(jlora.apply(renamed, adapters["unet"], 0.5))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    # and back: saving with the scheme writes the original diffusers keys
    saved = jlora.save_lora_weights(tmp_path / "s", adapters, schemes={"unet": "qkv_names"})
    assert sorted(jlora.lora_state_dict(saved)) == sorted(jlora.lora_state_dict(path))
    # without the scheme, the renamed modules cannot be placed, and the error names one
    with pytest.raises(jlora.errors.KeyMismatchError, match=re.escape("to_q")):
        jlora.load_lora_weights(path, {"unet": renamed})


def test_a_scheme_registered_again_is_used_on_the_same_params_at_once(tmp_path):
    """Module tables are kept per params tree and scheme; registering a scheme name again takes effect on the
    next load onto the same tree."""
    from converters import naming

    ref = R.build_sd15_unet()
    path = R.make_peft_lora_file(tmp_path, [ref], pipeline="sd")
    renamed = _rename_tree(ref.flax_params)
    try:
        register_naming_scheme(NamingScheme(name="renamed_later", to_path=base.to_path, to_module=base.to_module))
        with pytest.raises(jlora.errors.KeyMismatchError, match=re.escape("to_q")):
            jlora.load_lora(path, renamed, "unet", scheme="renamed_later")
        register_naming_scheme(NamingScheme(name="renamed_later", to_path=to_path, to_module=to_module))
        adapter = jlora.load_lora(path, renamed, "unet", scheme="renamed_later")
        assert jlora.count(adapter) == jlora.count(jlora.load_lora(path, ref.flax_params, "unet")) > 0
    finally:
        naming._SCHEMES.pop("renamed_later", None)


def test_trees_of_one_structure_and_other_shapes_get_their_own_index():
    """Leaf paths are kept per tree structure; shapes and dtypes are read from each tree."""
    small = {"down": {"kernel": jax.ShapeDtypeStruct((4, 8), np.float32)}}
    large = {"down": {"kernel": jax.ShapeDtypeStruct((16, 32), np.float16)}}
    assert jlora.loading.shape_index(small) == {("down", "kernel"): ((4, 8), np.dtype(np.float32))}
    assert jlora.loading.shape_index(large) == {("down", "kernel"): ((16, 32), np.dtype(np.float16))}
