"""Z-Image and LTX-2 LoRA files (and Wan 2.2's `transformer_2`) against diffusers, at the level of fused weights.

Reference: diffusers 0.42.1 (the second reference environment, through `tests/newest.py`): the tiny seeded
`ZImageTransformer2DModel`, `LTX2VideoTransformer3DModel` and `LTX2TextConnectors` are built there, each file is
read by `ZImageLoraLoaderMixin` / `LTX2LoraLoaderMixin.lora_state_dict`, loaded into the component through PEFT
and fused with `fuse_lora(lora_scale=0.7)`. PEFT files are written there too, by PEFT (`add_adapter`,
random factors) and diffusers' LoRA saver; the other layouts are written here with the key names diffusers'
converters expect. jlora loads the same file onto a torch-mirror Flax tree of the same base weights
(`layers/0/attention/to_q/kernel`, (in, out) kernels) and fuses at the same scale: every weight must agree
within 1e-5 relative, the LoRA must change exactly the weights of the modules the file names, and every
key must be loaded (none unmatched, unplaced or skipped).

Wan 2.2's second expert: diffusers 0.35.2's `WanLoraLoaderMixin.load_lora_weights(..., load_into_transformer_2=True)`
on two tiny Wan transformers, against `jlora.load_lora_weights(..., load_into_transformer_2=True)`.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

import jlora
from converters import engine
from converters.guess import guess_family
from tests import newest
from mirror import flatten, kernel, nested  # noqa: E402

SCALE = 0.7
RANK = 4

Z_IMAGE = dict(model="ZImageTransformer2DModel", config=dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
    n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32]))
LTX2 = dict(model="LTX2VideoTransformer3DModel", config=dict(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
    audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
    audio_cross_attention_dim=8, num_layers=1, caption_channels=16))
CONNECTORS = dict(model="LTX2TextConnectors", module="diffusers.pipelines.ltx2.connectors", config=dict(
    caption_channels=16, text_proj_in_factor=3, video_connector_num_attention_heads=2,
    video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=4,
    audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
    audio_connector_num_learnable_registers=4))

# Z-Image modules (diffusers names) the files adapt.
Z_MODULES = (
    "layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v", "layers.0.attention.to_out.0",
    "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "layers.0.feed_forward.w3", "layers.0.adaLN_modulation.0",
    "noise_refiner.0.attention.to_q", "noise_refiner.0.adaLN_modulation.0", "context_refiner.0.attention.to_out.0",
    "context_refiner.0.feed_forward.w2", "all_x_embedder.2-1", "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1", "t_embedder.mlp.2", "cap_embedder.1",
)
# A PEFT regex (full match): the final layer's `adaLN_modulation.0` is a SiLU.
Z_PEFT_TARGETS = r".*\.(?:to_q|to_k|to_v|to_out\.0|w1|w2|w3)|(?:layers|noise_refiner)\.\d+\.adaLN_modulation\.0|cap_embedder\.1"

# LTX-2 original name -> diffusers name (transformer), and the connectors'.
LTX2_RENAMES = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single.linear": "time_embed.linear",
    "adaln_single.emb.timestep_embedder.linear_1": "time_embed.emb.timestep_embedder.linear_1",
    "audio_adaln_single.linear": "audio_time_embed.linear",
    "av_ca_video_scale_shift_adaln_single.linear": "av_cross_attn_video_scale_shift.linear",
    "av_ca_a2v_gate_adaln_single.linear": "av_cross_attn_video_a2v_gate.linear",
    "av_ca_audio_scale_shift_adaln_single.linear": "av_cross_attn_audio_scale_shift.linear",
    "av_ca_v2a_gate_adaln_single.emb.timestep_embedder.linear_2": "av_cross_attn_audio_v2a_gate.emb.timestep_embedder.linear_2",
    "transformer_blocks.0.attn1.to_q": "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.0.audio_attn2.to_v": "transformer_blocks.0.audio_attn2.to_v",
    "transformer_blocks.0.audio_to_video_attn.to_k": "transformer_blocks.0.audio_to_video_attn.to_k",
    "transformer_blocks.0.video_to_audio_attn.to_out.0": "transformer_blocks.0.video_to_audio_attn.to_out.0",
    "transformer_blocks.0.audio_ff.net.0.proj": "transformer_blocks.0.audio_ff.net.0.proj",
    "caption_projection.linear_1": "caption_projection.linear_1",
    "proj_out": "proj_out",
    "audio_proj_out": "audio_proj_out",
}
CONNECTOR_RENAMES = {
    "aggregate_embed": "text_proj_in",
    "video_connector.transformer_blocks.0.attn1.to_q": "video_connector.transformer_blocks.0.attn1.to_q",
    "audio_connector.transformer_blocks.0.ff.net.2": "audio_connector.transformer_blocks.0.ff.net.2",
}
LTX2_PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "audio_proj_in", "time_embed.linear", "proj_out"]
CONNECTOR_PEFT_TARGETS = ["text_proj_in", "to_q", "to_out.0"]


def _rng(seed):
    return np.random.default_rng(seed)


def _factors(rng, weight, rank=RANK):
    out, n_in = weight.shape
    down = rng.standard_normal((rank, n_in)).astype(np.float32) * 0.3
    up = rng.standard_normal((out, rank)).astype(np.float32) * 0.3
    return down, up


# ---- files ---------------------------------------------------------------------------------------


def _lora_file(path, base, sources: dict, *, down, up, alpha=None, seed=0):
    """`{source name: diffusers module}` -> a file with `<source>.<down>` / `<source>.<up>` (+ `.alpha`)."""
    rng, tensors = _rng(seed), {}
    for i, (src, module) in enumerate(sources.items()):
        d, u = _factors(rng, base[f"{module}.weight"])
        tensors[f"{src}.{down}"], tensors[f"{src}.{up}"] = d, u
        if alpha is not None:
            tensors[f"{src}.alpha"] = np.asarray(alpha + i % 3, np.float32)
    save_file(tensors, str(path))
    return sorted(tensors)


def _z_kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def z_dm_kohya(path, base):
    """`diffusion_model.<diffusers name>.lora_down.weight` + `.alpha` (alpha baked into the factors by diffusers)."""
    return _lora_file(path, base, {f"diffusion_model.{m}": m for m in Z_MODULES}, down="lora_down.weight",
                      up="lora_up.weight", alpha=6.0, seed=1)


def z_peft_internal(path, base):
    """PEFT's in-memory names (`lora_A.default.weight`) under `diffusion_model.`, with `.alpha`."""
    modules = {f"diffusion_model.{m}": m for m in Z_MODULES[:8]}
    return _lora_file(path, base, modules, down="lora_A.default.weight", up="lora_B.default.weight", alpha=3.0, seed=8)


