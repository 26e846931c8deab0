"""Real-world file quirks on tiny SD-1.5 models, each against an independent reference.

* Old diffusers attention-processor files written without the ``unet.`` prefix (the first
  ``save_attn_procs`` files): reference is diffusers 0.35.2's ``UNet2DConditionModel.load_attn_procs``
  (what reads them in diffusers; its pipeline loader loads nothing from them) and the format's math
  (``W + s * up @ down``) for the text encoder's unprefixed ``text_model.`` keys.
* LoKr factors that split a conv's flattened ``in*kh*kw`` axis: ComfyUI's formula
  (``comfy/weight_adapter/lokr.py``: ``kron(w1, w2).reshape(weight.shape)``) in torch. LyCORIS itself
  always factors the input channels, so it writes no such files.
* ``strict=False`` with malformed modules: diffusers 0.35.2's kohya loader on the file without them.
* ``prefix=``: diffusers 0.35.2's ``load_lora_adapter(prefix=...)`` on the same keys and metadata.
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


_BASE = {}


def assert_close(ref, got, expected, tol=1e-3):
    """max|got - expected| <= tol * max|LoRA effect|, with an effect large enough to fail on."""
    if ref.name not in _BASE:
        _BASE[ref.name] = R.torch_forward(ref.torch_model, ref)
    base = _BASE[ref.name]
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
    ``load_attn_procs`` at call scale 0.7; ``load_lora_weights`` on a UNet + text encoder pipeline
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
    assert_close(ref, flax_out(ref, adapter, 0.7), R.torch_forward(model, ref, 0.7))


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
    forward and fused weights equal to ComfyUI's formula applied to the torch UNet at strength 0.7."""
    ref = R.build_sd15_unet()
    modules = _lokr_modules()
    path, _ = _lokr_file(tmp_path, modules)
    adapter, report = jlora.load_lora(path, ref.flax_params, "unet", return_report=True)
    assert len(report.placed) == 2 and not report.unplaced and not report.unmatched
    torch_weights = dict(ref.torch_model.named_modules())
    for scale in (0.7,):
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


# --------------------------------------------------------------------------------------------
# 3. strict=False: one malformed module is reported, the rest loads
# --------------------------------------------------------------------------------------------

KOHYA = dict(rank=4, alpha=8, init_scale=1.0)
KOHYA_TARGETS = R.ATTENTION_TARGET_MODULES + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
BLOCK = "down_blocks.0.attentions.0"


def _kname(module):
    return F.kohya_module_name(R.UNET, module, "sd")


# module -> (what is wrong, edit of the file's {key: array}, error type under strict=True)
MALFORMED = {
    f"{BLOCK}.proj_in": ("up of the wrong output size",
                         lambda sd, n: sd.update({f"{n}.lora_up.weight": np.ones((33, 4), np.float32)}),
                         "ShapeMismatchError"),
    f"{BLOCK}.transformer_blocks.0.attn1.to_k": ("ranks that do not chain",
                                                 lambda sd, n: sd.update({f"{n}.lora_up.weight": np.ones((32, 3), np.float32)}),
                                                 "InvalidAdapterError"),
    f"{BLOCK}.transformer_blocks.0.attn2.to_v": ("missing up", lambda sd, n: sd.pop(f"{n}.lora_up.weight"),
                                                 "InvalidAdapterError"),
    f"{BLOCK}.transformer_blocks.0.attn2.to_q": ("alpha that is not a scalar",
                                                 lambda sd, n: sd.update({f"{n}.alpha": np.ones((2,), np.float32)}),
                                                 "InvalidAdapterError"),
    f"{BLOCK}.transformer_blocks.0.ff.net.2": ("alpha that is NaN",
                                               lambda sd, n: sd.update({f"{n}.alpha": np.asarray(np.nan, np.float32)}),
                                               "InvalidAdapterError"),
    f"{BLOCK}.proj_out": ("integer factor", lambda sd, n: sd.update({f"{n}.lora_down.weight": np.ones((4, 32), np.int32)}),
                          "InvalidAdapterError"),
}


