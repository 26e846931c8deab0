"""Parity of the LyCORIS / kohya-extension formats that diffusers cannot read.

Each test names its independent reference (tests/lycoris_ref.py):

* LoHa, LoHa Tucker, LoKr: PEFT's own LoHa/LoKr layers injected into the torch models; their parameters
  are written under LyCORIS keys, and the torch forward of the PEFT model is the reference (call scale
  through diffusers' ``scale_lora_layers``); fused weights come from PEFT's ``merge``.
* DoRA as PEFT ``lora_magnitude_vector``: a PEFT ``LoraConfig(use_dora=True)`` model, saved with
  diffusers' ``save_lora_weights``; its torch forward (scale inside the norm) and PEFT's merge.
* kohya ``dora_scale``, LoCon Tucker ``lora_mid``, ``diff``/``diff_b``: the formats' published formulas
  applied to the torch weights in torch, then the torch forward.
* ``lora_B.bias``: a PEFT ``LoraConfig(lora_bias=True)`` model (and diffusers' loader as a cross-check).

jlora side: ``jlora.load_lora_weights`` on the Flax ports of the same weights, ``jax.jit(jlora.apply)``
with a traced scale, then the jitted Flax forward (compiled once per model); ``jax.jit(jlora.fuse)`` for
fused weights. Tolerances as in TESTING.md: forward max|Δ| ≤ 1e-3 · max|effect| with a large effect;
fused weights ≤ 1e-5 relative.
"""

import functools

import jax
import numpy as np
import pytest
import torch

import jlora
import lycoris_ref as LR
import reference as R

SCALES = (1.0, 0.5)
FUSE_SCALE = 0.7
MIN_EFFECT = 0.3  # the adapter must move the output by at least this fraction of its size
REL = {"unet": 0.25, "text_encoder": 0.7}  # ‖ΔW‖ / ‖W‖ of each adapted weight


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _base_output(ref):
    return R.torch_forward(ref.torch_model, ref)


_apply = jax.jit(jlora.apply)
_fuse = jax.jit(jlora.fuse)


def _flax_output(ref, adapter, scale):
    """Flax forward (jitted, compiled once per model) of ``jlora.apply(params, adapter, scale)`` (jitted,
    traced scale)."""
    return R.flax_forward(ref, _apply(ref.flax_params, adapter, scale))


def assert_forward(ref, adapter, scale, expected):
    base = _base_output(ref)
    effect = np.abs(expected - base).max()
    assert effect >= MIN_EFFECT * np.abs(base).max(), f"effect {effect} too small to test anything"
    got = _flax_output(ref, adapter, scale)
    err = np.abs(got - expected).max()
    assert err <= 1e-3 * effect, f"{ref.name} scale {scale}: max|Δ| {err:.3g} vs effect {effect:.3g}"
    return effect


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_fused(ref, adapter, scale, expected_state_dict):
    """``jlora.fuse`` against reference torch weights converted to the Flax layout."""
    want = _flat(R.torch_state_dict_to_flax(ref, expected_state_dict))
    got = _flat(_fuse(ref.flax_params, adapter, scale))
    base = _flat(ref.flax_params)
    assert got.keys() == want.keys()
    changed = 0
    for k, w in want.items():
        err = np.abs(got[k] - w).max()
        assert err <= 1e-5 * max(np.abs(w).max(), 1e-6), f"{ref.name} {k}: {err:.3g} vs max {np.abs(w).max():.3g}"
        changed += not np.array_equal(base[k], w)
    assert changed == jlora.count(adapter) > 0


def adapter_leaves(adapter):
    flat = jax.tree_util.tree_flatten_with_path(adapter, is_leaf=jlora.is_adapter_leaf)[0]
    return {jax.tree_util.keystr(k): leaf for k, leaf in flat if leaf is not None}


def assert_leaf_types(adapter, expected_types, count):
    leaves = adapter_leaves(adapter)
    assert jlora.count(adapter) == len(leaves) == count
    kinds = {type(leaf) for leaf in leaves.values()}
    assert kinds == set(expected_types), kinds