def z_kohya(path, base):
    """`lora_unet_layers_0_attention_to_q.lora_down.weight` + `.alpha`; the bare `attention_out` is `to_out.0`."""
    names = {_z_kohya_name(m): m for m in Z_MODULES if m != "layers.0.attention.to_out.0"}
    names["lora_unet_layers_0_attention_out"] = "layers.0.attention.to_out.0"
    return _lora_file(path, base, names, down="lora_down.weight", up="lora_up.weight", alpha=2.0, seed=2)


def z_dotted(path, base):
    """`.lora.down.weight` names: the fused `attention.qkv` (equal thirds), the bare `attention.out`, `to.k`."""
    rng, tensors = _rng(3), {}
    q = base["layers.0.attention.to_q.weight"]
    down = rng.standard_normal((RANK, q.shape[1])).astype(np.float32) * 0.3
    up = rng.standard_normal((3 * q.shape[0], RANK)).astype(np.float32) * 0.3
    tensors.update({"lora_unet_layers_0_attention_qkv.lora.down.weight": down,
                    "lora_unet_layers_0_attention_qkv.lora.up.weight": up,
                    "lora_unet_layers_0_attention_qkv.alpha": np.asarray(8.0, np.float32)})
    for src, module, alpha in (("lora_unet_layers_0_attention_out", "layers.0.attention.to_out.0", 2.0),
                               ("lora_unet_layers_0_feed_forward_w1", "layers.0.feed_forward.w1", 3.0),
                               ("lora_unet_noise_refiner_0_attention_to_q", "noise_refiner.0.attention.to_q", 5.0),
                               ("noise_refiner.0.attention.to.k", "noise_refiner.0.attention.to_k", None)):
        d, u = _factors(rng, base[f"{module}.weight"])
        tensors[f"{src}.lora.down.weight"], tensors[f"{src}.lora.up.weight"] = d, u
        if alpha is not None:
            tensors[f"{src}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return sorted(tensors)


def z_lokr(path, base):
    """LyCORIS LoKr under `diffusion_model.` with `.alpha`: decomposed w2 (scale alpha/dim) and full factors (no scale)."""
    rng, tensors = _rng(4), {}
    specs = (("layers.0.attention.to_q", (4, 4), (8, 8), 2, 3.0), ("layers.0.attention.to_v", (4, 4), (8, 8), 3, 5.0),
             ("layers.0.feed_forward.w1", (5, 4), (17, 8), None, 7.0))
    for module, w1, w2, rank, alpha in specs:
        key = f"diffusion_model.{module}"
        tensors[f"{key}.lokr_w1"] = rng.standard_normal(w1).astype(np.float32) * 0.3
        if rank is None:
            tensors[f"{key}.lokr_w2"] = rng.standard_normal(w2).astype(np.float32) * 0.3
        else:
            tensors[f"{key}.lokr_w2_a"] = rng.standard_normal((w2[0], rank)).astype(np.float32) * 0.3
            tensors[f"{key}.lokr_w2_b"] = rng.standard_normal((rank, w2[1])).astype(np.float32) * 0.3
        tensors[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    save_file(tensors, str(path))
    return sorted(tensors)


def ltx2_original(path, base, connectors_base):
    """LTX-2 original names: `diffusion_model.patchify_proj`, `adaln_single`, `av_ca_*`, `text_embedding_projection.`."""
    rng, tensors = _rng(5), {}
    for prefix, renames, weights in (("diffusion_model", LTX2_RENAMES, base),
                                     ("text_embedding_projection", CONNECTOR_RENAMES, connectors_base)):
        for src, module in renames.items():
            d, u = _factors(rng, weights[f"{module}.weight"])
            tensors[f"{prefix}.{src}.lora_A.weight"], tensors[f"{prefix}.{src}.lora_B.weight"] = d, u
    save_file(tensors, str(path))
    return sorted(tensors)


# ---- reference, once for the module --------------------------------------------------------------


def _peft_part(component, model_spec, targets, r, alpha, lora_seed):
    return dict(component=component, **model_spec, r=r, alpha=alpha, targets=targets, lora_seed=lora_seed)


Z_LAYOUTS = {"dm_kohya": z_dm_kohya, "kohya": z_kohya, "dotted_qkv": z_dotted, "lokr": z_lokr, "peft_internal": z_peft_internal}


# (out, in) of the weights the hand-written files adapt, from the configs above; the reference run checks them
# (a wrong one makes diffusers fail to load the file).
_Z_SHAPES = {"to_q": (32, 32), "to_k": (32, 32), "to_v": (32, 32), "to_out.0": (32, 32), "w1": (85, 32), "w2": (32, 85),
             "w3": (85, 32), "adaLN_modulation.0": (128, 32), "all_x_embedder.2-1": (32, 16),
             "all_final_layer.2-1.linear": (16, 32), "all_final_layer.2-1.adaLN_modulation.1": (32, 32),
             "t_embedder.mlp.2": (32, 1024), "cap_embedder.1": (32, 16)}
_LTX2_SHAPES = {"proj_in": (16, 8), "audio_proj_in": (8, 4), "time_embed.linear": (96, 16),
                "time_embed.emb.timestep_embedder.linear_1": (16, 256), "audio_time_embed.linear": (48, 8),
                "av_cross_attn_video_scale_shift.linear": (64, 16), "av_cross_attn_video_a2v_gate.linear": (16, 16),
                "av_cross_attn_audio_scale_shift.linear": (32, 8),
                "av_cross_attn_audio_v2a_gate.emb.timestep_embedder.linear_2": (8, 8),
                "transformer_blocks.0.attn1.to_q": (16, 16), "transformer_blocks.0.audio_attn2.to_v": (8, 8),
                "transformer_blocks.0.audio_to_video_attn.to_k": (8, 8),
                "transformer_blocks.0.video_to_audio_attn.to_out.0": (8, 8),
                "transformer_blocks.0.audio_ff.net.0.proj": (32, 8), "caption_projection.linear_1": (16, 16),
                "proj_out": (8, 16), "audio_proj_out": (4, 8)}
_CONNECTOR_SHAPES = {"text_proj_in": (16, 48), "video_connector.transformer_blocks.0.attn1.to_q": (16, 16),
                     "audio_connector.transformer_blocks.0.ff.net.2": (16, 64)}


def _shape_dict(modules, shapes) -> dict:
    """`{"<module>.weight": array of its shape}` (values unused: the files need shapes only)."""
    out = {}
    for m in modules:
        shape = shapes.get(m) or next(v for k, v in shapes.items() if m.endswith("." + k))
        out[f"{m}.weight"] = np.zeros(shape, np.float32)
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The written files and diffusers 0.42.1's base and fused weights of every case (one subprocess: PEFT's files
    are written there first, then every file is loaded and fused)."""
    newest.require()
    tmp = tmp_path_factory.mktemp("zimage_ltx2")
    files = {"z_peft": tmp / "z_peft.safetensors", "ltx2_peft": tmp / "ltx2_peft.safetensors"}
    prep = [
        dict(op="peft_components", mixin="ZImageLoraLoaderMixin", path=str(files["z_peft"]),
             parts=[_peft_part("transformer", Z_IMAGE, Z_PEFT_TARGETS, RANK, 8, 11)]),
        dict(op="peft_components", mixin="LTX2LoraLoaderMixin", path=str(files["ltx2_peft"]),
             parts=[_peft_part("transformer", LTX2, LTX2_PEFT_TARGETS, RANK, 2, 12),
                    _peft_part("connectors", CONNECTORS, CONNECTOR_PEFT_TARGETS, 2, 3, 13)]),
    ]
    z_shapes = _shape_dict((*Z_MODULES, "noise_refiner.0.attention.to_k"), _Z_SHAPES)
    for name, write in Z_LAYOUTS.items():
        files[f"z_{name}"] = tmp / f"z_{name}.safetensors"
        write(files[f"z_{name}"], z_shapes)
    files["ltx2_original"] = tmp / "ltx2_original.safetensors"
    ltx2_original(files["ltx2_original"], _shape_dict(LTX2_RENAMES.values(), _LTX2_SHAPES),
                  _shape_dict(CONNECTOR_RENAMES.values(), _CONNECTOR_SHAPES))

    cases = {}
    for name in ("z_peft", *(f"z_{n}" for n in Z_LAYOUTS)):
        cases[(name, "transformer")] = dict(**Z_IMAGE, lora=files[name], mixin="ZImageLoraLoaderMixin")
    for name in ("ltx2_peft", "ltx2_original"):
        cases[(name, "transformer")] = dict(**LTX2, lora=files[name], mixin="LTX2LoraLoaderMixin")
        cases[(name, "connectors")] = dict(**CONNECTORS, lora=files[name], mixin="LTX2LoraLoaderMixin",
                                           component="connectors")
    defaults = dict(op="fused", seed=0, scale=SCALE, component="transformer", dtype="float32")
    fused = [{**defaults, **{k: (str(v) if k == "lora" else v) for k, v in c.items()}} for c in cases.values()]
    arrays, info = newest.call("batch", cases=prep + fused)
    results = {}
    for i, case in enumerate(cases, start=len(prep)):
        part = {k[len(f"{i}/"):]: v for k, v in arrays.items() if k.startswith(f"{i}/")}
        base = {k[5:]: v for k, v in part.items() if k.startswith("base/")}
        results[case] = (base, {k[6:]: v for k, v in part.items() if k.startswith("fused/")}, info["cases"][i])
    return dict(files=files, results=results)


# ---- torch-mirror trees and comparisons ------------------------------------------------------------


def flat_tree(state_dict) -> dict[tuple[str, ...], np.ndarray]:
    """`{path: array}` of the torch-mirror Flax tree of a torch state dict (as numpy arrays)."""
    out = {}
    for name, a in state_dict.items():
        *module, leaf = name.split(".")
        a = np.array(a, np.float32)
        if leaf == "weight":
            leaf = "scale" if a.ndim == 1 else "kernel"
            if a.ndim >= 2:
                a = a.transpose(*range(2, a.ndim), 1, 0)
        out[tuple(module) + (leaf,)] = a
    return out


def assert_fused_equal(got: dict, want: dict, base: dict) -> set:
    """Leaf-by-leaf agreement within 1e-5 relative; returns the paths the LoRA changed."""
    assert got.keys() == want.keys()
    changed = set()
    for path, w in want.items():
        g = got[path]
        assert g.shape == w.shape, path
        err = float(np.max(np.abs(g - w))) if w.size else 0.0
        assert err <= 1e-5 * max(float(np.max(np.abs(w))), 1e-12), f"{'/'.join(path)}: max|diff| {err}"
        if not np.array_equal(w, base[path]):
            assert not np.allclose(w, base[path], rtol=1e-3, atol=1e-3), f"{'/'.join(path)}: change too small to test"
            changed.add(path)
    return changed


def _fused_pair(ref, name, component):
    base, fused, info = ref["results"][(name, component)]
    return flat_tree(base), flat_tree(fused), info


def _jlora(path, bases: dict, family: str, **kwargs):
    trees = {c: nested(b) for c, b in bases.items()}
    adapters, report = jlora.load_lora_weights(str(path), trees, family=family, return_report=True, **kwargs)
    fused = {c: flatten(jlora.fuse(trees[c], adapters[c], SCALE)) if adapters[c] is not None else flatten(trees[c])
             for c in trees}
    return fused, report


def _assert_complete(report, path, fmt):
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
    assert report.format == fmt
    assert not report.unmatched and not report.unplaced and not report.skipped, report.summary()
    assert set(report.loaded_keys) == keys


# ---- Z-Image ---------------------------------------------------------------------------------------

Z_EXPECTED = {
    "z_peft": None,  # from diffusers' injected modules
    "z_dm_kohya": set(Z_MODULES),
    "z_kohya": set(Z_MODULES),
    "z_dotted_qkv": {"layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v",
                     "layers.0.attention.to_out.0", "layers.0.feed_forward.w1", "noise_refiner.0.attention.to_q",
                     "noise_refiner.0.attention.to_k"},
    "z_lokr": {"layers.0.attention.to_q", "layers.0.attention.to_v", "layers.0.feed_forward.w1"},
    "z_peft_internal": set(Z_MODULES[:8]),
}
Z_FORMATS: dict = {}  # diffusers-named (transformer.) Z-Image files are z_image too: no Lumina-2 rename


@pytest.mark.parametrize("name", sorted(Z_EXPECTED))
def test_z_image_against_diffusers(ref, name):
    base, want, info = _fused_pair(ref, name, "transformer")
    assert not [w for w in info["warnings"] if "unexpected" in w.lower() or "missing" in w.lower()], info["warnings"]
    path = ref["files"][name]
    got, report = _jlora(path, {"transformer": base}, "z_image")
    _assert_complete(report, path, Z_FORMATS.get(name, "z_image"))
    changed = assert_fused_equal(got["transformer"], want, base)
    expected = Z_EXPECTED[name] if Z_EXPECTED[name] is not None else set(info["loaded"])
    assert changed == {kernel(m) for m in expected}
    assert len(expected) >= 3


def test_z_image_files_are_not_lumina2(ref):
    """diffusers-named Z-Image files (feed_forward.w1, attention.to_q) are Z-Image or PEFT, never Lumina-2's
    original layout, whose `feed_forward.w1` would be renamed to `linear_1`."""
    for name in Z_EXPECTED:
        from safetensors import safe_open

        with safe_open(str(ref["files"][name]), "np") as f:
            keys = list(f.keys())
        found = [f.name for f in engine.matching_formats(keys)]
        assert found == [Z_FORMATS.get(name, "z_image")], (name, found)
    ffn_only = ["transformer.layers.0.feed_forward.w1.lora_A.weight", "transformer.layers.0.feed_forward.w1.lora_B.weight"]
    assert [f.name for f in engine.matching_formats(ffn_only)] in (["z_image"], ["peft"])
    for name, family in (*((n, "z_image") for n in Z_EXPECTED), ("ltx2_original", "ltx2"), ("ltx2_peft", "ltx2")):
        assert guess_family(_records(ref["files"][name])) == family, name
    lumina2 = ["diffusion_model.layers.0.attention.qkv.lora_A.weight", "diffusion_model.layers.0.feed_forward.w1.lora_A.weight",
               "diffusion_model.layers.0.adaLN_modulation.1.lora_A.weight"]
    assert [f.name for f in engine.matching_formats(lumina2)] == ["lumina2"]


def _records(path):
    """The records of a file as the detected format reads them (diffusers names)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    fmt = engine.detect_format(tensors)
    records, _ = engine.build_records(fmt, tensors)
    return [piece for rec in records for piece in (fmt.split(rec) if fmt.split else [rec])]


# ---- LTX-2 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ltx2_original", "ltx2_peft"])
def test_ltx2_transformer_and_connectors_against_diffusers(ref, name):
    t_base, t_want, t_info = _fused_pair(ref, name, "transformer")
    c_base, c_want, c_info = _fused_pair(ref, name, "connectors")
    path = ref["files"][name]
    got, report = _jlora(path, {"transformer": t_base, "connectors": c_base}, "ltx2")
    _assert_complete(report, path, "ltx2" if name == "ltx2_original" else "peft")
    t_changed = assert_fused_equal(got["transformer"], t_want, t_base)
    c_changed = assert_fused_equal(got["connectors"], c_want, c_base)
    if name == "ltx2_original":
        assert t_changed == {kernel(m) for m in LTX2_RENAMES.values()}
        assert c_changed == {kernel(m) for m in CONNECTOR_RENAMES.values()}
    assert t_changed == {kernel(m) for m in t_info["loaded"]} and len(t_changed) >= 8
    assert c_changed == {kernel(m) for m in c_info["loaded"]} and len(c_changed) >= 3


# ---- Wan 2.2: the second expert -------------------------------------------------------------------

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
           freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=32)
