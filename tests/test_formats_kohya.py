"""kohya / A1111, sd-scripts SDXL (sgm block names), LoCon and old diffusers attention-processor LoRA
files on tiny SD-1.5 and SDXL shaped models, against diffusers 0.35.2 + PEFT in PyTorch.

The files are written by ``sd_formats`` from seeded PEFT factors. Two references:

* diffusers: ``<Mixin>.lora_state_dict`` (diffusers' own kohya / sgm / old-format converters) +
  ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` on a deep copy of the torch model, torch
  forward with the call scale. Before it is used, the test checks that diffusers injected exactly the
  file's modules with the scaling the format defines (alpha / r; a missing alpha means alpha = r).
* format math: ``W + s * alpha / r * up @ down`` added to the torch weights (torch forward, or the
  weights converted to the Flax layout), for what diffusers 0.35.2 reads wrongly or not at all.

jlora: ``load_lora_weights`` onto the Flax ports of the same weights, jitted Flax forward of
``jlora.apply(params, adapter, scale)``. Forward tolerance: max|delta| <= 1e-3 * max|LoRA effect|,
with an effect > 0.3 * max|base output|.
"""

import os

import jax
import numpy as np
import pytest
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

import jlora
import reference as R
import sd_formats as F

PIPELINES = {"sd": ("sd15_unet", "clip_text"), "sdxl": ("sdxl_unet", "clip_text", "clip_text_proj")}
MIXINS = {"sd": StableDiffusionLoraLoaderMixin, "sdxl": StableDiffusionXLLoraLoaderMixin}
SCALES = (1.0, 0.6)
SEED = 7

SAMPLERS = ("downsamplers.0.conv", "upsamplers.0.conv")
# Linear layers and 1x1 convs (SD-1.5 proj_in/proj_out, conv_shortcut): plain kohya LoRA.
UNET_LINEAR = R.ATTENTION_TARGET_MODULES + (
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "time_emb_proj",
    "conv_shortcut",
)
# LoCon: attention plus 3x3 convs (resnet conv1/conv2, down/upsamplers).
UNET_LOCON = R.ATTENTION_TARGET_MODULES + ("conv1", "conv2") + SAMPLERS
UNET_ALL = R.UNET_TARGET_MODULES + SAMPLERS
UNET_SGM_FIXED = {
    "sd": ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"),
    "sdxl": ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
    + ("add_embedding.linear_1", "add_embedding.linear_2"),
}

# rank 4 / alpha 8 (scale 2) everywhere except the rank-8 modules below, written without an
# `.alpha` key (the format's alpha = rank). diffusers 0.35.2 gives a module without an alpha the
# file's most common alpha, 8 here, so it agrees with the format on these files.
UNIFORM = dict(
    rank=4,
    alpha=8,
    rank_pattern={"to_v": 8, "ff.net.2": 8, "conv_shortcut": 8, "conv2": 8, "conv_out": 8, "v_proj": 8, "fc2": 8},
)
# Per-module alphas, and modules without alpha of two different ranks (8 and 2).
VARIED = dict(
    rank=4,
    alpha=8,
    rank_pattern={"to_v": 8, "proj_out": 2, "conv2": 8, "v_proj": 8, "fc2": 2},
    alpha_pattern={
        "to_q": 1,
        "to_k": 3,
        "proj_in": 16,
        "proj_out": 2,
        "ff.net.0.proj": 2,
        "conv1": 6,
        "time_emb_proj": 12,
        "downsamplers.0.conv": 0.5,
        "q_proj": 5,
        "fc1": 0.5,
        "fc2": 2,
        "text_projection": 3,
    },
)
OLD = dict(rank=4, alpha=4, init_scale=4.0)

# kind -> (UNet targets, text encoders in the file, factor config, unet names)
KINDS = {
    "kohya": (UNET_LINEAR, True, UNIFORM, "diffusers"),
    "kohya_alphas": (UNET_ALL, True, VARIED, "diffusers"),
    "locon": (UNET_LOCON, False, UNIFORM, "diffusers"),
    "sgm": (UNET_ALL, True, UNIFORM, "sgm"),
    "sgm_nomid": (UNET_ALL, True, UNIFORM, "sgm"),
    "sgm_fixed": (None, False, UNIFORM, "sgm"),
    "old": (R.ATTENTION_TARGET_MODULES, True, OLD, None),
}
FORMAT_NAMES = {"old": "diffusers_old"}



