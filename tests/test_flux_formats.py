"""OneTrainer, XLabs, fal Kontext and ComfyUI / kohya Flux files (with CLIP-L and T5 keys) on jlora's Flax Flux.

References, per format:
  * Forward parity against diffusers' `FluxLoraLoaderMixin` (`lora_state_dict` + `load_lora_into_transformer`
    / `load_lora_into_text_encoder` on deep copies, forward with `joint_attention_kwargs={"scale": s}`), with
    the number of modules diffusers injected checked, for every layout diffusers 0.35.2 reads at this size.
  * Where it cannot, the format's own math: ΔW = s · alpha/r · up @ down, applied to the torch weights in
    diffusers' names (then a torch forward) or to the kernels in BFL layout (weight-level, like
    tests/test_flux_lora.py's `test_kohya_flux_fused_weights_equal_format_math`). Each test says which.

Files are written with the format's real key names from random factors; where the format has alphas
they differ from the rank.
"""

import copy
import os
import re

import jax
import numpy as np
import pytest
import torch
from diffusers.loaders import FluxLoraLoaderMixin
from peft.tuners.lora import LoraLayer

import jlora
import reference as R
from converters import detect_format
from converters.safetensors_io import save_file
from jlora.models import flux
from test_flux_lora import _check, _diffusers, _kohya_flux_file, _torch_out
from test_flux_model import _build, _inputs, _jax_args, _torch_forward

SCALES = (1.0, 0.6)


@pytest.fixture(scope="module")
def base():
    model = _build(True)
    apply_fn, params = flux.from_diffusers(model.state_dict(), dict(model.config))
    return model, jax.jit(apply_fn), params


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _pair(rng, n_in, n_out, rank):
    """Random (down, up) factors in PyTorch layout, large enough for a clear LoRA effect."""
    down = (rng.standard_normal((rank, n_in)) * 0.3).astype(np.float32)
    return down, (rng.standard_normal((n_out, rank)) * 0.3).astype(np.float32)


def _linears(module, under=""):
    """`{name: (in, out)}` of the torch Linear layers of `module` whose names start with `under`."""
    return {n: (m.in_features, m.out_features) for n, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(under)}


def _count(model) -> int:
    return sum(isinstance(m, LoraLayer) for m in model.modules())


def _diffusers_models(model, clip_ref, path, n_transformer, n_text):
    """Deep copies of the torch transformer and CLIP with the file loaded by diffusers; checks what it injected."""
    sd = FluxLoraLoaderMixin.lora_state_dict(os.path.dirname(path), weight_name=os.path.basename(path))
    transformer = copy.deepcopy(model)
    FluxLoraLoaderMixin.load_lora_into_transformer(dict(sd), None, transformer)
    assert _count(transformer) == n_transformer, "diffusers dropped transformer modules"
    text = copy.deepcopy(clip_ref.torch_model)
    FluxLoraLoaderMixin.load_lora_into_text_encoder(dict(sd), None, text, prefix="text_encoder")
    assert _count(text) == n_text, "diffusers dropped text encoder modules"
    return transformer, text


def _flux_parity(base, adapter, reference, scales=SCALES):
    """jlora's jitted Flax forward vs `reference(scale)` (a torch forward) on the same inputs."""
    model, apply_fn, params = base
    inputs = _inputs(True)
    base_out = _torch_forward(model, inputs)
    step = jax.jit(lambda p, a, s: apply_fn(jlora.apply(p, a, s), **_jax_args(inputs)))
    for s in scales:
        want = reference(s)
        effect = np.abs(want - base_out).max()
        assert effect > 0.3 * np.abs(base_out).max()
        got = np.asarray(step(params, adapter, s))
        assert np.abs(got - want).max() <= 1e-3 * effect, (s, np.abs(got - want).max(), effect)


def _clip_parity(clip_ref, adapter, reference_model, scales=SCALES):
    base_out = R.torch_forward(clip_ref.torch_model, clip_ref)
    for s in scales:
        want = R.torch_forward(reference_model, clip_ref, scale=s)
        effect = np.abs(want - base_out).max()
        assert effect > 0.3 * np.abs(base_out).max()
        got = R.flax_forward(clip_ref, jlora.apply(clip_ref.flax_params, adapter, s))
        assert np.abs(got - want).max() <= 1e-3 * effect, (s, np.abs(got - want).max(), effect)