WAN_SOURCES = {  # Wan original name -> diffusers module
    "diffusion_model.blocks.0.self_attn.q": "blocks.0.attn1.to_q",
    "diffusion_model.blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
    "diffusion_model.blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "diffusion_model.head.head": "proj_out",
}


def test_wan22_transformer_2_against_diffusers(tmp_path):
    """diffusers 0.35.2's `WanLoraLoaderMixin.load_lora_weights(path, load_into_transformer_2=True)` puts the file's
    transformer LoRA into `transformer_2` only; jlora's `load_into_transformer_2=True` does the same."""
    import copy

    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.loaders import WanLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    high = WanTransformer3DModel(**WAN).eval()
    torch.manual_seed(1)
    low = WanTransformer3DModel(**WAN).eval()
    weights = {k: v.numpy() for k, v in low.state_dict().items()}
    path = tmp_path / "wan22_low_noise.safetensors"
    keys = _lora_file(path, weights, WAN_SOURCES, down="lora_A.weight", up="lora_B.weight", seed=7)

    class Pipeline(WanLoraLoaderMixin):  # the two experts of a Wan 2.2 pipeline, nothing else
        hf_device_map = None
        components: dict = {}

    pipe = Pipeline()
    pipe.transformer, pipe.transformer_2 = copy.deepcopy(high), copy.deepcopy(low)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, load_into_transformer_2=True)
    assert not any(isinstance(m, LoraLayer) for m in pipe.transformer.modules())
    pipe.transformer_2.fuse_lora(lora_scale=SCALE)
    pipe.transformer_2.unload_lora()
    want = flat_tree({k: v.numpy() for k, v in pipe.transformer_2.state_dict().items()})

    bases = {"transformer": flat_tree({k: v.numpy() for k, v in high.state_dict().items()}), "transformer_2": flat_tree(weights)}
    trees = {c: nested(b) for c, b in bases.items()}
    adapters, report = jlora.load_lora_weights(str(path), trees, family="wan", load_into_transformer_2=True,
                                               return_report=True)
    assert adapters["transformer"] is None
    assert not report.unmatched and not report.unplaced and not report.skipped and set(report.loaded_keys) == set(keys)
    got = flatten(jlora.fuse(trees["transformer_2"], adapters["transformer_2"], SCALE))
    changed = assert_fused_equal(got, want, bases["transformer_2"])
    assert changed == {kernel(m) for m in WAN_SOURCES.values()}
    with pytest.raises(jlora.JloraError, match="transformer_2"):
        jlora.load_lora_weights(str(path), {"transformer": trees["transformer"]}, family="wan", load_into_transformer_2=True)


