"""LyCORIS algorithms beyond LoRA/LoHa/LoKr, checked against LyCORIS 4.1.3 itself.

Reference: LyCORIS's own torch modules. Each case builds a network with LyCORIS's kohya wrapper
(`lycoris.kohya.create_network(..., unet=<diffusers UNet>, text_encoder=<CLIP>)`) on copies of the tiny
torch models of tests/reference.py, randomises every adapter parameter (LyCORIS starts its up factors,
OFT blocks and IA3 weights at zero), writes the file with LyCORIS's `save_weights`, and runs the torch
forward with the network applied at multiplier `s` (`set_multiplier`). jlora loads the same file with
`jlora.load_lora_weights`, merges with `jax.jit(jlora.apply)` at a traced scale `s`, and runs the Flax
forward. Tolerance as in shared/TESTING.md: max|Δ| ≤ 1e-3 · max|effect|, with a large effect.

Algorithms: IA3 (per output and per input channel), GLoRA (Linear, Conv, Tucker), diagonal OFT (with
and without `rescale`, with a constraint), BOFT, trained norms (`w_norm`/`b_norm`), DoRA on LoHa and
LoKr, T-LoRA (its base half recomputed from the params, as LyCORIS does when it loads a file). Fuse/unfuse round trips (IA3/GLoRA/OFT/BOFT are undone by their exact inverse) and the
per-module report are checked too.
"""

import copy
import dataclasses
import functools
import os

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")  # LyCORIS's eager bodies, no torch.compile on CPU

import jax
import numpy as np
import pytest
import torch

import jlora
import reference as R

pytest.importorskip("lycoris", reason="lycoris-lora (test extra) is the reference for these algorithms")

MIN_EFFECT = 0.3
SCALES = (1.0, 0.6)
FUSE_SCALE = 0.7

UNET_TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # Linear 32 -> 32
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",  # Linear (cross attention)
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",  # Linear 128 -> 32
    "down_blocks.0.attentions.0.proj_in",  # Conv 1x1
    "down_blocks.0.resnets.0.conv1",  # Conv 3x3
    "up_blocks.1.resnets.0.conv1",  # Conv 3x3, 96 -> 32
    "down_blocks.0.resnets.0.norm1",  # GroupNorm (train_norm only)
    "down_blocks.0.attentions.0.transformer_blocks.0.norm1",  # LayerNorm (train_norm only)
)
TE_TARGETS = (
    "text_model.encoder.layers.0.self_attn.q_proj",  # Linear 32 -> 32
    "text_model.encoder.layers.1.mlp.fc1",  # Linear 32 -> 64
    "text_model.encoder.layers.0.layer_norm1",  # LayerNorm (train_norm only)
)


def _exact(names):
    return [n.replace(".", r"\.") + "$" for n in names]


PRESET = {
    "enable_conv": True,
    "unet_target_module": [],
    "unet_target_name": _exact(UNET_TARGETS),
    "text_encoder_target_module": [],
    "text_encoder_target_name": _exact(TE_TARGETS),
}