@pytest.fixture(scope="module")
def malformed_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    ref = R.build_sd15_unet()
    factors = F.peft_factors(ref, seed=SEED + 2, target_modules=KOHYA_TARGETS, **KOHYA)
    assert set(MALFORMED) <= set(factors)
    bad = F.kohya_state_dict({R.UNET: factors}, "sd")
    for module, (_, edit, _) in MALFORMED.items():
        edit(bad, _kname(module))
    good = {m: f for m, f in factors.items() if m not in MALFORMED}
    return {
        "bad": F._save(os.path.join(root, "bad.safetensors"), bad),
        "good": F.write_kohya(os.path.join(root, "good.safetensors"), {R.UNET: good}, "sd"),
        "factors": good,
        "keys": bad,
    }


def test_strict_false_reports_each_malformed_module_and_loads_the_rest(malformed_file):
    """Six modules malformed six ways: with strict=False each is in ``report.malformed`` (key, shapes,
    reason) and the rest gives diffusers 0.35.2's forward on the file without those modules."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin

    ref = R.build_sd15_unet()
    with pytest.warns(UserWarning, match="malformed"):
        adapter, report = jlora.load_lora(malformed_file["bad"], ref.flax_params, "unet", strict=False, return_report=True)
    bad_keys = {k for k in malformed_file["keys"] if any(k.startswith(_kname(m) + ".") for m in MALFORMED)}
    assert set(report.malformed) == bad_keys
    assert not set(report.loaded_keys) & bad_keys
    assert jlora.count(adapter) == len(malformed_file["factors"])
    shown = report.malformed[f"{_kname(f'{BLOCK}.proj_in')}.lora_up.weight"]
    assert "(33, 4)" in shown and "proj_in" in shown
    assert "nan" in report.malformed[f"{_kname(f'{BLOCK}.transformer_blocks.0.ff.net.2')}.alpha"].lower()

    good = malformed_file["good"]
    sd, alphas = Mixin.lora_state_dict(os.path.dirname(good), weight_name=os.path.basename(good))
    model = copy.deepcopy(ref.torch_model)
    Mixin.load_lora_into_unet(sd, alphas, model, adapter_name="default")
    model.eval()
    assert_close(ref, flax_out(ref, adapter, 0.7), R.torch_forward(model, ref, 0.7))


@pytest.mark.parametrize("module", list(MALFORMED), ids=[v[0].replace(" ", "_") for v in MALFORMED.values()])
def test_strict_true_raises_the_typed_error(malformed_file, module):
    """The same malformations, one at a time, raise their typed error under strict=True (the default)."""
    ref = R.build_sd15_unet()
    what, edit, error = MALFORMED[module]
    sd = F.kohya_state_dict({R.UNET: F.peft_factors(ref, seed=SEED + 2, target_modules=KOHYA_TARGETS, **KOHYA)}, "sd")
    before = dict(sd)
    edit(sd, _kname(module))
    copy_of = dict(sd)
    with pytest.raises(getattr(jlora.errors, error), match=_kname(module).split("_", 2)[-1][:20]):
        jlora.load_lora(sd, ref.flax_params, "unet")
    assert sd.keys() == copy_of.keys() and all(sd[k] is copy_of[k] for k in sd), "the caller's dict was modified"
    assert before.keys() >= sd.keys() - {f"{_kname(module)}.alpha"}


FLUX_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=1, in_channels=4,
                   joint_attention_dim=16, pooled_projection_dim=8)


def _flux_kohya(rows_of_block0_qkv):
    """A kohya Flux file: double-block qkv LoRAs on blocks 0 and 1, proj on block 0 and single-block linear1."""
    rng = np.random.default_rng(5)
    d, r = 16, 2
    shapes = {
        "double_blocks_0_img_attn_qkv": (rows_of_block0_qkv, d),
        "double_blocks_1_img_attn_qkv": (3 * d, d),
        "double_blocks_0_img_attn_proj": (d, d),
        "single_blocks_0_linear1": (3 * d + 4 * d, d),
    }
    sd = {}
    for name, (n_out, n_in) in shapes.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = rng.standard_normal((r, n_in)).astype(np.float32)
        sd[f"lora_unet_{name}.lora_up.weight"] = rng.standard_normal((n_out, r)).astype(np.float32)
        sd[f"lora_unet_{name}.alpha"] = np.asarray(1.0, np.float32)
    return sd


def test_strict_false_reports_a_fused_split_that_fails():
    """A kohya Flux qkv LoRA whose up rows do not split into q, k, v: InvalidAdapterError under strict=True;
    with strict=False it is reported and the other modules give the same leaves as the file without it
    (the placement itself is checked against diffusers in the Flux format tests)."""
    from converters.architectures import flux_index

    params = jlora.loading.abstract_params(flux_index(FLUX_CONFIG))
    bad = _flux_kohya(49)
    with pytest.raises(jlora.errors.InvalidAdapterError, match="double_blocks_0_img_attn_qkv"):
        jlora.load_lora(bad, params, "transformer")
    with pytest.warns(UserWarning, match="malformed"):
        got, report = jlora.load_lora(bad, params, "transformer", strict=False, return_report=True)
    bad_keys = {k for k in bad if "double_blocks_0_img_attn_qkv" in k}
    assert set(report.malformed) == bad_keys and "49" in next(iter(report.malformed.values()))
    good = {k: v for k, v in bad.items() if k not in bad_keys}
    want, good_report = jlora.load_lora(good, params, "transformer", return_report=True)
    assert sorted(report.loaded_keys) == sorted(good_report.loaded_keys) == sorted(good)
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [k for k, _ in flat_got] == [k for k, _ in flat_want] and flat_got
    for (_, g), (_, w) in zip(flat_got, flat_want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# --------------------------------------------------------------------------------------------
# 4. prefix=, as in diffusers' load_lora_adapter
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefixed(tmp_path_factory):
    """A PEFT SD file (UNet, text encoder; alpha 8, rank 4, so the metadata matters) whose keys and
    metadata fields are re-prefixed ``my_model.unet.`` / ``my_model.text_encoder.``, and a bare UNet file."""
    import json

    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("prefix")
    unet, te = R.build_sd15_unet(), R.build_clip_text()
    path = R.make_peft_lora_file(root, [unet, te], rank=4, alpha=8, seed=SEED + 3)
    sd, header = R.read_lora_file(path)
    meta = json.loads(header["lora_adapter_metadata"])
    psd = {"my_model." + k: v for k, v in sd.items()}
    pmeta = {"my_model." + k: v for k, v in meta.items()}
    bare = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
    bmeta = {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")}
    files = {}
    for name, tensors, m in (("prefixed", psd, pmeta), ("bare", bare, bmeta)):
        files[name] = os.path.join(root, f"{name}.safetensors")
        save_file(tensors, files[name], metadata={"lora_adapter_metadata": json.dumps(m)})
    return {"files": files, "sd": {"prefixed": psd, "bare": bare}, "meta": {"prefixed": pmeta, "bare": bmeta},
            "n_unet": sum(k.startswith("unet.") for k in sd) // 2}


def _diffusers_adapter_model(ref, sd, meta, prefix):
    """diffusers 0.35.2 ``<model>.load_lora_adapter(state_dict, prefix=..., metadata=...)`` on a copy."""
    model = copy.deepcopy(ref.torch_model)
    model.load_lora_adapter({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, prefix=prefix,
                            metadata=dict(meta), adapter_name="default")
    model.eval()
    return model


def _same(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.parametrize("prefix", ["my_model.unet", None])
def test_prefix_matches_load_lora_adapter(prefixed, prefix):
    """``load_lora(..., prefix=)`` reads the keys and metadata under the prefix (or, prefix=None, all keys as
    they are) like diffusers' ``load_lora_adapter``: same modules and alphas, forward equal at scale 0.7."""
    ref = R.build_sd15_unet()
    name = "prefixed" if prefix else "bare"
    sd, meta = prefixed["sd"][name], prefixed["meta"][name]
    adapter, report = jlora.load_lora(prefixed["files"][name], ref.flax_params, "unet", prefix=prefix,
                                      return_report=True)
    assert jlora.count(adapter) == prefixed["n_unet"]
    assert {p.alpha for p in report.placed} == {8.0}
    if prefix:
        assert sorted(report.outside_prefix) == sorted(k for k in sd if not k.startswith(prefix + "."))
        # the same metadata handed over with the state dict is filtered the same way
        assert _same(adapter, jlora.load_lora(sd, ref.flax_params, "unet", prefix=prefix, metadata=meta))
    model = _diffusers_adapter_model(ref, sd, meta, prefix)
    from peft.tuners.lora import LoraLayer

    scalings = [float(m.scaling["default"]) for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(scalings) == prefixed["n_unet"] and set(scalings) == {2.0}, "diffusers did not read file and metadata"
    assert_close(ref, flax_out(ref, adapter, 0.7), R.torch_forward(model, ref, 0.7))


def test_prefix_in_state_dict_and_pipeline_loads(prefixed):
    """``lora_state_dict(prefix=)`` keeps and strips what diffusers' prefix filter keeps (keys and metadata);
    ``load_lora_weights`` with ``prefix={component: prefix}`` gives each component the leaves ``load_lora``
    gives it; a prefix that matches no key is a KeyMismatchError naming it."""
    unet, te = R.build_sd15_unet(), R.build_clip_text()
    path, sd, meta = prefixed["files"]["prefixed"], prefixed["sd"]["prefixed"], prefixed["meta"]["prefixed"]
    head = "my_model.unet."
    got, got_meta = jlora.lora_state_dict(path, prefix="my_model.unet", return_lora_metadata=True)
    assert sorted(got) == sorted(k.removeprefix(head) for k in sd if k.startswith(head))
    assert all(np.array_equal(got[k.removeprefix(head)], v) for k, v in sd.items() if k.startswith(head))
    assert got_meta == {k.removeprefix(head): v for k, v in meta.items() if k.startswith(head)}
    adapters = jlora.load_lora_weights(
        path, {"unet": unet.flax_params, "text_encoder": te.flax_params}, family="sd",
        prefix={"unet": "my_model.unet", "text_encoder": "my_model.text_encoder"})
    for component, ref in (("unet", unet), ("text_encoder", te)):
        one = jlora.load_lora(path, ref.flax_params, component, prefix=f"my_model.{component}")
        assert jlora.count(one) > 0 and _same(adapters[component], one)
    with pytest.raises(jlora.errors.KeyMismatchError, match="transformer"):
        jlora.load_lora(path, unet.flax_params, "unet", prefix="transformer")


def test_strict_false_reports_a_module_with_two_keys_for_one_tensor(bare_old):
    """Two keys giving one module's down factor (``.processor.to_q_lora`` and ``.to_q_lora``): InvalidAdapterError
    under strict=True; with strict=False that module's keys are reported and the other modules give the same
    leaves as the file without it."""
    path, factors, sd = bare_old["unet"]
    ref = R.build_sd15_unet()
    key = next(k for k in sorted(sd) if k.endswith("attn1.processor.to_q_lora.down.weight"))
    doubled = {**sd, key.replace(".processor.", "."): sd[key]}
    with pytest.raises(jlora.errors.InvalidAdapterError, match="duplicate"):
        jlora.load_lora(doubled, ref.flax_params, "unet")
    with pytest.warns(UserWarning, match="malformed"):
        got, report = jlora.load_lora(doubled, ref.flax_params, "unet", strict=False, return_report=True)
    module_keys = {k for k in doubled if k.startswith(key.rsplit(".down.", 1)[0]) or k == key.replace(".processor.", ".")}
    assert set(report.malformed) == module_keys and len(module_keys) == 3
    want = jlora.load_lora({k: v for k, v in sd.items() if k not in module_keys}, ref.flax_params, "unet")
    assert jlora.count(got) == len(factors) - 1 and _same(got, want)


def test_strict_false_reports_a_bad_metadata_alpha_of_one_module(prefixed):
    """A ``lora_adapter_metadata`` alpha_pattern entry that is not a number spoils only the module it names:
    InvalidAdapterError under strict=True; with strict=False that module is reported and the rest gives the
    leaves of the file without it (alpha 8 from the metadata)."""
    ref = R.build_sd15_unet()
    sd, meta = prefixed["sd"]["bare"], dict(prefixed["meta"]["bare"])
    module = "down_blocks.0.attentions.0.proj_in"
    meta["alpha_pattern"] = {module: "eight"}
    with pytest.raises(jlora.errors.InvalidAdapterError, match="alpha_pattern"):
        jlora.load_lora(sd, ref.flax_params, "unet", metadata=meta)
    with pytest.warns(UserWarning, match="malformed"):
        got, report = jlora.load_lora(sd, ref.flax_params, "unet", metadata=meta, strict=False, return_report=True)
    bad = {k for k in sd if k.startswith(module + ".lora_")}
    assert set(report.malformed) == bad and len(bad) == 2
    assert {p.alpha for p in report.placed} == {8.0}
    want = jlora.load_lora({k: v for k, v in sd.items() if k not in bad}, ref.flax_params, "unet",
                           metadata=prefixed["meta"]["bare"])
    assert jlora.count(got) == prefixed["n_unet"] - 1 and _same(got, want)