# ---- maxdiffusion's nnx trees (stacked layers) ----------------------------------------------------


def scheme_tree(state_dict, scheme: str) -> dict[tuple[str, ...], np.ndarray]:
    """A torch state dict placed by a naming scheme: kernels (in, out), norm `scale`s, biases; a stacked
    target's layers stacked on a leading axis. Weights the scheme has no place for are left out."""
    from converters.naming import get_scheme

    s, flat, layers = get_scheme(scheme), {}, {}
    for name, a in state_dict.items():
        if "." not in name:  # a bare parameter (scale_shift_table)
            continue
        module, leaf = name.rsplit(".", 1)
        target = s.target(module)
        if target is None or leaf not in ("weight", "bias"):
            continue
        a = np.array(a, np.float32)
        if leaf == "weight":
            leaf, a = ("scale", a) if a.ndim == 1 else ("kernel", a.T)
        path = target.path + (leaf,)
        if target.layer is None:
            assert path not in flat, path
            flat[path] = a
        else:
            layers.setdefault(path, {})[target.layer] = a
    for path, by_layer in layers.items():
        assert sorted(by_layer) == list(range(len(by_layer))), path
        flat[path] = np.stack([by_layer[i] for i in range(len(by_layer))])
    return flat


MAXDIFFUSION_CASES = {  # file -> {component: (scheme, scheme_layers)}
    "z_dm_kohya": {"transformer": ("maxdiffusion_z_image", "maxdiffusion_z_image_layers")},
    "z_dotted_qkv": {"transformer": ("maxdiffusion_z_image", "maxdiffusion_z_image_layers")},
    "ltx2_original": {"transformer": ("maxdiffusion_ltx2", "maxdiffusion_ltx2_layers"),
                      "connectors": ("maxdiffusion_ltx2_connectors", "maxdiffusion_ltx2_connectors")},
}


