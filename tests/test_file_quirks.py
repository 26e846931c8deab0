"""Real-world file quirks on tiny SD-1.5 models, each against an independent reference.

* Old diffusers attention-processor files written without the ``unet.`` prefix (the first
  ``save_attn_procs`` files): reference is diffusers 0.35.2's ``UNet2DConditionModel.load_attn_procs``
  (what reads them in diffusers; its pipeline loader loads nothing from them) and the format's math
  (``W + s * up @ down``) for the text encoder's unprefixed ``text_model.`` keys.
"""

import copy
import os

import jax
import numpy as np
import pytest
import torch

import jlora
import reference as R
import sd_formats as F

SEED = 11
OLD = dict(rank=4, alpha=4, init_scale=4.0)
_apply = jax.jit(jlora.apply)
_FORWARDS = {}


def flax_out(ref, adapter, scale=1.0):
    """Jitted Flax forward of ``jlora.apply(params, adapter, scale)`` on ``ref.inputs``."""
    if ref.name not in _FORWARDS:
        _FORWARDS[ref.name] = jax.jit(R.flax_apply_fn(ref))
    return np.asarray(_FORWARDS[ref.name](_apply(ref.flax_params, adapter, scale), **ref.inputs))


def assert_close(ref, got, expected, tol=1e-3):
    """max|got - expected| <= tol * max|LoRA effect|, with an effect large enough to fail on."""
    base = R.torch_forward(ref.torch_model, ref)
    effect = np.abs(expected - base).max()
    assert effect > 0.3 * np.abs(base).max(), ("LoRA effect too small for a meaningful test", effect)
    err = np.abs(got - expected).max()
    assert err <= tol * effect, (err, effect)
    return err, effect


# --------------------------------------------------------------------------------------------
# 1. old attention-processor files without the `unet.` prefix
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_old(tmp_path_factory):
    """An old-format UNet file with bare block names, and an unprefixed text-encoder file."""
    root = tmp_path_factory.mktemp("quirks")
    unet, te = R.build_sd15_unet(), R.build_clip_text()
    uf = F.peft_factors(unet, seed=SEED, target_modules=R.ATTENTION_TARGET_MODULES, **OLD)
    tf = F.peft_factors(te, seed=SEED + 1, target_modules=R.CLIP_TARGET_MODULES, **OLD)
    usd = {k.removeprefix("unet."): v for k, v in F.diffusers_old_state_dict({R.UNET: uf}).items()}
    tsd = {k.removeprefix("text_encoder."): v for k, v in F.diffusers_old_state_dict({R.TEXT_ENCODER: tf}).items()}
    assert all(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in usd)
    assert all(k.startswith("text_model.") for k in tsd)
    return {
        "unet": (F._save(os.path.join(root, "unet_bare.safetensors"), usd), uf, usd),
        "te": (F._save(os.path.join(root, "te_bare.safetensors"), tsd), tf, tsd),
    }


def _diffusers_attn_procs_model(ref, state_dict):
    """diffusers 0.35.2 ``UNet2DConditionModel.load_attn_procs`` on a deep copy of the torch UNet."""
    from peft.tuners.lora import LoraLayer

    model = copy.deepcopy(ref.torch_model)
    model.load_attn_procs({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    model.eval()
    n = sum(isinstance(m, LoraLayer) for m in model.modules())
    return model, n


def test_bare_old_unet_file_matches_load_attn_procs(bare_old):
    """Every module of an unprefixed old UNet file lands on the UNet, forward equal to diffusers'
    ``load_attn_procs`` at two call scales; ``load_lora_weights`` on a UNet + text encoder pipeline
    places the same leaves on the UNet and nothing on the text encoder."""
    path, factors, sd = bare_old["unet"]
    ref, te = R.build_sd15_unet(), R.build_clip_text()
    adapter, report = jlora.load_lora(path, ref.flax_params, "unet", return_report=True)
    assert report.format == "diffusers_old"
    assert report.loaded_keys == sorted(sd) and not report.unplaced and not report.unmatched
    assert jlora.count(adapter) == len(factors)
    adapters = jlora.load_lora_weights(path, {"unet": ref.flax_params, "text_encoder": te.flax_params}, family="sd")
    assert jlora.count(adapters["text_encoder"]) == 0
    same = jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), adapter, adapters["unet"])
    assert all(jax.tree.leaves(same))
    model, injected = _diffusers_attn_procs_model(ref, sd)
    assert injected == len(factors), "diffusers' load_attn_procs did not read the whole file"
    for scale in (1.0, 0.5):
        assert_close(ref, flax_out(ref, adapter, scale), R.torch_forward(model, ref, scale))