def _patched_forward(model, deltas, inputs):
    """Reference by the format's math in diffusers' names: a torch forward with W += ΔW per module."""

    def run(s):
        patched = copy.deepcopy(model)
        with torch.no_grad():
            modules = dict(patched.named_modules())
            for name, delta in deltas.items():
                modules[name].weight += s * torch.from_numpy(delta)
        return _torch_forward(patched, inputs)

    return run


def _bfl_path(module):
    """(Flax path, stacked layer) of a BFL module: `double_blocks.1.img_mlp.0` -> (double_blocks, img_mlp_0), 1."""
    parts, layer, head = module.split("."), None, ()
    if parts[0] in ("double_blocks", "single_blocks"):
        head, layer, parts = (parts[0],), int(parts[1]), parts[2:]
    out = []
    for p in parts:
        if p.isdigit():
            out[-1] += "_" + p
        else:
            out.append(p)
    return head + tuple(out), layer


def _leaf(tree, path, name, layer):
    for k in path:
        tree = tree[k]
    x = np.asarray(tree[name])
    return x if layer is None else x[layer]


def _accounted(report, keys, skipped=()):
    """Every key was loaded, and only `skipped` ones went elsewhere (listed, never dropped)."""
    assert not report.unmatched and not report.unplaced, (report.unmatched, report.unplaced)
    assert set(report.skipped) == set(skipped)
    assert set(report.loaded_keys) | set(report.skipped) == set(keys)


def _same_adapters(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _clip_keys(out, rng, clip_ref, prefix, sep):
    """CLIP-L LoRA keys `prefix + text_model<sep>encoder<sep>layers<sep>i<sep>...` (q, k, v, out, fc1, fc2 of
    both layers) with alphas != rank; returns the number of modules."""
    linears = _linears(clip_ref.torch_model, "text_model.encoder.layers")
    assert len(linears) == 2 * 6
    for name, (n_in, n_out) in linears.items():
        key = prefix + name.replace(".", sep)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = _pair(rng, n_in, n_out, 4)
        out[f"{key}.alpha"] = np.float32(rng.choice([2.0, 6.0]))
    return len(linears)


def _t5_keys(out, rng, prefix, sep):
    """T5-XXL LoRA keys (no params for T5 here: they must be listed, not dropped)."""
    names = []
    for module in ("encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.1.DenseReluDense.wi_0"):
        key = prefix + module.replace(".", sep)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = _pair(rng, 64, 64, 4)
        out[f"{key}.alpha"] = np.float32(2.0)
        names += [f"{key}.lora_down.weight", f"{key}.lora_up.weight", f"{key}.alpha"]
    return names


# ----------------------------------------------------------------------------------------------
# detection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, name",
    [
        (["lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight",
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "onetrainer_flux"),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "kohya"),
        (["single_blocks.0.processor.qkv_lora.down.weight", "double_blocks.0.processor.proj_lora2.up.weight"], "xlabs_flux"),
        (["diffusion_model.double_blocks.0.processor.qkv_lora1.down.weight"], "xlabs_flux"),
        (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"], "diffusers_old"),
        (["base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight"], "fal_kontext"),
        (["base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "peft"),
        (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], "peft"),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], "comfy_flux"),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"], "comfy_flux"),
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "kohya_flux"),
    ],
)
def test_each_layout_is_detected_as_one_format(keys, name):
    assert detect_format(keys).name == name


# ----------------------------------------------------------------------------------------------
# OneTrainer
# ----------------------------------------------------------------------------------------------

_ONETRAINER_DIFFUSERS_READS = (
    r"transformer_blocks\.\d\.attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)",
    r"single_transformer_blocks\.\d\.attn\.to_[qkv]",
    r"x_embedder|context_embedder|time_text_embed\..*|norm_out\.linear|proj_out",
)


