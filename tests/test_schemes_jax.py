"""LoRAs on maxdiffusion's Flux (linen) and Wan (nnx) param trees, checked at weight level against diffusers.

Reference: diffusers + PEFT in torch. A PEFT LoRA (`init_lora_weights=False`) is saved with the family's
LoraLoaderMixin, loaded back with its `lora_state_dict` + `load_lora_into_transformer` and fused with
`fuse_lora(lora_scale=s)`. The base and the fused torch weights both go through the converters below,
which build maxdiffusion's trees the way its checkpoint loaders do (`models/flux/util.py:load_flow_model`,
`models/wan/wan_utils.py:load_wan_transformer`): maxdiffusion's module names, layers stacked on a leading
axis, q|k|v concatenated on the output axis, kernels `(in, out)`. jlora loads the same file onto the base
tree and `fuse(base, adapter, s)` must equal the converted fused tree.

The Wan trees are plain nested dicts with the paths of `nnx.State.to_pure_dict()` (what maxdiffusion's
Wan loader returns); `test_maxdiffusion_wan_on_nnx_state` loads onto the same tree as an `nnx.State` of
`nnx.Param`s. A kohya Flux file (BFL names) is checked against the format's math instead.
"""

import copy
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel, WanTransformer3DModel
from diffusers.loaders import FluxLoraLoaderMixin, WanLoraLoaderMixin
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import jlora
from converters.architectures import family_indexes
from converters.naming import detect_scheme, get_scheme
from converters.safetensors_io import save_file
from converters.schemes_jax import MAXDIFFUSION_FLUX_RULES, MAXDIFFUSION_WAN_RULES
from jlora.leaf import is_adapter_leaf
from jlora.loading import path_of, shape_index
from jlora.models import flux as jlora_flux

SCALE = 0.7

# --------------------------------------------------------------------------- torch -> maxdiffusion layout


def _numpy(state_dict) -> dict:
    return {k: v.detach().float().numpy().copy() for k, v in state_dict.items()}


def _lin(sd, name) -> dict:
    out = {"kernel": sd[f"{name}.weight"].T}
    if f"{name}.bias" in sd:
        out["bias"] = sd[f"{name}.bias"]
    return out


def _cat(sd, names) -> dict:
    """Torch Linears side by side on the output axis: one fused Flax Dense."""
    return {
        "kernel": np.concatenate([sd[f"{n}.weight"].T for n in names], axis=1),
        "bias": np.concatenate([sd[f"{n}.bias"] for n in names]),
    }


def _stack(trees: list) -> dict:
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def _scale(sd, name) -> dict:
    return {"scale": sd[f"{name}.weight"]}