def test_bare_old_text_encoder_file_matches_format_math(bare_old):
    """Unprefixed ``text_model.`` old-format keys go to the text encoder named by ``component=``;
    forward equal to ``W + up @ down`` on the torch CLIP (no alphas: scale 1)."""
    path, factors, sd = bare_old["te"]
    ref = R.build_clip_text()
    adapter, report = jlora.load_lora(path, ref.flax_params, "text_encoder", return_report=True)
    assert report.format == "diffusers_old" and report.loaded_keys == sorted(sd)
    assert jlora.count(adapter) == len(factors)
    expected = R.torch_forward(F.torch_model_with_deltas(ref, factors), ref)
    assert_close(ref, flax_out(ref, adapter), expected)


# --------------------------------------------------------------------------------------------
# 2. LoKr whose Kronecker factors split the flattened in*kh*kw axis
# --------------------------------------------------------------------------------------------

CONV = "down_blocks.0.resnets.0.conv1"  # 32 x 32 x 3 x 3 in the tiny SD-1.5 UNet
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # 32 x 32


def comfy_lokr_delta(t, weight_shape):
    """ComfyUI's LoKr (comfy/weight_adapter/lokr.py): ``(alpha / dim if a factor is decomposed else 1)
    * kron(w1, w2).reshape(weight.shape)``, ``dim`` the rank of the decomposed factor, w1 given a
    1x1 kernel when w2 is 4-D."""
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, dim = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    w2 = t.get("lokr_w2")
    if w2 is None:
        w2, dim = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    c = float(t["alpha"]) / dim if ("alpha" in t and dim is not None) else 1.0
    return c * torch.kron(w1, w2).reshape(weight_shape)


def _lokr_modules(seed=3):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.35  # noqa: E731
    return {
        # w1 (4, 9) x w2 (8, 32): columns run over in*kh*kw = 288 and 9 does not divide 32.
        CONV: {"lokr_w1": rnd(4, 9), "lokr_w2_a": rnd(8, 2), "lokr_w2_b": rnd(2, 32), "alpha": torch.tensor(3.0)},
        # an ordinary LoKr on a linear layer (w1 (4, 4) x w2 (8, 8)) in the same file.
        LINEAR: {"lokr_w1": rnd(4, 4), "lokr_w2": rnd(8, 8)},
    }


def _lokr_file(tmp_path, modules):
    import lycoris_ref as LR

    flat = {f"{LR.kohya_name(R.UNET, m)}.{k}": v.numpy() for m, t in modules.items() for k, v in t.items()}
    return F._save(os.path.join(tmp_path, "lokr_split.safetensors"), flat), flat


def test_lokr_split_conv_axis_matches_comfyui(tmp_path):
    """A LoKr whose factors split a conv's flattened ``in*kh*kw`` axis loads (ShapeMismatchError before),
    forward and fused weights equal to ComfyUI's formula applied to the torch UNet at two strengths."""
    ref = R.build_sd15_unet()
    modules = _lokr_modules()
    path, _ = _lokr_file(tmp_path, modules)
    adapter, report = jlora.load_lora(path, ref.flax_params, "unet", return_report=True)
    assert len(report.placed) == 2 and not report.unplaced and not report.unmatched
    torch_weights = dict(ref.torch_model.named_modules())
    for scale in (1.0, 0.5):
        model = copy.deepcopy(ref.torch_model)
        named = dict(model.named_modules())
        with torch.no_grad():
            for m, t in modules.items():
                named[m].weight.add_(scale * comfy_lokr_delta(t, tuple(torch_weights[m].weight.shape)))
        model.eval()
        assert_close(ref, flax_out(ref, adapter, scale), R.torch_forward(model, ref))
        want = jax.tree.map(np.asarray, R.torch_state_dict_to_flax(ref, model.state_dict()))
        got = jlora.fuse(ref.flax_params, adapter, scale=scale)
        flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
        for k, g in jax.tree_util.tree_flatten_with_path(got)[0]:
            w = flat_want[k]
            assert np.abs(np.asarray(g) - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-6), jax.tree_util.keystr(k)


def test_lokr_whose_product_does_not_fit_still_raises(tmp_path):
    """A LoKr whose product has another element count than the weight is a ShapeMismatchError naming the key."""
    ref = R.build_sd15_unet()
    modules = _lokr_modules()
    modules[CONV]["lokr_w1"] = modules[CONV]["lokr_w1"][:, :8]  # 4*8 x 8*32: 8192 elements, weight 9216
    path, _ = _lokr_file(tmp_path, modules)
    with pytest.raises(jlora.errors.ShapeMismatchError, match="lokr_w1"):
        jlora.load_lora(path, ref.flax_params, "unet")