def _onetrainer_file(path, model, modules, rng, ranks=(4,), clip_ref=None, t5=False):
    """`lora_transformer_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (+ lora_te1_ / lora_te2_)."""
    out, deltas, t5_keys = {}, {}, []
    linears = _linears(model)
    for name in modules:
        n_in, n_out = linears[name]
        rank, alpha = int(rng.choice(ranks)), float(rng.choice([1.0, 3.0, 8.0]))
        key = "lora_transformer_" + name.replace(".", "_")
        down, up = _pair(rng, n_in, n_out, rank)
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"], out[f"{key}.alpha"] = down, up, np.float32(alpha)
        deltas[name] = alpha / rank * up @ down
    n_text = _clip_keys(out, rng, clip_ref, "lora_te1_", "_") if clip_ref is not None else 0
    if t5:
        t5_keys = _t5_keys(out, rng, "lora_te2_", "_")
    save_file(out, path)
    return out, deltas, n_text, t5_keys


def test_onetrainer_flux_matches_diffusers(base, clip, tmp_path):
    """Forward parity with diffusers on every module its OneTrainer ("mixture") converter maps: attention,
    embedders, norm_out, proj_out, and CLIP-L `lora_te1_` keys. Uniform rank, alphas 1/3/8 != 4."""

    model, _, params = base
    wanted = [n for n in _linears(model) if any(re.fullmatch(p, n) for p in _ONETRAINER_DIFFUSERS_READS)]
    assert len(wanted) == 2 * 8 + 2 * 3 + 10
    path = str(tmp_path / "onetrainer.safetensors")
    sd, _, n_text, _ = _onetrainer_file(path, model, wanted, np.random.default_rng(11), clip_ref=clip)
    adapters, report = jlora.load_lora_weights(
        path, {"transformer": params, "text_encoder": clip.flax_params}, family="flux", return_report=True
    )
    assert report.format == "onetrainer_flux"
    _accounted(report, sd)
    assert report.counts() == {"transformer": len(wanted), "text_encoder": n_text}
    transformer, text = _diffusers_models(model, clip, path, len(wanted), n_text)
    _flux_parity(base, adapters["transformer"], lambda s: _torch_out(transformer, _inputs(True), s))
    _clip_parity(clip, adapters["text_encoder"], text)
    forced = jlora.load_lora_weights(path, {"transformer": params, "text_encoder": clip.flax_params}, format="onetrainer_flux")
    _same_adapters(forced, adapters)


def test_onetrainer_flux_every_linear_matches_format_math(base, tmp_path):
    """Every Linear of the transformer (ranks 4 and 8, alphas != rank) against the format's math in
    diffusers' names, ΔW = alpha/r · up @ down added to the torch weights, then a torch forward.
    diffusers 0.35.2 cannot be the reference here: its OneTrainer converter names ff / norm1 / proj_mlp /
    single-block proj_out and norm.linear LoRAs after the whole block (`transformer_blocks.0`), which PEFT
    rejects. T5 `lora_te2_` keys are skipped and listed (no text_encoder_2 params given)."""
    model, _, params = base
    names = list(_linears(model))
    assert len(names) == 2 * 14 + 2 * 6 + 10
    path = str(tmp_path / "onetrainer_all.safetensors")
    sd, deltas, _, t5_keys = _onetrainer_file(path, model, names, np.random.default_rng(12), ranks=(4, 8), t5=True)
    adapters, report = jlora.load_lora_weights(path, {"transformer": params}, family="flux", return_report=True)
    _accounted(report, sd, skipped=t5_keys)
    assert set(report.skipped.values()) == {"text_encoder_2"}
    assert report.counts() == {"transformer": len(names)}
    _flux_parity(base, adapters["transformer"], _patched_forward(model, deltas, _inputs(True)))


# ----------------------------------------------------------------------------------------------
# XLabs
# ----------------------------------------------------------------------------------------------