@pytest.mark.parametrize("scanned", [True, False], ids=["scan_layers", "layer_list"])
@pytest.mark.parametrize("name", sorted(MAXDIFFUSION_CASES))
def test_maxdiffusion_trees_against_diffusers(ref, name, scanned):
    """The same files onto maxdiffusion's Z-Image / LTX-2 trees (blocks stacked under `scan_layers=True`, or one
    subtree per block): jlora's fused weights equal diffusers 0.42.1's, placed by the scheme, weight by weight."""
    schemes = {c: s[0] if scanned else s[1] for c, s in MAXDIFFUSION_CASES[name].items()}
    bases, wants = {}, {}
    for component, scheme in schemes.items():
        base, fused, _ = ref["results"][(name, component)]
        bases[component], wants[component] = scheme_tree(base, scheme), scheme_tree(fused, scheme)
    family = "z_image" if name.startswith("z_") else "ltx2"
    got, report = _jlora(ref["files"][name], bases, family)
    assert report.schemes == schemes
    assert not report.unmatched and not report.unplaced and not report.skipped, report.summary()
    for component in schemes:
        torch_base, torch_want, _ = _fused_pair(ref, name, component)
        changed = assert_fused_equal(got[component], wants[component], bases[component])
        moved = {p for p in torch_want if not np.array_equal(torch_want[p], torch_base[p])}
        assert len(changed) == len({scheme_target(schemes[component], p) for p in moved}) >= 3
        if scanned and component == "transformer":
            assert any(bases[component][p].ndim == 3 for p in changed)  # a stacked (L, in, out) kernel moved