def load(path, refs):
    params = {ref.component: ref.flax_params for ref in refs}
    adapters, report = jlora.load_lora_weights(path, params, return_report=True)
    assert not report.unmatched and not report.unplaced and not report.skipped, report.summary()
    return adapters, report


def _by_module(tensors, ref):
    """``{torch module name: {tensor name: tensor}}`` of a kohya/LyCORIS dict, for one component."""
    names = {n.replace(".", "_"): n for n, _ in ref.torch_model.named_modules()}
    prefix = LR.KOHYA_PREFIX[ref.component] + "_"
    out = {}
    for key, t in tensors.items():
        if key.startswith(prefix):
            module, name = key[len(prefix):].split(".", 1)
            out.setdefault(names[module], {})[name] = t
    return out




def _refs(*names):
    return [R.ALL_BUILDERS[n]() for n in names]


# --------------------------------------------------------------------------------------------
# LoHa and LoKr: PEFT's layers are the reference
# --------------------------------------------------------------------------------------------


def _lycoris_case(tmp_path_factory, name, configs):
    """Inject PEFT LyCORIS configs ``{ref: config}``, rescale, write the LyCORIS file, load it in jlora."""
    from peft import LoKrConfig

    models, tensors = {}, {}
    for i, (ref, config) in enumerate(configs.items()):
        model = LR.inject(ref, config, seed=100 + i)
        alphas = {}
        if isinstance(config, LoKrConfig):
            # LyCORIS: with both factors stored full the scale is 1 whatever the file's alpha says.
            # PEFT scales by alpha / r always, so those layers are set to alpha = r in PEFT and the file
            # carries a different alpha (which must be ignored).
            for module, layer in LR.tuner_layers(model).items():
                if "default" in layer.lokr_w1 and "default" in layer.lokr_w2:
                    layer.alpha["default"] = layer.r["default"]
                    layer.scaling["default"] = 1.0
                    alphas[module] = 5.0
        LR.amplify(model, REL[ref.component])
        models[ref.component] = model
        tensors.update(LR.lycoris_tensors(model, ref.component, alphas))
    path = LR.save_kohya(tmp_path_factory.mktemp(name) / f"{name}.safetensors", tensors)
    adapters, report = load(path, list(configs))
    return dict(path=path, models=models, tensors=tensors, adapters=adapters, report=report)


@pytest.fixture(scope="module")
def loha(tmp_path_factory, unet, clip):
    from peft import LoHaConfig

    def config(targets, **patterns):
        return LoHaConfig(r=4, alpha=6, target_modules=list(targets), init_weights=False, use_effective_conv2d=False, **patterns)

    return _lycoris_case(
        tmp_path_factory,
        "loha",
        {
            unet: config(R.UNET_TARGET_MODULES, rank_pattern={"to_k": 2, "conv2": 6}, alpha_pattern={"to_v": 2, "conv1": 3}),
            clip: config(R.CLIP_TARGET_MODULES, rank_pattern={"fc1": 8}, alpha_pattern={"q_proj": 1.5}),
        },
    )


@pytest.fixture(scope="module")
def loha_tucker(tmp_path_factory, unet):
    from peft import LoHaConfig

    config = LoHaConfig(
        r=4,
        alpha=3,
        target_modules=["conv1", "conv2", "conv", "conv_shortcut", "proj_in", "to_q"],
        init_weights=False,
        use_effective_conv2d=True,
        rank_pattern={"conv2": 2},
    )
    return _lycoris_case(tmp_path_factory, "loha_tucker", {unet: config})


@pytest.fixture(scope="module")
def lokr(tmp_path_factory, unet, clip):
    from peft import LoKrConfig

    def config(targets, rank_pattern):
        return LoKrConfig(
            r=2,
            alpha=3,
            target_modules=list(targets),
            init_weights=False,
            decompose_both=True,
            use_effective_conv2d=True,
            rank_pattern=rank_pattern,
        )

    return _lycoris_case(
        tmp_path_factory,
        "lokr",
        {
            unet: config(R.UNET_TARGET_MODULES, {"to_k": 8, "conv2": 8, "ff.net.0.proj": 1}),
            clip: config(R.CLIP_TARGET_MODULES, {"k_proj": 8, "fc2": 1}),
        },
    )