def _to_maxdiffusion_flux(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    """A diffusers Flux state dict as maxdiffusion's linen `FluxTransformer2DModel` params."""

    def double(i):
        p = f"transformer_blocks.{i}"
        return {
            "img_norm1": {"lin": _lin(sd, f"{p}.norm1.linear")},
            "txt_norm1": {"lin": _lin(sd, f"{p}.norm1_context.linear")},
            "attn": {
                "i_qkv": _cat(sd, [f"{p}.attn.to_{x}" for x in "qkv"]),
                "e_qkv": _cat(sd, [f"{p}.attn.add_{x}_proj" for x in "qkv"]),
                "i_proj": _lin(sd, f"{p}.attn.to_out.0"),
                "e_proj": _lin(sd, f"{p}.attn.to_add_out"),
                "query_norm": _scale(sd, f"{p}.attn.norm_q"),
                "key_norm": _scale(sd, f"{p}.attn.norm_k"),
                "encoder_query_norm": _scale(sd, f"{p}.attn.norm_added_q"),
                "encoder_key_norm": _scale(sd, f"{p}.attn.norm_added_k"),
            },
            "img_mlp": {"layers_0": _lin(sd, f"{p}.ff.net.0.proj"), "layers_2": _lin(sd, f"{p}.ff.net.2")},
            "txt_mlp": {"layers_0": _lin(sd, f"{p}.ff_context.net.0.proj"), "layers_2": _lin(sd, f"{p}.ff_context.net.2")},
        }

    def single(i):
        p = f"single_transformer_blocks.{i}"
        return {
            "norm": {"lin": _lin(sd, f"{p}.norm.linear")},
            "lin_qkv": _cat(sd, [f"{p}.attn.to_{x}" for x in "qkv"]),
            "mlp_and_out": {"lin_mlp": _lin(sd, f"{p}.proj_mlp"), "linear2": _lin(sd, f"{p}.proj_out")},
            "attn": {"query_norm": _scale(sd, f"{p}.attn.norm_q"), "key_norm": _scale(sd, f"{p}.attn.norm_k")},
        }

    def bfl_halves(x):  # diffusers (scale, shift) -> BFL (shift, scale), as in the checkpoint maxdiffusion loads
        half = x.shape[0] // 2
        return np.concatenate([x[half:], x[:half]])

    tte = "time_text_embed"
    tree = {
        "img_in": _lin(sd, "x_embedder"),
        "txt_in": _lin(sd, "context_embedder"),
        tte: {
            "FlaxTimestepEmbedding_0": {k: _lin(sd, f"{tte}.timestep_embedder.{k}") for k in ("linear_1", "linear_2")},
            "PixArtAlphaTextProjection_0": {k: _lin(sd, f"{tte}.text_embedder.{k}") for k in ("linear_1", "linear_2")},
        },
        "scanned_double_blocks": {"FluxTransformerBlock_0": _stack([double(i) for i in range(num_layers)])},
        "scanned_single_blocks": {"FluxSingleTransformerBlock_0": _stack([single(i) for i in range(num_single_layers)])},
        "norm_out": {
            "Dense_0": {
                "kernel": bfl_halves(sd["norm_out.linear.weight"]).T,
                "bias": bfl_halves(sd["norm_out.linear.bias"]),
            }
        },
        "proj_out": _lin(sd, "proj_out"),
    }
    if f"{tte}.guidance_embedder.linear_1.weight" in sd:
        tree[tte]["FlaxTimestepEmbedding_1"] = {k: _lin(sd, f"{tte}.guidance_embedder.{k}") for k in ("linear_1", "linear_2")}
    return tree


def _to_maxdiffusion_wan(sd: dict, num_layers: int, scan_layers: bool = True) -> dict:
    """A diffusers Wan state dict as maxdiffusion's nnx `WanModel(scan_layers=...)` state, as a pure dict
    (`scan_layers=False`: `blocks` is an `nnx.List`, keyed by layer number)."""

    def attn(p):
        out = {
            "query": _lin(sd, f"{p}.to_q"),
            "key": _lin(sd, f"{p}.to_k"),
            "value": _lin(sd, f"{p}.to_v"),
            "proj_attn": _lin(sd, f"{p}.to_out.0"),
            "norm_q": _scale(sd, f"{p}.norm_q"),
            "norm_k": _scale(sd, f"{p}.norm_k"),
        }
        if f"{p}.add_k_proj.weight" in sd:
            out["add_k_proj"] = _lin(sd, f"{p}.add_k_proj")
            out["add_v_proj"] = _lin(sd, f"{p}.add_v_proj")
            out["norm_added_k"] = _scale(sd, f"{p}.norm_added_k")
        return out

    def layer_norm(p):
        return {"layer_norm": {"scale": sd[f"{p}.weight"], "bias": sd[f"{p}.bias"]}}

    def block(i):
        p = f"blocks.{i}"
        return {
            "attn1": attn(f"{p}.attn1"),
            "attn2": attn(f"{p}.attn2"),
            "norm2": layer_norm(f"{p}.norm2"),
            "ffn": {"act_fn": {"proj": _lin(sd, f"{p}.ffn.net.0.proj")}, "proj_out": _lin(sd, f"{p}.ffn.net.2")},
            "adaln_scale_shift_table": sd[f"{p}.scale_shift_table"],
        }

    ce = "condition_embedder"
    tree = {
        "patch_embedding": {"kernel": sd["patch_embedding.weight"].transpose(2, 3, 4, 1, 0), "bias": sd["patch_embedding.bias"]},
        ce: {
            "time_embedder": {k: _lin(sd, f"{ce}.time_embedder.{k}") for k in ("linear_1", "linear_2")},
            "time_proj": _lin(sd, f"{ce}.time_proj"),
            "text_embedder": {k: _lin(sd, f"{ce}.text_embedder.{k}") for k in ("linear_1", "linear_2")},
        },
        "blocks": _stack([block(i) for i in range(num_layers)]) if scan_layers else {i: block(i) for i in range(num_layers)},
        "proj_out": _lin(sd, "proj_out"),
        "scale_shift_table": sd["scale_shift_table"],
    }
    if f"{ce}.image_embedder.ff.net.0.proj.weight" in sd:
        tree[ce]["image_embedder"] = {
            "norm1": layer_norm(f"{ce}.image_embedder.norm1"),
            "ff": {"net_0": _lin(sd, f"{ce}.image_embedder.ff.net.0.proj"), "net_2": _lin(sd, f"{ce}.image_embedder.ff.net.2")},
            "norm2": layer_norm(f"{ce}.image_embedder.norm2"),
        }
    return tree


# --------------------------------------------------------------------------- tiny torch models

FLUX_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True,
)
WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
    freq_dim=16, ffn_dim=48, num_layers=3, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)