def refs_of(family):
    return [R.ALL_BUILDERS[n]() for n in PIPELINES[family]]


def _no_alpha_where_rank(component, module, factors):
    f = factors[component][module]
    return f.alpha == f.rank


class Files:
    """LoRA files written on first use, one per (kind, family)."""

    def __init__(self, root):
        self.root = root
        self._files = {}
        self._loads = {}

    def factors(self, kind, family):
        unet_targets, with_te, cfg, _ = KINDS[kind]
        if kind == "sgm_fixed":
            unet_targets = UNET_SGM_FIXED[family]
        out = {}
        for i, ref in enumerate(refs_of(family)):
            if not ref.is_unet and not with_te:
                continue
            targets = unet_targets if ref.is_unet else None
            if kind == "old" and ref.component == R.TEXT_ENCODER_2:
                targets = R.CLIP_TARGET_MODULES  # the old format has no text_projection
            out[ref.component] = F.peft_factors(ref, seed=SEED * 1000 + i, target_modules=targets, **cfg)
        if kind == "sgm_nomid":
            out[R.UNET] = {m: f for m, f in out[R.UNET].items() if not m.startswith("mid_block.")}
        return out

    def get(self, kind, family):
        """(path, {component: {module: Factor}})."""
        key = (kind, family)
        if key not in self._files:
            factors = self.factors(kind, family)
            path = os.path.join(self.root, f"{kind}_{family}.safetensors")
            if kind == "old":
                F.write_diffusers_old(path, factors)
            else:
                F.write_kohya(
                    path,
                    factors,
                    family,
                    omit_alpha=lambda c, m: _no_alpha_where_rank(c, m, factors),
                    unet_names=KINDS[kind][3],
                    unet_config=refs_of(family)[0].torch_model.config,
                )
            self._files[key] = (path, factors)
        return self._files[key]

    def load(self, kind, family, format=None):
        """jlora's (adapters, report) for the file, all of the family's components given."""
        key = (kind, family, format)
        if key not in self._loads:
            path, _ = self.get(kind, family)
            params = {ref.component: ref.flax_params for ref in refs_of(family)}
            self._loads[key] = jlora.load_lora_weights(path, params, family=family, return_report=True, format=format)
        return self._loads[key]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return Files(str(tmp_path_factory.mktemp("kohya_formats")))


def _ref(family, component):
    return next(r for r in refs_of(family) if r.component == component)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def diffusers_model(ref, path, family, factors, unet_config=None):
    """``ref``'s torch model with the file loaded by diffusers' own converters and loaders, after
    checking that diffusers injected exactly ``factors``' modules with scaling alpha / r."""
    import copy

    from peft.tuners.lora import LoraLayer

    mixin = MIXINS[family]
    kwargs = {"unet_config": unet_config} if unet_config is not None else {}
    state_dict, network_alphas, metadata = mixin.lora_state_dict(
        os.path.dirname(path), weight_name=os.path.basename(path), return_lora_metadata=True, **kwargs
    )
    model = copy.deepcopy(ref.torch_model)
    if ref.is_unet:
        mixin.load_lora_into_unet(state_dict, network_alphas, model, adapter_name="default", metadata=metadata)
    else:
        mixin.load_lora_into_text_encoder(
            state_dict, network_alphas, model, prefix=ref.component, adapter_name="default", metadata=metadata
        )
    model.eval()
    got = {
        n: (m.r["default"], float(m.scaling["default"]))
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.r
    }
    assert got.keys() == factors.keys(), "diffusers did not inject exactly the file's modules"
    wrong = {
        n: got[n] for n, f in factors.items() if got[n][0] != f.rank or not np.isclose(got[n][1], f.alpha / f.rank)
    }
    assert not wrong, f"diffusers does not read these modules as the format defines them: {wrong}"
    return model


_apply = jax.jit(jlora.apply)
_FORWARDS = {}


def _step(ref):
    """Jitted ``jlora.apply(params, adapter, scale)`` (scale traced) feeding the jitted Flax forward;
    the forward compiles once per model, whatever the adapter."""
    if ref.name not in _FORWARDS:
        _FORWARDS[ref.name] = jax.jit(R.flax_apply_fn(ref))
    forward = _FORWARDS[ref.name]
    return lambda p, a, s, inputs: forward(_apply(p, a, s), **inputs)