# LyCORIS networks, each mixing algorithms per module through LyCORIS's own name -> algo map:
# name: (default algo, {module regex: options}, network options, {module: expected report algorithm})
NETWORKS = {
    "mixed": (
        "ia3",
        {
            r".*attn2\.to_k$": {"algo": "glora"},
            r".*ff\.net\.2$": {"algo": "boft", "rescaled": True},
            r".*attentions\.0\.proj_in$": {"algo": "diag-oft", "rescaled": True, "constraint": 0.02},
            r"down_blocks\.0\.resnets\.0\.conv1$": {"algo": "glora"},
            r"up_blocks\.1\.resnets\.0\.conv1$": {"algo": "ia3", "train_on_input": True},
            r".*self_attn\.q_proj$": {"algo": "diag-oft"},
            r".*mlp\.fc1$": {"algo": "glora"},
        },
        {"train_norm": True},
        {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "ia3",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "glora",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "boft+rescaled",
            "down_blocks.0.attentions.0.proj_in": "diag-oft+rescaled",
            "down_blocks.0.resnets.0.conv1": "glora",
            "up_blocks.1.resnets.0.conv1": "ia3",
            "down_blocks.0.resnets.0.norm1": "norm",
            "down_blocks.0.attentions.0.transformer_blocks.0.norm1": "norm",
            "text_model.encoder.layers.0.self_attn.q_proj": "diag-oft",
            "text_model.encoder.layers.1.mlp.fc1": "glora",
            "text_model.encoder.layers.0.layer_norm1": "norm",
        },
    ),
    "dora": (
        "loha",
        {
            r".*attn2\.to_k$": {"algo": "lokr", "factor": 4, "decompose_both": True},
            r".*ff\.net\.2$": {"algo": "lokr", "factor": 4, "wd_on_out": False},
            r"up_blocks\.1\.resnets\.0\.conv1$": {"wd_on_out": False},
            r".*mlp\.fc1$": {"algo": "lokr", "factor": 8},
        },
        {"dora_wd": True},
        {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "loha+dora",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "lokr+dora",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "lokr+dora",
            "down_blocks.0.attentions.0.proj_in": "loha+dora",
            "down_blocks.0.resnets.0.conv1": "loha+dora",
            "up_blocks.1.resnets.0.conv1": "loha+dora",
            "text_model.encoder.layers.0.self_attn.q_proj": "loha+dora",
            "text_model.encoder.layers.1.mlp.fc1": "lokr+dora",
        },
    ),
}
NETWORKS["tlora"] = (
    "tlora",  # T-LoRA: Linear layers and 1x1 convs; the 3x3 convs get LoCon
    {r".*resnets\.0\.conv1$": {"algo": "lora"}},
    {},
    {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "tlora",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "tlora",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "tlora",
        "down_blocks.0.attentions.0.proj_in": "tlora",
        "down_blocks.0.resnets.0.conv1": "locon",
        "up_blocks.1.resnets.0.conv1": "locon",
        "text_model.encoder.layers.0.self_attn.q_proj": "tlora",
        "text_model.encoder.layers.1.mlp.fc1": "tlora",
    },
)
COMPONENTS = ("unet", "text_encoder")
STD = {"mixed": 0.6, "dora": 0.5, "tlora": 0.8}


@functools.lru_cache(maxsize=None)
def _refs():
    return {"unet": R.build_sd15_unet(), "text_encoder": R.build_clip_text()}