def test_loha_files_hold_both_variants(loha, loha_tucker):
    keys = set(loha["tensors"])
    assert not any(".hada_t1" in k for k in keys)
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    unet = R.build_sd15_unet()
    tucker = _by_module(loha_tucker["tensors"], unet)
    for module, t in tucker.items():
        kernel = LR.weight_of(unet, module).shape[2:]
        assert ("hada_t1" in t) == (tuple(kernel) == (3, 3)), module
    assert sum("hada_t1" in t for t in tucker.values()) >= 10


def test_lokr_file_covers_every_factor_layout(lokr):
    layouts = set()
    for ref in _refs("sd15_unet", "clip_text"):
        convs = LR.modules_of(ref, torch.nn.Conv2d)
        for module, t in _by_module(lokr["tensors"], ref).items():
            w1 = "full" if "lokr_w1" in t else "ab"
            w2 = "full" if "lokr_w2" in t else ("tucker" if "lokr_t2" in t else "ab")
            layouts.add((ref.component, "conv" if module in convs else "linear", w1, w2))
    for needed in [
        ("unet", "linear", "full", "full"),
        ("unet", "linear", "full", "ab"),
        ("unet", "linear", "ab", "ab"),
        ("unet", "conv", "full", "full"),
        ("unet", "conv", "full", "tucker"),
        ("unet", "conv", "ab", "tucker"),
        ("unet", "conv", "full", "ab"),  # 1x1 convs
        ("text_encoder", "linear", "full", "full"),
        ("text_encoder", "linear", "full", "ab"),
        ("text_encoder", "linear", "ab", "ab"),
    ]:
        assert needed in layouts, needed


@pytest.mark.parametrize("case,formula", [("loha", LR.loha_delta), ("loha_tucker", LR.loha_delta), ("lokr", LR.lokr_delta)])
def test_written_tensors_follow_the_lycoris_formula(request, case, formula):
    """The file writer is right: LyCORIS's published formula on the written tensors gives PEFT's delta."""
    data = request.getfixturevalue(case)
    n = 0
    for component, model in data["models"].items():
        ref = next(r for r in _refs("sd15_unet", "clip_text") if r.component == component)
        layers = LR.tuner_layers(model)
        modules = _by_module(data["tensors"], ref)
        assert set(modules) == set(layers)
        for module, layer in layers.items():
            want = layer.get_delta_weight("default")
            got = formula(modules[module], want.shape)
            assert torch.allclose(got, want, rtol=0, atol=1e-6 * want.abs().max()), module
            n += 1
    assert n == sum(jlora.count(a) for a in data["adapters"].values())


@pytest.mark.parametrize(
    "case,name",
    [("loha", "sd15_unet"), ("loha", "clip_text"), ("loha_tucker", "sd15_unet"), ("lokr", "sd15_unet"), ("lokr", "clip_text")],
)
def test_lycoris_forward_matches_peft(request, case, name):
    """Reference: the torch forward of PEFT's LoHa/LoKr layers (scale via scale_lora_layers)."""
    data = request.getfixturevalue(case)
    ref = R.ALL_BUILDERS[name]()
    model = data["models"][ref.component]
    adapter = data["adapters"][ref.component]
    leaf_type = jlora.LokrLeaf if case == "lokr" else jlora.LohaLeaf
    assert_leaf_types(adapter, [leaf_type], len(LR.tuner_layers(model)))
    for scale in SCALES:
        assert_forward(ref, adapter, scale, R.torch_forward(model, ref, scale=scale))


@pytest.mark.parametrize(
    "case,name",
    [("loha", "sd15_unet"), ("loha", "clip_text"), ("loha_tucker", "sd15_unet"), ("lokr", "sd15_unet"), ("lokr", "clip_text")],
)
def test_lycoris_fused_weights_match_peft_merge(request, case, name):
    """Reference: PEFT's own ``merge`` (``W + scaling · get_delta_weight``) at call scale 0.7."""
    data = request.getfixturevalue(case)
    ref = R.ALL_BUILDERS[name]()
    model = data["models"][ref.component]
    assert_fused(ref, data["adapters"][ref.component], FUSE_SCALE, LR.peft_merged_state_dict(model, FUSE_SCALE))