def assert_forward_matches(ref, adapter, expected_at):
    """jlora's jitted forward at each scale against ``expected_at(scale)`` (torch output)."""
    base = R.torch_forward(ref.torch_model, ref)
    step = _step(ref)
    for scale in SCALES:
        expected = expected_at(scale)
        effect = np.abs(expected - base).max()
        assert effect > 0.3 * np.abs(base).max(), ("LoRA effect too small for a meaningful test", scale, effect)
        got = np.asarray(step(ref.flax_params, adapter, scale, ref.inputs))
        err = np.abs(got - expected).max()
        assert err <= 1e-3 * effect, (scale, err, effect)


def assert_fused_matches(ref, adapter, factors, scale):
    """``jlora.fuse`` against W + s * alpha / r * up @ down (torch weights -> Flax layout)."""
    fused = dict(jax.tree_util.tree_flatten_with_path(jlora.fuse(ref.flax_params, adapter, scale=scale))[0])
    want = dict(jax.tree_util.tree_flatten_with_path(F.flax_params_with_deltas(ref, factors, scale))[0])
    base = dict(jax.tree_util.tree_flatten_with_path(ref.flax_params)[0])
    assert fused.keys() == want.keys()
    changed = 0
    for k, w in want.items():
        g = np.asarray(fused[k])
        assert np.abs(g - w).max() <= 1e-5 * max(np.abs(w).max(), 1e-6), jax.tree_util.keystr(k)
        changed += not np.array_equal(np.asarray(base[k]), w)
    assert changed == len(factors) == jlora.count(adapter)


# --------------------------------------------------------------------------------------------
# Every key placed, counts
# --------------------------------------------------------------------------------------------

COUNT_CASES = [
    pytest.param(kind, family, id=f"{kind}-{family}")
    for kind in KINDS
    for family in PIPELINES
]


@pytest.mark.parametrize("kind,family", COUNT_CASES)
def test_every_key_placed_and_counted(files, kind, family):
    path, factors = files.get(kind, family)
    adapters, report = files.load(kind, family)
    assert report.format == FORMAT_NAMES.get(kind, "kohya")
    assert not report.unmatched and not report.unplaced and not report.skipped
    assert report.loaded_keys == sorted(jlora.lora_state_dict(path))
    for ref in refs_of(family):
        assert jlora.count(adapters[ref.component]) == len(factors.get(ref.component, {}))
    assert report.counts() == {c: len(m) for c, m in factors.items()}
    # each placed module carries the file's rank and the format's alpha (missing alpha -> rank)
    by_path = {(p.component, p.module): p for p in report.placed}
    for component, mods in factors.items():
        for module, f in mods.items():
            placed = by_path[(component, module)]
            assert (placed.rank, placed.alpha) == (f.rank, f.alpha), (component, module)


def test_files_have_modules_without_alpha(files):
    """The kohya files really mix present and missing alphas (and alpha != rank where present)."""
    for kind, family in (("kohya", "sdxl"), ("kohya_alphas", "sd"), ("locon", "sd"), ("sgm", "sdxl")):
        path, factors = files.get(kind, family)
        keys = set(jlora.lora_state_dict(path))
        downs = {k[: -len(".lora_down.weight")] for k in keys if k.endswith(".lora_down.weight")}
        with_alpha = {d for d in downs if f"{d}.alpha" in keys}
        assert 0 < len(with_alpha) < len(downs), kind
        ranks_without = {f.rank for mods in factors.values() for f in mods.values() if f.alpha == f.rank}
        assert ranks_without, kind
        assert any(f.alpha != f.rank for mods in factors.values() for f in mods.values())
    _, factors = files.get("kohya_alphas", "sd")
    assert {f.rank for mods in factors.values() for f in mods.values() if f.alpha == f.rank} == {2, 8}
    _, factors = files.get("locon", "sd")
    assert any(f.down.ndim == 4 and f.down.shape[2:] == (3, 3) for f in factors[R.UNET].values())


# --------------------------------------------------------------------------------------------
# Forward parity
# --------------------------------------------------------------------------------------------

DIFFUSERS_CASES = [
    (kind, family, name)
    for kind in ("kohya", "old")
    for family, names in PIPELINES.items()
    for name in names
] + [("locon", family, PIPELINES[family][0]) for family in PIPELINES]