WAN_I2V = dict(image_dim=20, added_kv_proj_dim=32)
_DIM, _MLP = 32, 128  # hidden size and Flux MLP width of both tiny models


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


FLUX_TARGETS = [
    "x_embedder", "context_embedder", "linear_1", "linear_2", "norm1.linear", "norm1_context.linear",
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm.linear", "proj_mlp", "proj_out", "norm_out.linear",
]
WAN_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2",
    "time_embedder.linear_1", "time_embedder.linear_2", "time_proj", "text_embedder.linear_1", "text_embedder.linear_2",
    "image_embedder.ff.net.0.proj", "image_embedder.ff.net.2", "proj_out", "patch_embedding",
]


def _peft_file(model, mixin, directory, targets, *, seed=0, **config):
    lora = copy.deepcopy(model)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, **config)
    lora.add_adapter(cfg)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)  # a large effect, so the comparison can fail
    mixin.save_lora_weights(
        str(directory), transformer_lora_layers=get_peft_model_state_dict(lora), transformer_lora_adapter_metadata=cfg.to_dict()
    )
    return os.path.join(str(directory), "pytorch_lora_weights.safetensors")


def _diffusers_fused(model, mixin, path, scale) -> dict:
    """diffusers' fused weights: the file through `lora_state_dict` + `load_lora_into_transformer`, then `fuse_lora`."""
    ref = copy.deepcopy(model)
    state_dict, metadata = mixin.lora_state_dict(os.path.dirname(path), weight_name=os.path.basename(path), return_lora_metadata=True)
    if mixin is FluxLoraLoaderMixin:
        mixin.load_lora_into_transformer(state_dict, None, ref, metadata=metadata)
    else:
        mixin.load_lora_into_transformer(state_dict, ref, metadata=metadata)
    ref.fuse_lora(lora_scale=scale)
    fused = _numpy(ref.state_dict())
    return {k.replace(".base_layer.", "."): v for k, v in fused.items() if ".lora_" not in k}