def _randomise(net, seed: int, std: float):
    """Every adapter parameter random (LyCORIS initialises several to zero), per parameter kind."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "oft_blocks":
                p.copy_(0.25 * noise)
            elif leaf in ("rescale", "dora_scale"):
                p.copy_(p * (1 + 0.3 * noise))
            elif leaf in ("w_norm", "b_norm"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(std * noise)


def build_network(name: str, tmp_dir):
    """A LyCORIS network (kohya wrapper) on copies of the torch models, randomised and saved by LyCORIS."""
    from lycoris import kohya

    algo, name_map, options, _ = NETWORKS[name]
    K = kohya.LycorisNetworkKohya  # preset state lives on the class: set all of it
    K.MODULE_ALGO_MAP, K.NAME_ALGO_MAP, K.USE_FNMATCH, K.TARGET_EXCLUDE_NAME = {}, copy.deepcopy(name_map), False, []
    models = {c: copy.deepcopy(ref.torch_model) for c, ref in _refs().items()}
    kohya.PRESET["jlora-test"] = PRESET
    try:
        net = kohya.create_network(1.0, 4, 2.0, None, models["text_encoder"], models["unet"], algo=algo,
                                   preset="jlora-test", **options)
    finally:
        del kohya.PRESET["jlora-test"]
        K.NAME_ALGO_MAP = {}
    net.apply_to(models["text_encoder"], models["unet"], True, True)
    _randomise(net, seed=sum(map(ord, name)), std=STD[name])
    path = tmp_dir / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, None)
    return dict(net=net, models=models, path=path)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_network(name, tmp_path_factory.mktemp(name))
            built[name]["adapters"], built[name]["report"] = _load(built[name]["path"])
        return built[name]

    return get


_apply = jax.jit(jlora.apply, static_argnames=("dora_strength",))


def _load(path):
    params = {c: _refs()[c].flax_params for c in COMPONENTS}
    adapters, report = jlora.load_lora_weights(path, params, return_report=True)
    assert not report.unmatched and not report.unplaced and not report.skipped, report.summary()
    return adapters, report


def _lycoris_out(case, component, scale):
    case["net"].set_multiplier(scale)
    try:
        return R.torch_forward(case["models"][component], _refs()[component])
    finally:
        case["net"].set_multiplier(1.0)


@functools.lru_cache(maxsize=None)
def _base_out(component):
    ref = _refs()[component]
    return R.torch_forward(ref.torch_model, ref)


def _check(ref, got, want, what):
    base = _base_out(ref.component)
    effect = np.abs(want - base).max()
    assert effect >= MIN_EFFECT * np.abs(base).max(), f"{what}: effect {effect:.3g} too small to test anything"
    err = np.abs(got - want).max()
    assert err <= 1e-3 * effect, f"{what}: max|Δ| {err:.3g} vs effect {effect:.3g}"
    return err, effect


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_forward_matches_lycoris(networks, name):
    """Reference: LyCORIS's torch forward with its network applied at multiplier s (DoRA: jlora with
    dora_strength="lycoris", LyCORIS's own strength rule)."""
    case = networks(name)
    strength = "lycoris" if name == "dora" else None
    for component in COMPONENTS:
        ref = _refs()[component]
        for scale in SCALES:
            got = R.flax_forward(ref, _apply(ref.flax_params, case["adapters"][component], scale, dora_strength=strength))
            _check(ref, got, _lycoris_out(case, component, scale), f"{name} {component} s={scale}")


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_report_names_each_algorithm(networks, name):
    """Every module LyCORIS wrote is placed, and the report names its algorithm."""
    case = networks(name)
    expected = NETWORKS[name][3]
    placed = {p.module: p.algorithm for p in case["report"].placed if not p.path.endswith("bias")}
    assert placed == expected
    n_lycoris = len(case["net"].unet_loras) + len(case["net"].text_encoder_loras)
    assert n_lycoris == len(expected)


# --------------------------------------------------------------------------------------------
# Fused weights and the way back
# --------------------------------------------------------------------------------------------


def _flat(tree):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _module_names(model):
    return {n.replace(".", "_"): n for n, _ in model.named_modules()}


def _lycoris_merged_state_dict(case, component, scale):
    """The torch state dict with each adapted weight (and norm bias) as LyCORIS's `get_merged_weight` gives it."""
    net, model = case["net"], case["models"][component]
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    loras = net.unet_loras if component == "unet" else net.text_encoder_loras
    names = _module_names(_refs()[component].torch_model)
    sd = {k: v.clone() for k, v in _refs()[component].torch_model.state_dict().items()}
    with torch.no_grad():
        for lora in loras:
            module = names[lora.lora_name[len(prefix):]]
            weight, bias = lora.get_merged_weight(multiplier=scale)
            sd[f"{module}.weight"] = weight.reshape(sd[f"{module}.weight"].shape)
            if bias is not None:
                sd[f"{module}.bias"] = bias
    return sd