def _xlabs_file(path, prefix, rng, ranks=(4, 4)):
    """XLabs attention-processor LoRAs (`down` / `up`, no alpha) on both double and single blocks."""
    D, M = 32, 128
    out = {}
    shapes = {"qkv_lora1": (D, 3 * D), "qkv_lora2": (D, 3 * D), "proj_lora1": (D, D), "proj_lora2": (D, D)}
    for i in range(2):
        for name, (n_in, n_out) in shapes.items():
            key = f"{prefix}double_blocks.{i}.processor.{name}"
            out[f"{key}.down.weight"], out[f"{key}.up.weight"] = _pair(rng, n_in, n_out, ranks[0])
        for name, (n_in, n_out) in {"qkv_lora": (D, 3 * D), "proj_lora": (D + M, D)}.items():
            key = f"{prefix}single_blocks.{i}.processor.{name}"
            out[f"{key}.down.weight"], out[f"{key}.up.weight"] = _pair(rng, n_in, n_out, ranks[1])
    save_file(out, path)
    return out


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_flux_matches_diffusers(base, tmp_path, prefix):
    """Forward parity with diffusers (all 24 split modules injected), uniform rank (no alphas: scale 1)."""
    model, _, params = base
    path = str(tmp_path / "xlabs.safetensors")
    sd = _xlabs_file(path, prefix, np.random.default_rng(21))
    assert _count(_diffusers(model, path)) == 2 * 8 + 2 * 4
    adapter, report = _check(base, path)
    assert report.format == "xlabs_flux"
    _accounted(report, sd)
    assert report.counts() == {"transformer": 24}
    assert sum(p.module.endswith("attn.add_k_proj") for p in report.placed) == 2
    forced = jlora.load_lora_weights(path, {"transformer": params}, format="xlabs_flux")["transformer"]
    _same_adapters(forced, adapter)
    with pytest.raises(jlora.errors.UnsupportedFormatError):
        jlora.load_lora_weights(path, {"transformer": params}, format="kohya_flux")


def test_xlabs_flux_fused_weights_equal_format_math(base, tmp_path):
    """Reference: the format's math in BFL layout, kernel += s · up @ down (no alpha, any rank) on the fused
    qkv / proj / linear2 kernels; a single block's qkv LoRA touches only the q|k|v columns of linear1."""
    _, _, params = base
    path = str(tmp_path / "xlabs_ranks.safetensors")
    sd = _xlabs_file(path, "", np.random.default_rng(22), ranks=(4, 8))
    adapter = jlora.load_lora_weights(path, {"transformer": params}, family="flux")["transformer"]
    fused = jlora.fuse(params, adapter, 0.7)
    targets = {
        "double_blocks.{i}.processor.qkv_lora1": (("double_blocks", "img_attn", "qkv"), None),
        "double_blocks.{i}.processor.qkv_lora2": (("double_blocks", "txt_attn", "qkv"), None),
        "double_blocks.{i}.processor.proj_lora1": (("double_blocks", "img_attn", "proj"), None),
        "double_blocks.{i}.processor.proj_lora2": (("double_blocks", "txt_attn", "proj"), None),
        "single_blocks.{i}.processor.qkv_lora": (("single_blocks", "linear1"), 96),
        "single_blocks.{i}.processor.proj_lora": (("single_blocks", "linear2"), None),
    }
    for key, (path_, cols) in targets.items():
        for i in range(2):
            k = key.format(i=i)
            delta = 0.7 * (sd[f"{k}.up.weight"] @ sd[f"{k}.down.weight"]).T
            before, after = _leaf(params, path_, "kernel", i), _leaf(fused, path_, "kernel", i)
            want = before.copy()
            want[:, : cols or want.shape[1]] += delta
            np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------
# fal Kontext
# ----------------------------------------------------------------------------------------------

_FAL_MODULES = (
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1",
    *(f"double_blocks.{i}.{m}" for i in range(2) for m in (
        "img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
        "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")),
    *(f"single_blocks.{i}.{m}" for i in range(2) for m in ("linear1", "linear2", "modulation.lin")),
)
_FAL_BIASED = ("img_in", "final_layer.adaLN_modulation.1", "double_blocks.1.img_attn.qkv", "single_blocks.0.linear1")