def test_lokr_alpha_of_full_factors_is_ignored(lokr):
    """Modules stored with both factors full carry alpha 5 in the file; LyCORIS's scale is 1 there."""
    full = [p for p in lokr["report"].placed if p.rank is None]
    assert full and all(p.leaf == "lokr" for p in full)
    for component in ("unet", "text_encoder"):
        factors = {float(leaf.factor) for leaf in adapter_leaves(lokr["adapters"][component]).values()}
        assert factors == {1.0, 3.0 / 2, 3.0 / 1}, factors


# --------------------------------------------------------------------------------------------
# LoCon Tucker: published formula
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locon_tucker(tmp_path_factory, unet):
    gen = LR.seeded(7)
    tensors, deltas = {}, {}
    convs = {n: m for n, m in LR.modules_of(unet, torch.nn.Conv2d).items() if m.kernel_size == (3, 3)}
    plain = [n for n in LR.modules_of(unet) if n.endswith(("attn1.to_q", "proj_out"))]
    assert len(convs) >= 15 and plain
    for i, name in enumerate(sorted(convs) + plain):
        w = LR.weight_of(unet, name)
        r, alpha = (4, 2.0) if i % 2 else (2, 3.0)
        out_ch, in_ch = w.shape[:2]
        prefix = LR.kohya_name("unet", name)
        if name in convs:
            down = LR.randn(gen, r, in_ch, 1, 1)
            mid = LR.randn(gen, r, r, *w.shape[2:])
            up = LR.randn(gen, out_ch, r, 1, 1)
            up = LR.scaled_up(up, LR.locon_tucker_delta(up, mid, down, alpha), w, REL["unet"])
            tensors[f"{prefix}.lora_mid.weight"] = mid
            deltas[name] = LR.locon_tucker_delta(up, mid, down, alpha)
        else:
            down = LR.randn(gen, r, *w.shape[1:])
            up = LR.randn(gen, out_ch, r, *([1, 1] if w.dim() == 4 else []))
            up = LR.scaled_up(up, LR.lora_delta(up, down, alpha), w, REL["unet"])
            deltas[name] = LR.lora_delta(up, down, alpha)
        tensors[f"{prefix}.lora_down.weight"] = down
        tensors[f"{prefix}.lora_up.weight"] = up
        tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
    path = LR.save_kohya(tmp_path_factory.mktemp("locon") / "locon_tucker.safetensors", tensors)
    adapters, report = load(path, [unet])
    return dict(path=path, tensors=tensors, deltas=deltas, adapters=adapters, report=report, tucker=sorted(convs))


def _additive_state_dict(ref, deltas, scale):
    return LR.edited_state_dict(ref, {f"{m}.weight": (lambda w, d=d: w + scale * d) for m, d in deltas.items()})


def test_locon_tucker_matches_formula(locon_tucker, unet):
    """Reference: ΔW = einsum(up, mid, down) · alpha/r on the torch weights (ComfyUI's tucker rebuild)."""
    adapter = locon_tucker["adapters"]["unet"]
    assert_leaf_types(adapter, [jlora.LoraLeaf], len(locon_tucker["deltas"]))
    assert sum(k.endswith(".lora_mid.weight") for k in locon_tucker["tensors"]) == len(locon_tucker["tucker"])
    for scale in SCALES:
        model = LR.model_with_state_dict(unet, _additive_state_dict(unet, locon_tucker["deltas"], scale))
        assert_forward(unet, adapter, scale, R.torch_forward(model, unet))
    assert_fused(unet, adapter, FUSE_SCALE, _additive_state_dict(unet, locon_tucker["deltas"], FUSE_SCALE))


# --------------------------------------------------------------------------------------------
# DoRA as PEFT lora_magnitude_vector
# --------------------------------------------------------------------------------------------

DORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj", "ff.net.2")