@pytest.mark.parametrize("name", ["mixed", "tlora"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_fused_weights_match_lycoris_merge(networks, component, name):
    """Reference: LyCORIS's `get_merged_weight(multiplier)` per module (IA3, GLoRA, OFT, BOFT, norms,
    T-LoRA, whose delta subtracts the truncated SVD of the base weight LyCORIS computed; its LoHa/LoKr
    merge is the one with the double alpha, so DoRA is checked by forward only)."""
    case, ref = networks(name), _refs()[component]
    want = _flat(R.torch_state_dict_to_flax(ref, _lycoris_merged_state_dict(case, component, FUSE_SCALE)))
    got = _flat(jlora.fuse(ref.flax_params, case["adapters"][component], FUSE_SCALE))
    base = _flat(ref.flax_params)
    changed = 0
    for k, w in want.items():
        err = np.abs(got[k] - w).max()
        assert err <= 1e-5 * max(np.abs(w).max(), 1e-6), f"{k}: {err:.3g} vs max {np.abs(w).max():.3g}"
        changed += not np.array_equal(base[k], w)
    assert changed == jlora.count(case["adapters"][component]) > 0


@pytest.mark.parametrize("component", COMPONENTS)
def test_unfuse_inverts_multiplicative_fuse(networks, component):
    """IA3 / GLoRA / OFT / BOFT fusing is undone by each leaf's exact inverse (no kept copy); additive
    norm diffs by subtraction. Reference: the params before fusing."""
    case, ref = networks("mixed"), _refs()[component]
    adapter = case["adapters"][component]
    kinds = {type(l).__name__ for l in jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf) if l is not None}
    assert kinds >= ({"Ia3Leaf", "GloraLeaf", "OftLeaf", "BoftLeaf", "DiffLeaf"} if component == "unet"
                     else {"OftLeaf", "GloraLeaf", "DiffLeaf"})
    fused, record = jlora.fuse(ref.flax_params, adapter, FUSE_SCALE, return_record=True)
    for restored in (jlora.unfuse(fused, record), jax.jit(jlora.unfuse)(fused, adapter, FUSE_SCALE)):
        base, back, moved = _flat(ref.flax_params), _flat(restored), _flat(fused)
        for k in base:
            assert np.abs(back[k] - base[k]).max() <= 1e-5 * max(np.abs(base[k]).max(), np.abs(moved[k]).max()), k
        assert sum(not np.array_equal(moved[k], base[k]) for k in base) == jlora.count(adapter)


def test_multiplicative_leaves_do_not_combine(networks):
    case = networks("mixed")
    with pytest.raises(jlora.errors.InvalidAdapterError, match="multiplicative"):
        jlora.combine([case["adapters"]["unet"], case["adapters"]["unet"]])


# --------------------------------------------------------------------------------------------
# DoRA strength: ComfyUI's blend (jlora's default for dora_scale files) and LyCORIS's rule
# --------------------------------------------------------------------------------------------


def _comfyui_dora_state_dict(case, component, scale):
    """ComfyUI / A1111: `W + s * (m * V / ||V|| - W)`, `V = W + dW`, the norm over every axis but the
    magnitude's; dW is LyCORIS's own rebuilt delta (`get_weight(shape)`, what its forward adds)."""
    net = case["net"]
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    loras = net.unet_loras if component == "unet" else net.text_encoder_loras
    names = _module_names(_refs()[component].torch_model)
    sd = {k: v.clone() for k, v in _refs()[component].torch_model.state_dict().items()}
    with torch.no_grad():
        for lora in loras:
            key = f"{names[lora.lora_name[len(prefix):]]}.weight"
            w = sd[key]
            v = w + lora.get_weight(lora.shape).reshape(w.shape)
            m = lora.dora_scale
            axes = tuple(i for i, n in enumerate(m.shape) if n == 1) + tuple(range(m.ndim, v.ndim))
            m = m.reshape(m.shape + (1,) * (v.ndim - m.ndim))
            sd[key] = w + scale * (m * v / (v * v).sum(dim=axes, keepdim=True).sqrt() - w)
    return sd


@pytest.mark.parametrize("component", COMPONENTS)
def test_dora_strength_conventions(networks, component):
    """Default (`dora_strength=None` = "comfyui" for dora_scale files) against ComfyUI's formula in torch;
    "lycoris" against LyCORIS's forward (test_forward_matches_lycoris); the two differ at s != 1, and
    fuse takes the option too."""
    case, ref = networks("dora"), _refs()[component]
    adapter, scale = case["adapters"][component], SCALES[1]
    leaves = [l for l in jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf) if l is not None]
    assert {type(l) for l in leaves} == {jlora.LohaLeaf, jlora.LokrLeaf} and all(l.magnitude is not None for l in leaves)
    comfy = R.torch_forward(_torch_model(ref, _comfyui_dora_state_dict(case, component, scale)), ref)
    got = R.flax_forward(ref, _apply(ref.flax_params, adapter, scale))
    _, effect = _check(ref, got, comfy, f"comfyui {component}")
    lycoris = _lycoris_out(case, component, scale)
    assert np.abs(lycoris - comfy).max() > 0.05 * effect  # the conventions differ, so each test can fail
    fused = jlora.fuse(ref.flax_params, adapter, scale, dora_strength="lycoris")
    _check(ref, R.flax_forward(ref, fused), lycoris, f"fused lycoris {component}")