def test_fal_kontext_fused_weights_equal_format_math(base, tmp_path):
    """Reference: the format's math in BFL layout (weight-level): kernel += s · up @ down and, with
    `lora_B.bias`, bias += s · lora_B.bias (no alphas: scale 1; ranks 2, 4, 8). diffusers 0.35.2 cannot be
    the reference: its fal-Kontext converter hard-codes Flux.1's 19/38 blocks and 3072 width (KeyError on a
    2-block model) and has no mapping for final_layer.adaLN_modulation, img_in, txt_in, time_in, vector_in
    or guidance_in (it raises on them at any size)."""
    model, _, params = base
    rng = np.random.default_rng(31)
    sd = {}
    for module in _FAL_MODULES:
        path_, layer = _bfl_path(module)
        n_in, n_out = _leaf(params, path_, "kernel", layer).shape
        key = f"base_model.model.{module}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = _pair(rng, n_in, n_out, int(rng.choice([2, 4, 8])))
        if module in _FAL_BIASED:
            sd[f"{key}.lora_B.bias"] = (rng.standard_normal(n_out) * 0.3).astype(np.float32)
    path = str(tmp_path / "kontext.safetensors")
    save_file(sd, path)
    with pytest.raises(KeyError):  # what the docstring says of diffusers at this size
        FluxLoraLoaderMixin.lora_state_dict(str(tmp_path), weight_name="kontext.safetensors")

    adapters, report = jlora.load_lora_weights(path, {"transformer": params}, family="flux", return_report=True)
    adapter = adapters["transformer"]
    assert report.format == "fal_kontext"
    _accounted(report, sd)
    pieces = {m: 3 if m.endswith("qkv") else 4 if m.endswith("linear1") else 1 for m in _FAL_MODULES}
    leaves = [p.leaf for p in report.placed]  # one LoRA per diffusers module, one bias delta per biased one
    assert leaves.count("lora") == sum(pieces.values()) == 50
    assert leaves.count("diff") == sum(pieces[m] for m in _FAL_BIASED) == 9
    _same_adapters(jlora.load_lora_weights(path, {"transformer": params}, format="fal_kontext")["transformer"], adapter)

    s = 0.7
    fused = jlora.fuse(params, adapter, s)
    for module in _FAL_MODULES:
        path_, layer = _bfl_path(module)
        key = f"base_model.model.{module}"
        want = _leaf(params, path_, "kernel", layer) + s * (sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]).T
        np.testing.assert_allclose(_leaf(fused, path_, "kernel", layer), want, rtol=1e-5, atol=1e-6, err_msg=module)
        bias = _leaf(params, path_, "bias", layer) + (s * sd[f"{key}.lora_B.bias"] if module in _FAL_BIASED else 0)
        np.testing.assert_allclose(_leaf(fused, path_, "bias", layer), bias, rtol=1e-5, atol=1e-6, err_msg=module)


# ----------------------------------------------------------------------------------------------
# ComfyUI and kohya Flux with text encoders
# ----------------------------------------------------------------------------------------------


_COMFY_MODULES = tuple(
    [f"double_blocks.{i}.{m}" for i in range(2) for m in (
        "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
        "txt_mlp.2", "img_mod.lin", "txt_mod.lin")]
    + [f"single_blocks.{i}.{m}" for i in range(2) for m in ("linear2", "modulation.lin")]
)