@pytest.fixture(scope="module")
def dora_peft(tmp_path_factory, unet, clip):
    from peft import LoraConfig

    gen = LR.seeded(3)
    models, configs = {}, {}
    for i, (ref, targets) in enumerate(((unet, DORA_UNET_TARGETS), (clip, R.CLIP_TARGET_MODULES))):
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(targets),
            init_lora_weights=False,
            use_dora=True,
            rank_pattern={"to_k": 2, "fc1": 6},
            alpha_pattern={"to_v": 3},
        )
        model = LR.inject(ref, config, seed=200 + i)
        LR.amplify(model, REL[ref.component])
        with torch.no_grad():
            for layer in LR.tuner_layers(model).values():
                # magnitude = ‖W + s·ΔW‖ per output channel (PEFT's init) times a random factor
                mag = layer.lora_magnitude_vector["default"].weight
                w = layer.get_base_layer().weight
                norm = LR.dora_norm(w + layer.get_delta_weight("default"), per_output=True)
                noise = 1 + 0.5 * (2 * torch.rand(mag.numel(), generator=gen) - 1)
                mag.copy_((norm.reshape(-1) * noise).reshape(mag.shape))
        models[ref.component], configs[ref.component] = model, config
    path = LR.peft_file(tmp_path_factory.mktemp("dora_peft"), models, configs)
    adapters, report = load(path, [unet, clip])
    return dict(path=path, models=models, adapters=adapters, report=report)


@pytest.mark.parametrize("name", ["sd15_unet", "clip_text"])
def test_peft_dora_forward_matches_peft(dora_peft, name):
    """Reference: the PEFT DoRA model's torch forward; the call scale goes inside the norm (PEFT)."""
    ref = R.ALL_BUILDERS[name]()
    model = dora_peft["models"][ref.component]
    adapter = dora_peft["adapters"][ref.component]
    assert_leaf_types(adapter, [jlora.DoraLeaf], len(LR.tuner_layers(model)))
    assert all(leaf.strength_inside for leaf in adapter_leaves(adapter).values())
    for scale in SCALES:
        assert_forward(ref, adapter, scale, R.torch_forward(model, ref, scale=scale))


@pytest.mark.parametrize("name", ["sd15_unet", "clip_text"])
def test_peft_dora_fused_weights_match_peft_merge(dora_peft, name):
    ref = R.ALL_BUILDERS[name]()
    model = dora_peft["models"][ref.component]
    assert_fused(ref, dora_peft["adapters"][ref.component], FUSE_SCALE, LR.peft_merged_state_dict(model, FUSE_SCALE))


@pytest.mark.parametrize("name", ["sd15_unet", "clip_text"])
def test_peft_dora_file_reads_the_same_in_diffusers(dora_peft, name):
    """Cross-check of the written file: diffusers' loader gives the same torch model as PEFT's."""
    ref = R.ALL_BUILDERS[name]()
    loaded = R.torch_model_with_lora(ref, dora_peft["path"])
    want = R.torch_forward(dora_peft["models"][ref.component], ref, scale=0.5)
    got = R.torch_forward(loaded, ref, scale=0.5)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# --------------------------------------------------------------------------------------------
# DoRA as kohya / LyCORIS dora_scale: published formula (strength blends the result)
# --------------------------------------------------------------------------------------------

KOHYA_DORA_TARGETS = {
    "unet": ("attn1.to_q", "attn2.to_k", "ff.net.2", "time_emb_proj", "proj_in", "conv1"),
    "text_encoder": ("q_proj", "fc1", "fc2"),
}