def _torch_model(ref, state_dict):
    model = copy.deepcopy(ref.torch_model)
    model.load_state_dict(state_dict)
    return model


# --------------------------------------------------------------------------------------------
# Saving LoHa / LoKr for LyCORIS
# --------------------------------------------------------------------------------------------


def _without_magnitude(adapter):
    def strip(leaf):
        return None if leaf is None else dataclasses.replace(leaf, magnitude=None)

    return jax.tree.map(strip, adapter, is_leaf=jlora.is_adapter_leaf)


def _per_output_dora_only(adapter):
    def keep(leaf):
        return leaf if leaf is None or leaf.magnitude.shape[-1] > 1 else None

    return jax.tree.map(keep, adapter, is_leaf=jlora.is_adapter_leaf)


@pytest.mark.parametrize("dora", [True, False], ids=["dora", "plain"])
def test_saved_loha_lokr_reload_in_lycoris(networks, tmp_path, dora):
    """jlora writes LoHa / LoKr leaves (with and without DoRA magnitudes) with
    `save_lora_weights(format="kohya")`; LyCORIS's own loader (`kohya.create_network_from_weights`) reads the
    file onto fresh torch models. Reference: that network's torch forward (multiplier s; DoRA at s = 1, where
    the strength conventions agree) against jlora's forward of the leaves it saved."""
    from lycoris import kohya

    case = networks("dora")
    adapters = {c: case["adapters"][c] if dora else _without_magnitude(case["adapters"][c]) for c in COMPONENTS}
    if dora:  # LyCORIS's loader always makes per-output dora_scale, so it cannot read per-input ones (its own files too)
        adapters = {c: _per_output_dora_only(a) for c, a in adapters.items()}
    path = jlora.save_lora_weights(tmp_path, adapters, format="kohya")
    models = {c: copy.deepcopy(ref.torch_model) for c, ref in _refs().items()}
    net, _ = kohya.create_network_from_weights(1.0, path, None, models["text_encoder"], models["unet"])
    net.apply_to(models["text_encoder"], models["unet"], True, True)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == sum(map(jlora.count, adapters.values())) >= 6
    reloaded = dict(net=net, models=models)
    for component in COMPONENTS:
        ref = _refs()[component]
        for scale in (1.0,) if dora else SCALES:
            got = R.flax_forward(ref, _apply(ref.flax_params, adapters[component], scale, dora_strength="lycoris"))
            _check(ref, got, _lycoris_out(reloaded, component, scale), f"saved {component} s={scale}")


# --------------------------------------------------------------------------------------------
# Malformed modules: reported one by one with strict=False, typed errors otherwise
# --------------------------------------------------------------------------------------------