@pytest.mark.parametrize("kind,family,name", DIFFUSERS_CASES)
def test_forward_matches_diffusers(files, kind, family, name):
    """Reference: diffusers' kohya / old-format converters and loaders, torch forward with the call scale."""
    ref = R.ALL_BUILDERS[name]()
    path, factors = files.get(kind, family)
    adapters, _ = files.load(kind, family)
    model = diffusers_model(ref, path, family, factors[ref.component])
    assert_forward_matches(ref, adapters[ref.component], lambda s: R.torch_forward(model, ref, scale=s))


@pytest.mark.parametrize("family,name", [(f, n) for f, names in PIPELINES.items() for n in names])
def test_per_module_alphas_forward_matches_format_math(files, family, name):
    """Per-module alphas and alpha-less modules of ranks 8 and 2. Reference: the format's math,
    W + s * alpha / r * up @ down on the torch weights, torch forward. Not diffusers: 0.35.2 keys the
    alphas of attention modules by their converted key (``...attn1.processor.to_q_lora.down.weight.alpha``,
    ``...self_attn.to_q_lora...``), so their alpha_pattern entries match no module and they get the
    file's most common alpha; and it gives modules without an alpha that most common alpha, not their rank."""
    ref = R.ALL_BUILDERS[name]()
    _, factors = files.get("kohya_alphas", family)
    adapters, _ = files.load("kohya_alphas", family)
    mods = factors[ref.component]
    assert len({f.alpha / f.rank for f in mods.values()}) >= 3
    assert_forward_matches(
        ref, adapters[ref.component], lambda s: R.torch_forward(F.torch_model_with_deltas(ref, mods, s), ref)
    )


def test_sgm_forward_matches_diffusers(files):
    """SDXL sd-scripts names (input_blocks / output_blocks, in_layers_2, out_layers_3, emb_layers_1,
    skip_connection, input_blocks_N_0_op, output_blocks_N_2_conv) without the middle block. Reference:
    diffusers with ``unet_config`` (its ``_maybe_map_sgm_blocks_to_diffusers``)."""
    ref = R.build_sdxl_unet()
    path, factors = files.get("sgm_nomid", "sdxl")
    keys = set(jlora.lora_state_dict(path))
    for part in (
        "input_blocks_3_1_transformer_blocks_1_attn2_to_out_0",
        "input_blocks_2_0_op",
        "output_blocks_1_2_conv",
        "input_blocks_3_0_skip_connection",
        "output_blocks_3_0_emb_layers_1",
        "output_blocks_0_1_proj_in",
    ):
        assert any(k.startswith(f"lora_unet_{part}.") for k in keys), part
    adapters, _ = files.load("sgm_nomid", "sdxl")
    model = diffusers_model(ref, path, "sdxl", factors[R.UNET], unet_config=ref.torch_model.config)
    assert_forward_matches(ref, adapters[R.UNET], lambda s: R.torch_forward(model, ref, scale=s))