def scheme_target(scheme: str, torch_path: tuple[str, ...]) -> tuple:
    from converters.naming import get_scheme

    target = get_scheme(scheme).target(".".join(torch_path[:-1]))
    return target.path + (torch_path[-1],)


# ---- full diffs (no diffusers reader: the format's math, W += scale * diff) ----------------------

DIFF_CASES = {
    "z_image": ("z_dm_kohya", "transformer", {
        "diffusion_model.layers.0.attention.norm_q.diff": "layers.0.attention.norm_q.weight",
        "diffusion_model.layers.0.feed_forward.w2.diff": "layers.0.feed_forward.w2.weight",
        "diffusion_model.all_x_embedder.2-1.diff_b": "all_x_embedder.2-1.bias",
        "lora_unet_context_refiner_0_attention_to_out_0.diff": "context_refiner.0.attention.to_out.0.weight",
    }),
    "ltx2": ("ltx2_original", "transformer", {
        "diffusion_model.transformer_blocks.0.attn1.q_norm.diff": "transformer_blocks.0.attn1.norm_q.weight",
        "diffusion_model.transformer_blocks.0.audio_to_video_attn.k_norm.diff": "transformer_blocks.0.audio_to_video_attn.norm_k.weight",
        "diffusion_model.patchify_proj.diff_b": "proj_in.bias",
        "diffusion_model.adaln_single.linear.diff": "time_embed.linear.weight",
    }),
}