BROKEN = {
    # module key prefix -> (tensor suffix, how it is broken, text the reason names)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": ("a2.weight", lambda t: t[:, :-1], "GLoRA"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2": ("oft_blocks", lambda t: t[..., :-1], "square"),
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("rescale", lambda t: t[:-2], "rescale"),
    "lora_unet_up_blocks_1_resnets_0_conv1": ("on_input", lambda t: torch.tensor(3), "on_input"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ("weight", lambda t: t[:-4], "output channels"),
}


def _refused_then_reported(tensors, path, error, match):
    """Save `tensors` to `path`; loading it strictly raises `error` (matching `match`), and with
    strict=False warns and returns `(adapters, report)`."""
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    params = {c: _refs()[c].flax_params for c in COMPONENTS}
    with pytest.raises(error, match=match):
        jlora.load_lora_weights(path, params)
    with pytest.warns(UserWarning):
        return jlora.load_lora_weights(path, params, strict=False, return_report=True)


def test_malformed_modules_are_reported_and_the_rest_loads(networks, tmp_path):
    """One broken module per new kind (GLoRA factors that do not chain, non-square OFT blocks, a rescale of
    the wrong size, an IA3 on_input that is not 0/1, an IA3 weight that does not fit its layer): strict=False
    reports each (key, shapes, reason) and loads every other module; strict=True raises a typed error."""
    from safetensors.torch import load_file

    tensors = load_file(str(networks("mixed")["path"]))
    for prefix, (suffix, breaks, _) in BROKEN.items():
        key = f"{prefix}.{suffix}"
        tensors[key] = breaks(tensors[key]).contiguous()
    adapters, report = _refused_then_reported(tensors, tmp_path / "broken.safetensors", jlora.errors.JloraError, None)
    for prefix, (suffix, _, reason) in BROKEN.items():
        key = f"{prefix}.{suffix}"
        module_keys = {k for k in tensors if k.startswith(prefix + ".")}
        assert module_keys <= set(report.malformed) | set(report.unplaced), (key, report.summary())
        why = {**report.unplaced, **report.malformed}[key]
        assert reason in why and key.split(".")[0] in why, why
    expected = len(NETWORKS["mixed"][3]) - len(BROKEN)
    assert len({p.module for p in report.placed}) == expected
    assert sum(map(jlora.count, adapters.values())) == jlora.count(networks("mixed")["adapters"]["unet"]) + \
        jlora.count(networks("mixed")["adapters"]["text_encoder"]) - len(BROKEN)


def test_tlora_on_a_3x3_conv_is_reported_and_the_rest_loads(networks, tmp_path):
    """LyCORIS 4.1.3 builds T-LoRA on a 3x3 conv with 1x1 factors (q_layer (r, in, 1, 1)) that its own
    forward cannot add to the layer's output; jlora names the module and the shapes instead of guessing."""
    from safetensors.torch import load_file

    tensors = load_file(str(networks("tlora")["path"]))
    prefix = "lora_unet_down_blocks_0_resnets_0_conv1"
    for k in [k for k in tensors if k.startswith(prefix + ".")]:
        del tensors[k]
    gen = torch.Generator().manual_seed(3)
    tensors.update({
        f"{prefix}.q_layer.weight": torch.randn(4, 32, 1, 1, generator=gen),
        f"{prefix}.p_layer.weight": torch.randn(32, 4, 1, 1, generator=gen),
        f"{prefix}.lambda_layer": torch.rand(1, 4, generator=gen),
        f"{prefix}.alpha": torch.tensor(2.0),
    })
    adapters, report = _refused_then_reported(tensors, tmp_path / "tlora_conv3x3.safetensors",
                                              jlora.errors.ShapeMismatchError, f"{prefix}.q_layer.weight.*3x3 conv")
    assert {k for k in report.malformed} == {k for k in tensors if k.startswith(prefix + ".")}
    want = sum(map(jlora.count, networks("tlora")["adapters"].values())) - 1
    assert sum(map(jlora.count, adapters.values())) == want


def test_tlora_factors_that_do_not_chain_are_refused(networks, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(networks("tlora")["path"]))
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lambda_layer"
    tensors[key] = tensors[key][:, :-1].contiguous()
    _, report = _refused_then_reported(tensors, tmp_path / "tlora_bad.safetensors", jlora.errors.InvalidAdapterError,
                                       r"T-LoRA factors do not chain.*lambda_layer \(1, 3\)")
    assert key in report.malformed


def test_tlora_onto_shape_only_params_is_refused(networks):
    """T-LoRA needs the base weight's values; params that hold only shapes get a typed error, not a crash."""
    params = {c: jax.eval_shape(lambda p: p, _refs()[c].flax_params) for c in COMPONENTS}
    with pytest.raises(jlora.errors.InvalidAdapterError, match=r"q_layer\.weight.*truncated SVD.*only its shape"):
        jlora.load_lora_weights(networks("tlora")["path"], params)


def test_glora_tucker_matches_lycoris_formula(networks, tmp_path):
    """GLoRA with a Tucker core `bm.weight` (LyCORIS 4.1.3 reads it but its network never makes one: its
    `use_tucker` test needs a 1x1 and a larger kernel at once). Reference: LyCORIS's own GLoRA weight
    function `lycoris.modules.glora._glora_weight` on the same tensors, W + s * that."""
    from lycoris.modules.glora import _glora_weight
    from safetensors.torch import load_file, save_file

    module = "down_blocks.0.resnets.0.conv1"
    prefix = "lora_unet_" + module.replace(".", "_")
    tensors = {k: v for k, v in load_file(str(networks("mixed")["path"])).items() if k.startswith(prefix + ".")}
    gen = torch.Generator().manual_seed(3)
    r, n_in = tensors[f"{prefix}.b2.weight"].shape[:2]
    tensors[f"{prefix}.b2.weight"] = 0.5 * torch.randn((r, n_in, 1, 1), generator=gen)
    tensors[f"{prefix}.bm.weight"] = 0.5 * torch.randn((r, r, 3, 3), generator=gen)
    path = tmp_path / "glora_tucker.safetensors"
    save_file(tensors, str(path))
    ref = _refs()["unet"]
    adapter, report = jlora.load_lora(path, ref.flax_params, "unet", return_report=True)
    assert [p.algorithm for p in report.placed] == ["glora+tucker"]
    w = ref.torch_model.state_dict()[f"{module}.weight"]
    t = {k.split(".", 1)[1]: v for k, v in tensors.items()}
    gamma = float(t["alpha"]) / r
    delta = _glora_weight(w, t["a1.weight"], t["a2.weight"], t["b1.weight"], t["b2.weight"], t["bm.weight"], gamma)
    sd = dict(ref.torch_model.state_dict())
    sd[f"{module}.weight"] = w + FUSE_SCALE * delta
    want = _flat(R.torch_state_dict_to_flax(ref, sd))
    got = _flat(jlora.fuse(ref.flax_params, adapter, FUSE_SCALE))
    key = "['down_blocks_0']['resnets_0']['conv1']['kernel']"
    assert np.abs(got[key] - want[key]).max() <= 1e-5 * np.abs(want[key]).max()
    assert np.abs(want[key] - _flat(ref.flax_params)[key]).max() > 0.1 * np.abs(want[key]).max()


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_adapter_file_round_trip(networks, tmp_path, name):
    """jlora's own adapter files keep the new leaves (static kernel shapes, DoRA magnitudes and strength):
    saved and loaded back, every leaf kind, static field and array is the same."""
    case = networks(name)
    path = jlora.save_adapters(tmp_path / "a.safetensors", case["adapters"])
    # fresh fp32 params from the torch models (the cached refs' Flax trees are shared by every module)
    params = {c: R.torch_state_dict_to_flax(_refs()[c], _refs()[c].torch_model.state_dict()) for c in COMPONENTS}
    back = jlora.load_adapters(path, params)
    for c in COMPONENTS:
        assert jax.tree.structure(back[c]) == jax.tree.structure(case["adapters"][c])  # kinds and static fields
        pairs = zip(jax.tree.leaves(back[c]), jax.tree.leaves(case["adapters"][c]))
        for x, y in pairs:  # scalars come back as (1,)
            np.testing.assert_array_equal(np.ravel(x), np.ravel(y), err_msg=f"{c}: {np.asarray(x).dtype}")