def _kohya_dora(tmp_path_factory, axis, refs):
    gen = LR.seeded(11 if axis == "out" else 12)
    tensors, parts = {}, {}
    for ref in refs:
        names = [n for n in LR.modules_of(ref) if n.endswith(KOHYA_DORA_TARGETS[ref.component])]
        assert len(names) >= 3
        for i, name in enumerate(names):
            w = LR.weight_of(ref, name)
            r, alpha = (4, 2.0) if i % 2 else (8, 8.0)
            down = LR.randn(gen, r, *w.shape[1:])
            up = LR.randn(gen, w.shape[0], r, *([1, 1] if w.dim() == 4 else []))
            up = LR.scaled_up(up, LR.lora_delta(up, down, alpha), w, REL[ref.component])
            delta = LR.lora_delta(up, down, alpha)
            norm = LR.dora_norm(w + delta, per_output=axis == "out")
            noise = 1 + 0.5 * (2 * torch.rand(norm.shape, generator=gen) - 1)
            dora_scale = norm * noise
            if w.dim() == 2:  # kohya/LyCORIS store (out, 1) or (1, in) for a Linear
                dora_scale = dora_scale.reshape((-1, 1) if axis == "out" else (1, -1))
            prefix = LR.kohya_name(ref.component, name)
            tensors.update(
                {
                    f"{prefix}.lora_down.weight": down,
                    f"{prefix}.lora_up.weight": up,
                    f"{prefix}.alpha": torch.tensor(alpha),
                    f"{prefix}.dora_scale": dora_scale,
                }
            )
            parts[(ref.component, name)] = (delta, dora_scale)
    path = LR.save_kohya(tmp_path_factory.mktemp(f"dora_{axis}") / "dora.safetensors", tensors)
    adapters, report = load(path, refs)
    return dict(path=path, parts=parts, adapters=adapters, report=report, axis=axis)


@pytest.fixture(scope="module", params=["out", "in"])
def dora_kohya(request, tmp_path_factory, unet, clip):
    return _kohya_dora(tmp_path_factory, request.param, [unet, clip])


def _dora_state_dict(ref, parts, strength, rule=LR.kohya_dora_weight):
    edits = {
        f"{name}.weight": (lambda w, d=delta, m=m: rule(w, d, m, strength))
        for (component, name), (delta, m) in parts.items()
        if component == ref.component
    }
    return LR.edited_state_dict(ref, edits)


@pytest.mark.parametrize("name", ["sd15_unet", "clip_text"])
def test_kohya_dora_matches_formula(dora_kohya, name):
    """Reference: W' = m·(W + ΔW·alpha/r)/‖W + ΔW·alpha/r‖ (norm over all axes but the magnitude's),
    blended W + s·(W' − W), in torch."""
    ref = R.ALL_BUILDERS[name]()
    parts = dora_kohya["parts"]
    adapter = dora_kohya["adapters"][ref.component]
    n = sum(c == ref.component for c, _ in parts)
    assert_leaf_types(adapter, [jlora.DoraLeaf], n)
    for path, leaf in adapter_leaves(adapter).items():
        assert not leaf.strength_inside
        kept = [i for i, size in enumerate(leaf.magnitude.shape) if size != 1]
        assert kept == [leaf.magnitude.ndim - (1 if dora_kohya["axis"] == "out" else 2)], (path, leaf.magnitude.shape)
    for scale in SCALES:
        model = LR.model_with_state_dict(ref, _dora_state_dict(ref, parts, scale))
        expected = assert_forward(ref, adapter, scale, R.torch_forward(model, ref))
        if scale != 1.0:
            # the blending rule is what is tested: PEFT's rule (scale inside the norm) differs a lot
            other = LR.model_with_state_dict(ref, _dora_state_dict(ref, parts, scale, LR.dora_inside_weight))
            got = _flax_output(ref, adapter, scale)
            assert np.abs(R.torch_forward(other, ref) - got).max() > 20e-3 * expected
    assert_fused(ref, adapter, FUSE_SCALE, _dora_state_dict(ref, parts, FUSE_SCALE))


# --------------------------------------------------------------------------------------------
# Full diffs: W += s·diff, b += s·diff_b
# --------------------------------------------------------------------------------------------

DIFF_MODULES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": ("diff",),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": ("diff", "diff_b"),
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2": ("diff", "diff_b"),
    "time_embedding.linear_1": ("diff", "diff_b"),
    "down_blocks.0.resnets.0.conv1": ("diff", "diff_b"),
    "mid_block.resnets.0.conv2": ("diff",),
    "up_blocks.1.attentions.0.proj_in": ("diff_b",),
    "conv_in": ("diff", "diff_b"),
    "down_blocks.0.resnets.0.norm1": ("diff", "diff_b"),  # GroupNorm scale / bias
    "up_blocks.1.attentions.0.transformer_blocks.0.norm2": ("diff",),  # LayerNorm scale
}