def test_comfy_flux_with_clip_and_t5_matches_diffusers(base, clip, tmp_path):
    """Forward parity with diffusers for a ComfyUI-saved Flux file: `diffusion_model.` double / single
    block modules (without linear1, which diffusers splits with Flux.1's full-size dims), CLIP-L keys
    `text_encoders.clip_l.transformer.text_model...` into a transformers-Flax CLIP, and T5 keys, which
    jlora lists as skipped (diffusers drops them with an info log). The same file with `lora_A` / `lora_B`
    suffixes (which diffusers does not read as ComfyUI) gives identical adapters."""
    model, _, params = base
    rng = np.random.default_rng(41)
    sd = {}
    for module in _COMFY_MODULES:
        path_, layer = _bfl_path(module)
        n_in, n_out = _leaf(params, path_, "kernel", layer).shape
        key = f"diffusion_model.{module}"
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = _pair(rng, n_in, n_out, 4)
        sd[f"{key}.alpha"] = np.float32(rng.choice([2.0, 6.0]))
    n_text = _clip_keys(sd, rng, clip, "text_encoders.clip_l.transformer.", ".")
    t5_keys = _t5_keys(sd, rng, "text_encoders.t5xxl.transformer.", ".")
    path = str(tmp_path / "comfy.safetensors")
    save_file(sd, path)

    targets = {"transformer": params, "text_encoder": clip.flax_params}
    adapters, report = jlora.load_lora_weights(path, targets, family="flux", return_report=True)
    assert report.format == "comfy_flux"
    _accounted(report, sd, skipped=t5_keys)
    n_transformer = 2 * (3 + 3 + 8) + 2 * 2  # per double block: two qkv split in 3, eight more; two per single block
    assert report.counts() == {"transformer": n_transformer, "text_encoder": n_text}
    transformer, text = _diffusers_models(model, clip, path, n_transformer, n_text)
    _flux_parity(base, adapters["transformer"], lambda s: _torch_out(transformer, _inputs(True), s))
    _clip_parity(clip, adapters["text_encoder"], text)

    renamed = {k.replace("lora_down.weight", "lora_A.weight").replace("lora_up.weight", "lora_B.weight"): v for k, v in sd.items()}
    peft_named, report_a = jlora.load_lora_weights(renamed, targets, family="flux", return_report=True)
    assert report_a.format == "comfy_flux"
    _accounted(report_a, renamed, skipped=[k for k in renamed if k.startswith("text_encoders.t5xxl.")])
    _same_adapters(peft_named, adapters)
    _same_adapters(jlora.load_lora_weights(renamed, targets, format="comfy_flux"), adapters)


def test_kohya_flux_with_clip_matches_diffusers_and_lists_t5(base, clip, tmp_path):
    """kohya Flux with CLIP-L `lora_te1_` keys: forward parity of transformer and CLIP with diffusers.
    sd-scripts writes T5-XXL LoRAs as `lora_te3_`; jlora reads them as `text_encoder_2` keys and, with no
    T5 params given, lists them as skipped, never drops them. diffusers 0.35.2 silently drops every `lora_te1_` and `lora_te3_` key of a
    kohya Flux file (it keeps only `lora_unet_` / `lora_te_` keys before converting), so its reference is
    built from the same file with `lora_te1_` spelled `lora_te_`, the prefix it reads as the same CLIP-L."""
    model, _, params = base
    _, sd = _kohya_flux_file(str(tmp_path / "k.safetensors"), with_linear1=False, seed=51, top_level=False)
    rng = np.random.default_rng(52)
    n_text = _clip_keys(sd, rng, clip, "lora_te1_", "_")
    t5_keys = _t5_keys(sd, rng, "lora_te3_", "_")
    path = str(tmp_path / "kohya_clip_t5.safetensors")
    save_file(sd, path)
    respelled = str(tmp_path / "kohya_te.safetensors")
    save_file({k.replace("lora_te1_", "lora_te_"): v for k, v in sd.items()}, respelled)
    dropped = FluxLoraLoaderMixin.lora_state_dict(str(tmp_path), weight_name=os.path.basename(path))
    assert not any(k.startswith("text_encoder.") for k in dropped)  # the diffusers flaw the docstring names

    targets = {"transformer": params, "text_encoder": clip.flax_params}
    adapters, report = jlora.load_lora_weights(path, targets, family="flux", return_report=True)
    assert report.format == "kohya_flux"
    listed = set(report.unmatched) | set(report.unplaced) | set(report.skipped)
    assert listed == set(t5_keys)
    assert set(report.skipped) == set(t5_keys) and set(report.skipped.values()) == {"text_encoder_2"}
    assert set(report.loaded_keys) | listed == set(sd)
    n_transformer = 2 * (3 + 3 + 1 + 1 + 1) + 2 * 2  # img qkv, txt qkv, img proj, img mlp 0, txt mod; linear2, modulation
    assert report.counts() == {"transformer": n_transformer, "text_encoder": n_text}
    transformer, text = _diffusers_models(model, clip, respelled, n_transformer, n_text)
    _flux_parity(base, adapters["transformer"], lambda s: _torch_out(transformer, _inputs(True), s))
    _clip_parity(clip, adapters["text_encoder"], text)