def _flat(tree, is_leaf=None) -> dict:
    """`{path: leaf}` with jlora's path strings (an nnx Variable's `.value` is not part of the path)."""
    return {path_of(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _assert_trees_close(got, want, base, min_changed):
    """Every leaf within 1e-5 relative of the reference; at least `min_changed` leaves changed by the LoRA."""
    got, want, base = _flat(got), _flat(want), _flat(base)
    assert got.keys() == want.keys()
    changed = 0
    for path, w in want.items():
        g = np.asarray(got[path], np.float32)
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err <= 1e-5, ("/".join(path), err)
        effect = np.abs(w - base[path]).max() / np.abs(w).max()
        changed += effect > 1e-2
    assert changed >= min_changed, changed


def _load(path, tree, scheme):
    adapters, report = jlora.load_lora_weights(path, {"transformer": tree}, return_report=True)
    assert report.schemes == {"transformer": scheme}
    assert not report.unmatched and not report.unplaced and not report.skipped
    return adapters["transformer"], report


# --------------------------------------------------------------------------- Flux


MAXDIFFUSION_FLUX_KERNELS = [
    "img_in", "txt_in", *(f"time_text_embed/{m}/linear_{i}" for m in
                          ("FlaxTimestepEmbedding_0", "FlaxTimestepEmbedding_1", "PixArtAlphaTextProjection_0") for i in (1, 2)),
    *(f"scanned_double_blocks/FluxTransformerBlock_0/{m}" for m in (
        "img_norm1/lin", "txt_norm1/lin", "attn/i_qkv", "attn/e_qkv", "attn/i_proj", "attn/e_proj",
        "img_mlp/layers_0", "img_mlp/layers_2", "txt_mlp/layers_0", "txt_mlp/layers_2")),
    *(f"scanned_single_blocks/FluxSingleTransformerBlock_0/{m}" for m in (
        "norm/lin", "lin_qkv", "mlp_and_out/lin_mlp", "mlp_and_out/linear2")),
    "norm_out/Dense_0", "proj_out",
]


@pytest.fixture(scope="module")
def flux_model():
    return _randomize(FluxTransformer2DModel(**FLUX_CONFIG))


def _flux_tree(sd):
    return _to_maxdiffusion_flux(sd, FLUX_CONFIG["num_layers"], FLUX_CONFIG["num_single_layers"])


@pytest.fixture(scope="module")
def flux_base(flux_model):
    return _flux_tree(_numpy(flux_model.state_dict()))


def test_maxdiffusion_flux_fused_weights_equal_diffusers(flux_model, flux_base, tmp_path):
    path = _peft_file(flux_model, FluxLoraLoaderMixin, tmp_path, FLUX_TARGETS,
                      rank_pattern={"proj_mlp": 2, "to_k": 2}, alpha_pattern={"to_v": 3})
    adapter, report = _load(path, flux_base, "maxdiffusion_flux")
    n_modules = len({k.rsplit(".lora_", 1)[0] for k in jlora.lora_state_dict(path)})
    assert len(report.placed) == n_modules == 10 + 3 * 14 + 3 * 6
    want = _flux_tree(_diffusers_fused(flux_model, FluxLoraLoaderMixin, path, SCALE))
    fused = jlora.fuse(flux_base, adapter, SCALE)
    _assert_trees_close(fused, want, flux_base, min_changed=len(MAXDIFFUSION_FLUX_KERNELS))
    assert jlora.count(adapter) == len(MAXDIFFUSION_FLUX_KERNELS)
    D = _DIM
    paths = {p.path for p in report.placed}
    assert "scanned_double_blocks/FluxTransformerBlock_0/attn/i_qkv/kernel[2][:, 32:64]" in paths  # to_k of layer 2
    assert "scanned_single_blocks/FluxSingleTransformerBlock_0/lin_qkv/kernel[1][:, 64:96]" in paths  # to_v of layer 1
    assert "norm_out/Dense_0/kernel[:, 32:64, 0:32]" in paths  # diffusers' scale half -> maxdiffusion's second half
    leaf = adapter["scanned_double_blocks"]["FluxTransformerBlock_0"]["attn"]["i_qkv"]["kernel"]
    assert leaf.a.shape == (3, D, 4 + 2 + 4) and leaf.b.shape == (3, 10, 3 * D) and leaf.alpha.shape == (3,)


def test_scheme_rules_name_the_modules_of_the_trees(flux_base, wan_base):
    """Flux: every kernel and q/k norm scale of the tree has a rule and every rule a weight. Wan: every kernel
    (the Conv3d patch embedding included) has a rule."""
    modules = {"/".join(p[:-1]) for p in shape_index(flux_base) if p[-1] in ("kernel", "scale")}
    assert {"/".join(p[:-1]) for p in shape_index(flux_base) if p[-1] == "kernel"} == set(MAXDIFFUSION_FLUX_KERNELS)
    assert {r.path for r in MAXDIFFUSION_FLUX_RULES} == modules
    kernels = {"/".join(p[:-1]) for p in shape_index(wan_base) if p[-1] == "kernel"}
    rules = {r.path for r in MAXDIFFUSION_WAN_RULES}
    assert kernels - rules == set()
    if "image_embedder" in wan_base["condition_embedder"]:
        assert rules <= kernels


def test_maxdiffusion_flux_untouched_layers_get_zero_factors(flux_model, flux_base, tmp_path):
    targets = (r"transformer_blocks\.1\.attn\.to_k|transformer_blocks\.2\.ff\.net\.2"
               r"|single_transformer_blocks\.(0|2)\.proj_mlp|single_transformer_blocks\.2\.attn\.to_v")
    path = _peft_file(flux_model, FluxLoraLoaderMixin, tmp_path, targets, seed=4)
    adapter, report = _load(path, flux_base, "maxdiffusion_flux")
    assert len(report.placed) == 5
    D = _DIM
    double = adapter["scanned_double_blocks"]["FluxTransformerBlock_0"]
    single = adapter["scanned_single_blocks"]["FluxSingleTransformerBlock_0"]
    qkv = double["attn"]["i_qkv"]["kernel"]
    a, b = np.asarray(qkv.a), np.asarray(qkv.b)
    assert a.shape == (3, D, 4) and b.shape == (3, 4, 3 * D)
    assert not a[[0, 2]].any() and not b[[0, 2]].any() and a[1].any()
    assert not b[1][:, :D].any() and b[1][:, D : 2 * D].any() and not b[1][:, 2 * D :].any()  # to_k columns only
    mlp = single["mlp_and_out"]["lin_mlp"]["kernel"]
    assert not np.asarray(mlp.a)[1].any() and np.asarray(mlp.a)[[0, 2]].all(axis=(1, 2)).all()
    lin_qkv = single["lin_qkv"]["kernel"]
    assert not np.asarray(lin_qkv.b)[[0, 1]].any() and not np.asarray(lin_qkv.b)[2][:, : 2 * D].any()
    assert double["attn"]["e_qkv"]["kernel"] is None and adapter["proj_out"]["kernel"] is None
    assert jlora.count(adapter) == 4
    want = _flux_tree(_diffusers_fused(flux_model, FluxLoraLoaderMixin, path, SCALE))
    _assert_trees_close(jlora.fuse(flux_base, adapter, SCALE), want, flux_base, min_changed=4)


_DB = ("scanned_double_blocks", "FluxTransformerBlock_0")
_SB = ("scanned_single_blocks", "FluxSingleTransformerBlock_0")
# kohya (BFL) module -> [(maxdiffusion path, BFL output rows)]: where load_flow_model puts each BFL weight.
_BFL_TO_MAXDIFFUSION = {
    "double_blocks_{i}_img_attn_qkv": [(_DB + ("attn", "i_qkv", "kernel"), slice(None))],
    "double_blocks_{i}_txt_attn_qkv": [(_DB + ("attn", "e_qkv", "kernel"), slice(None))],
    "double_blocks_{i}_img_attn_proj": [(_DB + ("attn", "i_proj", "kernel"), slice(None))],
    "double_blocks_{i}_txt_mlp_2": [(_DB + ("txt_mlp", "layers_2", "kernel"), slice(None))],
    "double_blocks_{i}_txt_mod_lin": [(_DB + ("txt_norm1", "lin", "kernel"), slice(None))],
    "single_blocks_{i}_linear1": [
        (_SB + ("lin_qkv", "kernel"), slice(0, 3 * _DIM)),
        (_SB + ("mlp_and_out", "lin_mlp", "kernel"), slice(3 * _DIM, None)),
    ],
    "single_blocks_{i}_linear2": [(_SB + ("mlp_and_out", "linear2", "kernel"), slice(None))],
    "single_blocks_{i}_modulation_lin": [(_SB + ("norm", "lin", "kernel"), slice(None))],
    "img_in": [(("img_in", "kernel"), slice(None))],
    "guidance_in_in_layer": [(("time_text_embed", "FlaxTimestepEmbedding_1", "linear_1", "kernel"), slice(None))],
    "final_layer_adaLN_modulation_1": [(("norm_out", "Dense_0", "kernel"), slice(None))],  # (shift, scale) both sides
    "final_layer_linear": [(("proj_out", "kernel"), slice(None))],
}
_BFL_SHAPES = {  # (in, out) of each BFL module of the tiny model
    "img_attn_qkv": (_DIM, 3 * _DIM), "txt_attn_qkv": (_DIM, 3 * _DIM), "img_attn_proj": (_DIM, _DIM),
    "txt_mlp_2": (_MLP, _DIM), "txt_mod_lin": (_DIM, 6 * _DIM), "linear1": (_DIM, 3 * _DIM + _MLP),
    "linear2": (_DIM + _MLP, _DIM), "modulation_lin": (_DIM, 3 * _DIM), "img_in": (16, _DIM),
    "guidance_in_in_layer": (256, _DIM), "final_layer_adaLN_modulation_1": (_DIM, 2 * _DIM), "final_layer_linear": (_DIM, 16),
}


def test_kohya_flux_file_on_maxdiffusion_equals_format_math(flux_base, tmp_path):
    """A kohya Flux file (BFL names, fused qkv / linear1, alphas, a norm-scale diff and a set_weight).
    Reference: the format's math on the BFL weight, W += s * alpha / r * up @ down (diff: s * diff; set: the value),
    put where maxdiffusion's `load_flow_model` puts that BFL weight: linear1 rows [:3D] in `lin_qkv` and [3D:] in
    `mlp_and_out/lin_mlp`, final_layer.adaLN_modulation.1 as is in `norm_out/Dense_0`."""
    rng = np.random.default_rng(7)
    sd, want = {}, _flat(flux_base)
    want = {p: np.array(w) for p, w in want.items()}
    for name, places in _BFL_TO_MAXDIFFUSION.items():
        layers = range(3) if "{i}" in name else [None]
        for i in layers:
            module = name.format(i=i)
            n_in, n_out = _BFL_SHAPES[name.split("}_")[-1]]
            rank, alpha = (8, 4.0) if "linear1" in name else (4, 6.0)
            key = f"lora_unet_{module}"
            down = (rng.standard_normal((rank, n_in)) * 0.3).astype(np.float32)
            up = (rng.standard_normal((n_out, rank)) * 0.3).astype(np.float32)
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": np.float32(alpha)})
            delta = SCALE * alpha / rank * (up @ down)
            for path, rows in places:
                if i is None:
                    want[path] = want[path] + delta[rows].T
                else:
                    want[path][i] = want[path][i] + delta[rows].T
    diff = (rng.standard_normal(16) * 0.5).astype(np.float32)
    value = (1 + rng.standard_normal(16) * 0.2).astype(np.float32)
    sd["lora_unet_double_blocks_1_txt_attn_norm_key_norm.diff"] = diff
    sd["lora_unet_single_blocks_2_norm_query_norm.set_weight"] = value
    want[_DB + ("attn", "encoder_key_norm", "scale")][1] += SCALE * diff
    want[_SB + ("attn", "query_norm", "scale")][2] = value
    path = str(tmp_path / "kohya_flux.safetensors")
    save_file(sd, path)
    adapter, report = _load(path, flux_base, "maxdiffusion_flux")
    assert report.format == "kohya_flux"
    got = _flat(jlora.fuse(flux_base, adapter, SCALE))
    base = _flat(flux_base)
    changed = 0
    for p, w in want.items():
        err = np.abs(np.asarray(got[p]) - w).max() / np.abs(w).max()
        assert err <= 1e-5, ("/".join(p), err)
        changed += not np.array_equal(w, base[p])
    assert changed == len(_BFL_TO_MAXDIFFUSION) + 1 + 2


# --------------------------------------------------------------------------- Wan


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def wan_model(request):
    config = dict(WAN_CONFIG, **(WAN_I2V if request.param == "i2v" else {}))
    return _randomize(WanTransformer3DModel(**config))


@pytest.fixture(scope="module")
def wan_base(wan_model):
    return _to_maxdiffusion_wan(_numpy(wan_model.state_dict()), WAN_CONFIG["num_layers"])


def test_maxdiffusion_wan_fused_weights_equal_diffusers(wan_model, wan_base, tmp_path):
    i2v = "image_embedder" in wan_base["condition_embedder"]
    targets = WAN_TARGETS if i2v else [t for t in WAN_TARGETS if "add_" not in t and "image_" not in t]
    path = _peft_file(wan_model, WanLoraLoaderMixin, tmp_path, targets, rank_pattern={"ffn.net.2": 2}, alpha_pattern={"to_v": 2})
    adapter, report = _load(path, wan_base, "maxdiffusion_wan")
    assert len(report.placed) == 3 * (12 if i2v else 10) + (9 if i2v else 7)
    want = _to_maxdiffusion_wan(_diffusers_fused(wan_model, WanLoraLoaderMixin, path, SCALE), WAN_CONFIG["num_layers"])
    n_kernels = (12 if i2v else 10) + (9 if i2v else 7)
    assert adapter["patch_embedding"]["kernel"].a.shape == (1, 2, 2, 4, 4)  # Conv3d: (kt, kh, kw, in, r)
    assert jlora.count(adapter) == n_kernels
    _assert_trees_close(jlora.fuse(wan_base, adapter, SCALE), want, wan_base, min_changed=n_kernels)
    leaf = adapter["blocks"]["attn1"]["query"]["kernel"]
    assert leaf.a.shape == (3, _DIM, 4) and leaf.b.shape == (3, 4, _DIM) and leaf.alpha.shape == (3,)
    assert "blocks/ffn/proj_out/kernel[2][:, 0:32]" in {p.path for p in report.placed}


def test_maxdiffusion_wan_untouched_layers_get_zero_factors(wan_model, wan_base, tmp_path):
    targets = r"blocks\.(0|2)\.attn1\.to_q|blocks\.1\.attn2\.to_out\.0|blocks\.2\.ffn\.net\.0\.proj|condition_embedder\.time_proj"
    path = _peft_file(wan_model, WanLoraLoaderMixin, tmp_path, targets, seed=2)
    adapter, report = _load(path, wan_base, "maxdiffusion_wan")
    assert len(report.placed) == 5 and jlora.count(adapter) == 4
    blocks = adapter["blocks"]
    q = blocks["attn1"]["query"]["kernel"]
    assert not np.asarray(q.a)[1].any() and not np.asarray(q.b)[1].any()
    assert np.asarray(q.a)[[0, 2]].all(axis=(1, 2)).all() and np.asarray(q.b)[[0, 2]].all(axis=(1, 2)).all()
    out = blocks["attn2"]["proj_attn"]["kernel"]
    assert not np.asarray(out.b)[[0, 2]].any() and np.asarray(out.b)[1].any()
    ffn = blocks["ffn"]["act_fn"]["proj"]["kernel"]
    assert not np.asarray(ffn.a)[:2].any() and np.asarray(ffn.a)[2].any()
    assert blocks["attn1"]["key"]["kernel"] is None and adapter["condition_embedder"]["time_proj"]["kernel"] is not None
    want = _to_maxdiffusion_wan(_diffusers_fused(wan_model, WanLoraLoaderMixin, path, SCALE), WAN_CONFIG["num_layers"])
    _assert_trees_close(jlora.fuse(wan_base, adapter, SCALE), want, wan_base, min_changed=4)


def test_maxdiffusion_wan_on_nnx_state(wan_model, wan_base, tmp_path):
    """The same tree as an `nnx.State` of `nnx.Param`s (what `nnx.state(WanModel(...))` holds): same placement."""
    from flax import nnx

    state = nnx.State(jax.tree.map(nnx.Param, wan_base))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    assert any(jax.tree_util.keystr(kp).endswith("['query']['kernel'].value") for kp, _ in leaves)
    targets = ["to_q", "to_out.0", "ffn.net.2", "time_proj", "text_embedder.linear_1"]
    path = _peft_file(wan_model, WanLoraLoaderMixin, tmp_path, targets, seed=3)
    adapter, report = _load(path, state, "maxdiffusion_wan")
    assert len(report.placed) == 3 * 5 + 2 and jlora.count(adapter) == 5 + 2
    leaf = _flat(adapter, is_adapter_leaf)[("blocks", "attn2", "proj_attn", "kernel")]
    assert leaf.a.shape == (3, _DIM, 4)
    fused = jlora.fuse(state, adapter, SCALE)
    assert isinstance(fused, nnx.State)
    want = _to_maxdiffusion_wan(_diffusers_fused(wan_model, WanLoraLoaderMixin, path, SCALE), WAN_CONFIG["num_layers"])
    _assert_trees_close(fused, want, wan_base, min_changed=7)


def test_maxdiffusion_wan_layers_fused_weights_equal_diffusers(wan_model, tmp_path):
    """`scan_layers=False`: one subtree per layer (`blocks/<i>/attn1/query`), per-module leaves."""
    n = WAN_CONFIG["num_layers"]
    base = _to_maxdiffusion_wan(_numpy(wan_model.state_dict()), n, scan_layers=False)
    targets = [t for t in WAN_TARGETS if "add_" not in t and "image_" not in t]
    path = _peft_file(wan_model, WanLoraLoaderMixin, tmp_path, targets, rank_pattern={"ffn.net.2": 2}, seed=4)
    adapter, report = _load(path, base, "maxdiffusion_wan_layers")
    assert len(report.placed) == jlora.count(adapter) == 3 * 10 + 7
    leaf = adapter["blocks"][1]["ffn"]["proj_out"]["kernel"]
    assert leaf.a.shape == (48, 2) and leaf.b.shape == (2, _DIM)
    want = _to_maxdiffusion_wan(_diffusers_fused(wan_model, WanLoraLoaderMixin, path, SCALE), n, scan_layers=False)
    _assert_trees_close(jlora.fuse(base, adapter, SCALE), want, base, min_changed=3 * 10 + 7)
    saved = jlora.save_lora_weights(tmp_path / "out", {"transformer": adapter})
    back, original = jlora.lora_state_dict(saved), jlora.lora_state_dict(path)
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6)


# --------------------------------------------------------------------------- detection


def _paths(tree):
    return list(shape_index(tree))


def test_detection_picks_each_scheme_and_only_its_own_tree(flux_base, wan_base):
    flux_md, wan_md = get_scheme("maxdiffusion_flux"), get_scheme("maxdiffusion_wan")
    assert detect_scheme(_paths(flux_base)).name == "maxdiffusion_flux"
    assert detect_scheme(_paths(wan_base)).name == "maxdiffusion_wan"
    wan_layers = _paths({"blocks": {0: wan_base["blocks"]}, "condition_embedder": wan_base["condition_embedder"]})
    assert detect_scheme(wan_layers).name == "maxdiffusion_wan_layers"
    assert not wan_md.detect(wan_layers) and not get_scheme("maxdiffusion_wan_layers").detect(_paths(wan_base))
    jlora_tree = jlora_flux.param_shapes(dict(FLUX_CONFIG))
    others = {
        "jlora_flux": _paths(jlora_tree),
        **{f"sdxl {c}": list(idx) for c, idx in family_indexes("sdxl").items()},
    }
    assert detect_scheme(others["jlora_flux"]).name == "jlora_flux"
    for name, paths in others.items():
        assert not flux_md.detect(paths) and not wan_md.detect(paths), name
    assert not flux_md.detect(_paths(wan_base)) and not wan_md.detect(_paths(flux_base))
    assert not get_scheme("jlora_flux").detect(_paths(flux_base)) and not get_scheme("jlora_flux").detect(_paths(wan_base))