@pytest.fixture(scope="module")
def diffs(tmp_path_factory, unet):
    gen = LR.seeded(5)
    tensors, edits = {}, {}
    for module, kinds in DIFF_MODULES.items():
        prefix = LR.kohya_name("unet", module)
        for kind in kinds:
            what = "weight" if kind == "diff" else "bias"
            w = LR.weight_of(unet, module, what)
            d = LR.randn(gen, *w.shape) * (0.3 * max(float(w.std()), 0.02))
            tensors[f"{prefix}.{kind}"] = d
            edits[f"{module}.{what}"] = d
    path = LR.save_kohya(tmp_path_factory.mktemp("diffs") / "diffs.safetensors", tensors)
    adapters, report = load(path, [unet])
    return dict(path=path, tensors=tensors, edits=edits, adapters=adapters, report=report)


def _diff_state_dict(ref, edits, scale):
    return LR.edited_state_dict(ref, {k: (lambda w, d=d: w + scale * d) for k, d in edits.items()})


def test_full_diffs_match_formula(diffs, unet):
    """Reference: W += s·diff and b += s·diff_b on the torch weights."""
    adapter = diffs["adapters"]["unet"]
    assert_leaf_types(adapter, [jlora.DiffLeaf], len(diffs["edits"]))
    for scale in SCALES:
        model = LR.model_with_state_dict(unet, _diff_state_dict(unet, diffs["edits"], scale))
        assert_forward(unet, adapter, scale, R.torch_forward(model, unet))
    assert_fused(unet, adapter, FUSE_SCALE, _diff_state_dict(unet, diffs["edits"], FUSE_SCALE))


# --------------------------------------------------------------------------------------------
# PEFT lora_B.bias
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_bias(tmp_path_factory, unet, clip):
    from peft import LoraConfig

    models, configs = {}, {}
    targets = {"unet": ("to_out.0", "proj_in", "conv1", "ff.net.2", "time_emb_proj"), "text_encoder": ("q_proj", "out_proj", "fc1")}
    for i, ref in enumerate((unet, clip)):
        config = LoraConfig(
            r=4,
            lora_alpha=6,
            target_modules=list(targets[ref.component]),
            init_lora_weights=False,
            lora_bias=True,
            alpha_pattern={"fc1": 2, "conv1": 8},
        )
        model = LR.inject(ref, config, seed=300 + i)
        LR.amplify(model, REL[ref.component])
        models[ref.component], configs[ref.component] = model, config
    path = LR.peft_file(tmp_path_factory.mktemp("lora_bias"), models, configs)
    adapters, report = load(path, [unet, clip])
    return dict(path=path, models=models, adapters=adapters, report=report)


@pytest.mark.parametrize("name", ["sd15_unet", "clip_text"])
def test_lora_bias_matches_peft(lora_bias, name):
    """Reference: the PEFT lora_bias model's torch forward (bias delta scaled by alpha/r and the call
    scale), diffusers' loader on the same file as a cross-check, and PEFT's merge for fused weights."""
    ref = R.ALL_BUILDERS[name]()
    model = lora_bias["models"][ref.component]
    adapter = lora_bias["adapters"][ref.component]
    n = len(LR.tuner_layers(model))
    assert_leaf_types(adapter, [jlora.LoraLeaf, jlora.DiffLeaf], 2 * n)
    biases = [leaf for path, leaf in adapter_leaves(adapter).items() if path.endswith("['bias']")]
    assert len(biases) == n and all(isinstance(b, jlora.DiffLeaf) for b in biases)
    loaded = R.torch_model_with_lora(ref, lora_bias["path"])
    for scale in (1.0, 0.6):
        expected = R.torch_forward(model, ref, scale=scale)
        assert np.abs(R.torch_forward(loaded, ref, scale=scale) - expected).max() <= 1e-5 * np.abs(expected).max()
        assert_forward(ref, adapter, scale, expected)
    assert_fused(ref, adapter, FUSE_SCALE, LR.peft_merged_state_dict(model, FUSE_SCALE))