def test_sgm_middle_block_forward_matches_diffusers(files):
    """The full SDXL sgm file, middle block included (middle_block_0_in_layers_2,
    middle_block_1_transformer_blocks_0_attn1_to_q, middle_block_2_emb_layers_1). Reference: diffusers
    with ``unet_config``."""
    ref = R.build_sdxl_unet()
    path, factors = files.get("sgm", "sdxl")
    keys = jlora.lora_state_dict(path)
    assert any(k.startswith("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    model = diffusers_model(ref, path, "sdxl", factors[R.UNET], unet_config=ref.torch_model.config)
    adapters, _ = files.load("sgm", "sdxl")
    assert_forward_matches(ref, adapters[R.UNET], lambda s: R.torch_forward(model, ref, scale=s))


# --------------------------------------------------------------------------------------------
# Weight-level parity for sgm names (format math)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgm_nomid", "sgm_fixed"])
@pytest.mark.parametrize("family", list(PIPELINES))
def test_sgm_fused_weights_match_format_math(files, kind, family):
    """jlora's fused weights equal W + s * alpha / r * up @ down in the Flax layout. Reference: the
    format's math (diffusers 0.35.2 maps SD-1.5's output_blocks_1_1_conv, the upsampler of an up block
    without attention, to ``attentions``, and rejects input_blocks_0_0 / time_embed / label_emb / out_2)."""
    ref = _ref(family, R.UNET)
    path, factors = files.get(kind, family)
    if kind == "sgm_nomid" and family == "sd":
        assert any(k.startswith("lora_unet_output_blocks_1_1_conv.") for k in jlora.lora_state_dict(path))
    if kind == "sgm_fixed":
        keys = jlora.lora_state_dict(path)
        parts = ("input_blocks_0_0", "time_embed_0", "time_embed_2", "out_2")
        for part in parts + (("label_emb_0_0", "label_emb_0_2") if family == "sdxl" else ()):
            assert f"lora_unet_{part}.lora_down.weight" in keys, part
    adapters, _ = files.load(kind, family)
    for scale in SCALES:
        assert_fused_matches(ref, adapters[R.UNET], factors[R.UNET], scale)


def test_sgm_middle_block_fused_weights_match_format_math(files):
    """SD-1.5 shaped UNet, sgm names including middle_block_0/1/2. Reference: the format's math."""
    ref = R.build_sd15_unet()
    _, factors = files.get("sgm", "sd")
    assert any(m.startswith("mid_block.") for m in factors[R.UNET])
    adapters, _ = files.load("sgm", "sd")
    assert_fused_matches(ref, adapters[R.UNET], factors[R.UNET], 0.6)


def test_sgm_names_are_the_diffusers_files_modules(files):
    """The sgm and diffusers-named kohya files hold the same factors: jlora gives identical adapters."""
    for family in PIPELINES:
        sgm_path, sgm_factors = files.get("sgm_nomid", family)
        plain = {c: dict(m) for c, m in sgm_factors.items()}
        path = os.path.join(files.root, f"sgm_as_diffusers_{family}.safetensors")
        F.write_kohya(path, plain, family, omit_alpha=lambda c, m: _no_alpha_where_rank(c, m, plain))
        params = {ref.component: ref.flax_params for ref in refs_of(family)}
        a = files.load("sgm_nomid", family)[0]
        b = jlora.load_lora_weights(path, params, family=family)
        assert_same_adapters(a, b)


# --------------------------------------------------------------------------------------------
# Format forcing, equivalence with PEFT files
# --------------------------------------------------------------------------------------------


def assert_same_adapters(a, b):
    assert a.keys() == b.keys()
    for c in a:
        la, ta = jax.tree_util.tree_flatten(a[c])
        lb, tb = jax.tree_util.tree_flatten(b[c])
        assert ta == tb, c
        assert len(la) == len(lb), c
        for x, y in zip(la, lb):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), c


@pytest.mark.parametrize("kind", ["kohya", "locon", "old"])
@pytest.mark.parametrize("family", list(PIPELINES))
def test_forced_format_equals_detection(files, kind, family):
    name = FORMAT_NAMES.get(kind, "kohya")
    detected, report = files.load(kind, family)
    forced, forced_report = files.load(kind, family, format=name)
    assert report.format == forced_report.format == name
    assert_same_adapters(detected, forced)


@pytest.mark.parametrize("kind", ["kohya", "old"])
@pytest.mark.parametrize("family", list(PIPELINES))
def test_adapters_equal_those_of_the_peft_file(files, tmp_path, kind, family):
    """The same factors saved by diffusers' ``save_lora_weights`` from PEFT (``lora_A``/``lora_B``,
    ``lora_adapter_metadata`` with r, lora_alpha, rank_pattern) give exactly the same adapters."""
    unet_targets, _, cfg, _ = KINDS[kind]
    refs = refs_of(family)
    targets = {R.UNET: unet_targets}
    if kind == "old" and family == "sdxl":
        targets[R.TEXT_ENCODER_2] = R.CLIP_TARGET_MODULES
    peft_path = R.make_peft_lora_file(
        tmp_path, refs, pipeline=family, seed=SEED, target_modules=targets, **cfg
    )
    params = {ref.component: ref.flax_params for ref in refs}
    peft_adapters, peft_report = jlora.load_lora_weights(peft_path, params, family=family, return_report=True)
    assert peft_report.format == "peft"
    adapters, _ = files.load(kind, family)
    assert_same_adapters(adapters, peft_adapters)
    for ref in refs:
        assert jlora.count(adapters[ref.component]) > 0