@pytest.mark.parametrize("family", sorted(DIFF_CASES))
def test_full_diffs_by_the_format_math(ref, family, tmp_path):
    """`.diff` / `.diff_b` keys (norms included, LTX-2's `q_norm` renamed to `norm_q`) add `scale * diff` to the
    weight they name and change nothing else; reference: that sum on the torch weights."""
    case, component, keys = DIFF_CASES[family]
    torch_base, _, _ = ref["results"][(case, component)]
    rng, tensors, want = _rng(9), {}, {k: np.array(v, np.float32) for k, v in torch_base.items()}
    for key, param in keys.items():
        tensors[key] = rng.standard_normal(torch_base[param].shape).astype(np.float32)
        want[param] = want[param] + SCALE * tensors[key]
    path = tmp_path / f"{family}_diffs.safetensors"
    save_file(tensors, str(path))
    base = flat_tree(torch_base)
    got, report = _jlora(path, {component: base}, family)
    _assert_complete(report, path, family)
    changed = assert_fused_equal(got[component], flat_tree(want), base)
    assert len(changed) == len(keys)


def test_z_image_bad_fused_qkv_and_duplicates_are_typed_errors(ref):
    """A fused `qkv` whose rows do not split in thirds, and a `qkv` next to only some of the split keys it would
    duplicate (diffusers drops the fused one; see tests/test_zimage_ltx2_quirks.py for the full repeat), are typed
    errors naming the keys; the caller's dict is left as it was."""
    base, _, _ = ref["results"][("z_dm_kohya", "transformer")]
    trees = {"transformer": nested(flat_tree(base))}
    rng = _rng(10)
    qkv = "lora_unet_layers_0_attention_qkv"
    bad = {f"{qkv}.lora.down.weight": rng.standard_normal((RANK, 32)).astype(np.float32),
           f"{qkv}.lora.up.weight": rng.standard_normal((95, RANK)).astype(np.float32)}
    before = {k: v.copy() for k, v in bad.items()}
    with pytest.raises(jlora.JloraError, match=qkv) as e:
        jlora.load_lora_weights(bad, trees, family="z_image")
    assert "95" in str(e.value)
    assert bad.keys() == before.keys() and all(np.array_equal(bad[k], before[k]) for k in bad)
    dup = {f"{qkv}.lora.down.weight": bad[f"{qkv}.lora.down.weight"],
           f"{qkv}.lora.up.weight": rng.standard_normal((96, RANK)).astype(np.float32),
           "lora_unet_layers_0_attention_to_k.lora.down.weight": rng.standard_normal((RANK, 32)).astype(np.float32),
           "lora_unet_layers_0_attention_to_k.lora.up.weight": rng.standard_normal((32, RANK)).astype(np.float32)}
    with pytest.raises(jlora.JloraError, match="to_k") as e:
        jlora.load_lora_weights(dup, trees, family="z_image")
    assert qkv in str(e.value)
