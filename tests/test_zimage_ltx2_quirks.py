"""Z-Image and LTX-2 files whose keys alone are ambiguous or repeat themselves, against diffusers 0.42.1's fused weights.

Reference: the second reference environment (`tests/newest.py`) builds the tiny seeded `ZImageTransformer2DModel`,
`LTX2VideoTransformer3DModel` and `LTX2TextConnectors` of `tests/test_zimage_ltx2_formats.py`, reads each file with
`ZImageLoraLoaderMixin` / `LTX2LoraLoaderMixin.lora_state_dict`, loads it through PEFT and fuses at 0.7. jlora loads
the same file onto torch-mirror trees of the same base weights: every weight within 1e-5 relative, and every key
loaded or (Anime-Z repeats) listed in `LoadReport.redundant`.

* Lumina-2 / Z-Image shared names (`diffusion_model.layers.0.feed_forward.w1`): diffusers' Z-Image loader reads them
  as Z-Image modules; so does jlora for a Z-Image tree or `family="z_image"`. By keys alone they stay `lumina2`, and
  the report names the other reading.
* Anime-Z files (dotted `.lora.down`, fused `qkv` and bare `out` next to the split `to.q`/`to.k`/`to.v`/`to_out.0`):
  diffusers leaves the fused ones out; jlora does too and lists them.
* kohya-named Z-Image LoKr (`lora_unet_layers_0_attention_to_q.lokr_w1` + `.alpha`): diffusers 0.42.1 reads LoKr only
  under diffusers names, so its reference is the same tensors under `diffusion_model.` names (read by its LoKr path,
  alpha/dim baked into w1 when a factor is decomposed). PEFT 0.21.2 cannot hold a decomposed w1 next to a full w2
  (it leaves w2 at its random initialisation, warning of unexpected keys), so the file has none.
* LTX-2 files with `.alpha` (`lora_A`/`lora_B` and ComfyUI's `lora_down`/`lora_up`): diffusers 0.42.1 refuses them
  (`load_lora_weights`: "Invalid LoRA checkpoint", the alpha keys hold no `lora`), so the reference is diffusers on a
  copy with alpha/rank baked into `lora_A` and no alpha keys (kohya's and ComfyUI's alpha rule).
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

import jlora
from converters import engine
from tests import newest
from tests.test_zimage_ltx2_formats import (CONNECTORS, LTX2, SCALE, Z_IMAGE, _CONNECTOR_SHAPES, _LTX2_SHAPES, _Z_SHAPES,
                                           _shape_dict, assert_fused_equal, flat_tree)
from mirror import flatten, kernel, nested  # noqa: E402

RANK = 4


def _rng(seed):
    return np.random.default_rng(seed)


def _pair(rng, shape, rank=RANK):
    out, n_in = shape
    return ((rng.standard_normal((rank, n_in)) * 0.3).astype(np.float32),
            (rng.standard_normal((out, rank)) * 0.3).astype(np.float32))


Z_SHAPES = {m: s.shape for m, s in _shape_dict(
    ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v", "layers.0.attention.to_out.0",
     "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "layers.0.feed_forward.w3",
     "noise_refiner.0.attention.to_q", "noise_refiner.0.attention.to_out.0", "noise_refiner.0.feed_forward.w3",
     "context_refiner.0.feed_forward.w2", "context_refiner.0.attention.to_v"), _Z_SHAPES).items()}


def _z(module: str) -> tuple[int, int]:
    return Z_SHAPES[f"{module}.weight"]


# ---- files -----------------------------------------------------------------------------------------------------

SHARED_MODULES = ("layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "noise_refiner.0.feed_forward.w3",
                  "context_refiner.0.feed_forward.w2")


def z_shared(path):
    """Only the feed-forward modules Lumina-2's original names share with Z-Image, under `diffusion_model.`."""
    rng, t = _rng(20), {}
    for i, m in enumerate(SHARED_MODULES):
        t[f"diffusion_model.{m}.lora_A.weight"], t[f"diffusion_model.{m}.lora_B.weight"] = _pair(rng, _z(m))
        if i % 2:
            t[f"diffusion_model.{m}.alpha"] = np.asarray(2.0 + i, np.float32)
    save_file(t, str(path))


ANIME_REPEATED = {  # (key stem, fused or bare module) the split keys repeat
    "diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.out",
}
ANIME_MODULES = ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v",
                 "layers.0.attention.to_out.0", "layers.0.feed_forward.w1", "noise_refiner.0.attention.to_q",
                 "noise_refiner.0.attention.to_k", "noise_refiner.0.attention.to_v", "noise_refiner.0.attention.to_out.0")


def z_anime(path):
    """Anime-Z layout: dotted `.lora.down/.lora.up`, most with `.alpha`; layer 0 holds the fused `qkv` and bare `out` and
    the split `to.q`/`to.k`/`to.v`/`to_out.0` as well; noise_refiner 0 only the fused `qkv` and bare `out`."""
    rng, t = _rng(21), {}

    def put(stem, shape, alpha):
        t[f"{stem}.lora.down.weight"], t[f"{stem}.lora.up.weight"] = _pair(rng, shape)
        if alpha is not None:
            t[f"{stem}.alpha"] = np.asarray(alpha, np.float32)

    q = _z("layers.0.attention.to_q")
    for block in ("layers.0", "noise_refiner.0"):
        put(f"diffusion_model.{block}.attention.qkv", (3 * q[0], q[1]), 8.0)
        put(f"diffusion_model.{block}.attention.out", q, 2.0)
    # diffusers 0.42.1 looks up the alpha of `to.q` as `to_q.alpha` (and fails on `to.q.alpha`): none here
    for name, alpha in (("to.q", None), ("to.k", None), ("to.v", None), ("to_out.0", 2.0)):
        put(f"diffusion_model.layers.0.attention.{name}", q, alpha)
    put("diffusion_model.layers.0.feed_forward.w1", _z("layers.0.feed_forward.w1"), 7.0)
    save_file(t, str(path))


LOKR_MODULES = {"layers.0.attention.to_q": ((4, 4), (8, 8), 2, None, 3.0),  # decomposed w2: alpha/dim
                "layers.0.feed_forward.w3": ((5, 4), (17, 8), 2, 2, 6.0),  # both decomposed: alpha/dim
                "context_refiner.0.attention.to_v": ((4, 4), (8, 8), None, None, 5.0)}  # full factors: no scale


def z_lokr_pair(kohya_path, diffusers_path):
    """One LoKr under kohya names (`lora_unet_layers_0_attention_to_q.lokr_w1`) and, for the reference, the same
    tensors under the `diffusion_model.` names diffusers' LoKr path reads."""
    rng, kohya, named = _rng(22), {}, {}
    for module, (w1, w2, r2, r1, alpha) in LOKR_MODULES.items():
        factors = {}
        if r1 is None:
            factors["lokr_w1"] = rng.standard_normal(w1)
        else:
            factors["lokr_w1_a"], factors["lokr_w1_b"] = rng.standard_normal((w1[0], r1)), rng.standard_normal((r1, w1[1]))
        if r2 is None:
            factors["lokr_w2"] = rng.standard_normal(w2)
        else:
            factors["lokr_w2_a"], factors["lokr_w2_b"] = rng.standard_normal((w2[0], r2)), rng.standard_normal((r2, w2[1]))
        factors["alpha"] = np.asarray(alpha)
        for role, a in factors.items():
            a = np.asarray(a * (0.3 if a.ndim else 1.0), np.float32)
            kohya[f"lora_unet_{module.replace('.', '_')}.{role}"] = a
            named[f"diffusion_model.{module}.{role}"] = a
    save_file(kohya, str(kohya_path))
    save_file(named, str(diffusers_path))


LTX2_ALPHA_MODULES = {  # original name -> (diffusers module, alpha or None)
    "patchify_proj": ("proj_in", 2.0),
    "adaln_single.linear": ("time_embed.linear", 8.0),
    "transformer_blocks.0.attn1.to_q": ("transformer_blocks.0.attn1.to_q", 1.0),
    "transformer_blocks.0.audio_to_video_attn.to_k": ("transformer_blocks.0.audio_to_video_attn.to_k", None),
    "av_ca_a2v_gate_adaln_single.linear": ("av_cross_attn_video_a2v_gate.linear", 6.0),
}
CONNECTOR_ALPHA_MODULES = {"aggregate_embed": ("text_proj_in", 3.0),
                           "video_connector.transformer_blocks.0.attn1.to_q": ("video_connector.transformer_blocks.0.attn1.to_q", 8.0)}


def ltx2_alpha_pair(path, baked_path, down: str, up: str, seed: int):
    """An LTX-2 file with `.alpha` keys (factor names `down`/`up`) and the reference copy: `lora_A` scaled by
    alpha/rank, `lora_B`, no alpha keys."""
    rng, t, baked = _rng(seed), {}, {}
    shapes = {**_LTX2_SHAPES, **_CONNECTOR_SHAPES}
    for prefix, modules in (("diffusion_model", LTX2_ALPHA_MODULES), ("text_embedding_projection", CONNECTOR_ALPHA_MODULES)):
        for src, (module, alpha) in modules.items():
            a, b = _pair(rng, shapes[module])
            t[f"{prefix}.{src}.{down}"], t[f"{prefix}.{src}.{up}"] = a, b
            if alpha is not None:
                t[f"{prefix}.{src}.alpha"] = np.asarray(alpha, np.float32)
            scale = 1.0 if alpha is None else alpha / RANK
            baked[f"{prefix}.{src}.lora_A.weight"], baked[f"{prefix}.{src}.lora_B.weight"] = a * scale, b
    save_file(t, str(path))
    save_file(baked, str(baked_path))


# ---- reference, once for the module ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The files, and diffusers 0.42.1's base and fused weights per (case, component) (one subprocess)."""
    newest.require()
    tmp = tmp_path_factory.mktemp("zimage_ltx2_quirks")
    files = {name: tmp / f"{name}.safetensors" for name in (
        "z_shared", "z_anime", "z_lokr_kohya", "z_lokr_named", "ltx2_alpha", "ltx2_alpha_baked", "ltx2_down_alpha",
        "ltx2_down_alpha_baked")}
    z_shared(files["z_shared"])
    z_anime(files["z_anime"])
    z_lokr_pair(files["z_lokr_kohya"], files["z_lokr_named"])
    ltx2_alpha_pair(files["ltx2_alpha"], files["ltx2_alpha_baked"], "lora_A.weight", "lora_B.weight", 23)
    ltx2_alpha_pair(files["ltx2_down_alpha"], files["ltx2_down_alpha_baked"], "lora_down.weight", "lora_up.weight", 24)
    cases = {("z_shared", "transformer"): dict(**Z_IMAGE, lora=files["z_shared"], mixin="ZImageLoraLoaderMixin"),
             ("z_anime", "transformer"): dict(**Z_IMAGE, lora=files["z_anime"], mixin="ZImageLoraLoaderMixin"),
             ("z_lokr_kohya", "transformer"): dict(**Z_IMAGE, lora=files["z_lokr_named"], mixin="ZImageLoraLoaderMixin")}
    for name in ("ltx2_alpha", "ltx2_down_alpha"):
        baked = files[f"{name}_baked"]
        cases[(name, "transformer")] = dict(**LTX2, lora=baked, mixin="LTX2LoraLoaderMixin")
        cases[(name, "connectors")] = dict(**CONNECTORS, lora=baked, mixin="LTX2LoraLoaderMixin", component="connectors")
    results = newest.fused_many([{**c, "scale": SCALE} for c in cases.values()])
    return dict(files=files, results=dict(zip(cases, results)))


def _trees(ref, name, components=("transformer",)):
    bases, wants, infos = {}, {}, {}
    for c in components:
        base, fused, info = ref["results"][(name, c)]
        assert not [w for w in info["warnings"] if "unexpected" in w.lower() or "missing" in w.lower()], info["warnings"]
        bases[c], wants[c], infos[c] = flat_tree(base), flat_tree(fused), info
    return bases, wants, infos


def _load_fused(path, bases, **kwargs):
    trees = {c: nested(b) for c, b in bases.items()}
    adapters, report = jlora.load_lora_weights(str(path), trees, return_report=True, **kwargs)
    return {c: flatten(jlora.fuse(trees[c], adapters[c], SCALE)) for c in trees}, report


def _file_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return set(f.keys())


def _complete(report, path, fmt, redundant=()):
    assert report.format == fmt, report.summary()
    assert not report.unmatched and not report.unplaced and not report.skipped and not report.malformed, report.summary()
    assert set(report.redundant) == set(redundant)
    assert set(report.loaded_keys) | set(report.redundant) == _file_keys(path)
    assert not set(report.loaded_keys) & set(report.redundant)


# ---- 1. Lumina-2 / Z-Image shared names -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["z_image", None], ids=["family_named", "tree_shaped"])
def test_shared_lumina2_names_read_as_z_image(ref, family):
    """With `family="z_image"`, or a Z-Image params tree and no family, the shared feed-forward names are the Z-Image
    modules diffusers' Z-Image loader fuses (not Lumina-2's `feed_forward.linear_1`)."""
    bases, wants, infos = _trees(ref, "z_shared")
    got, report = _load_fused(ref["files"]["z_shared"], bases, family=family)
    _complete(report, ref["files"]["z_shared"], "z_image")
    changed = assert_fused_equal(got["transformer"], wants["transformer"], bases["transformer"])
    assert changed == {kernel(m) for m in SHARED_MODULES} == {kernel(m) for m in infos["transformer"]["loaded"]}


def test_shared_lumina2_names_by_keys_alone_are_lumina2_and_say_so(ref):
    """Keys alone (no family, a tree that shows no model) pick `lumina2`, every time, and the report names the other
    reading and the argument that selects it."""
    keys = sorted(_file_keys(ref["files"]["z_shared"]))
    for order in (keys, keys[::-1]):
        assert engine.detect_format(order).name == "lumina2"
    assert engine.detect_format(keys, family="z_image").name == "z_image"
    assert engine.detect_format(keys, family="lumina2").name == "lumina2"
    bases, _, _ = _trees(ref, "z_shared")
    only_ffn = {p: a for p, a in bases["transformer"].items() if p[:3] == ("layers", "0", "feed_forward")}
    with pytest.warns(UserWarning):
        _, report = jlora.load_lora(str(ref["files"]["z_shared"]), nested(only_ffn), "transformer", strict=False,
                                    return_report=True)
    assert report.format == "lumina2"
    assert report.also_read_as == ["z_image (family='z_image')"]
    assert "also z_image (family='z_image')" in report.summary()
    assert report.unplaced and not report.placed  # Lumina-2's linear_1 is not in this tree
    # the same tree with the family named: Z-Image's w1 and w2 of layer 0 (the refiners' modules are not in it)
    with pytest.warns(UserWarning):
        adapters, report = jlora.load_lora_weights(str(ref["files"]["z_shared"]), {"transformer": nested(only_ffn)},
                                                   family="z_image", strict=False, return_report=True)
    assert report.format == "z_image" and not report.also_read_as
    assert {p.module for p in report.placed} == {"layers.0.feed_forward.w1", "layers.0.feed_forward.w2"}


# ---- 2. Anime-Z: fused qkv and bare out next to the split keys -------------------------------------------------


def test_anime_z_repeats_are_left_out_as_diffusers_does(ref):
    """Layer 0's fused `qkv` and bare `out` repeat its split keys: left out (listed with what they repeat); noise_refiner
    0's, with no split keys, are split and loaded. Fused weights equal diffusers'."""
    path = ref["files"]["z_anime"]
    bases, wants, infos = _trees(ref, "z_anime")
    got, report = _load_fused(path, bases, family="z_image")
    repeated = {k for k in _file_keys(path) if k.rsplit(".lora.", 1)[0].removesuffix(".alpha") in ANIME_REPEATED}
    assert len(repeated) == 6
    _complete(report, path, "z_image", redundant=repeated)
    assert "to.q.lora.down.weight" in report.redundant["diffusion_model.layers.0.attention.qkv.lora.down.weight"]
    assert "left out as redundant: 6 keys" in report.summary()
    changed = assert_fused_equal(got["transformer"], wants["transformer"], bases["transformer"])
    assert changed == {kernel(m) for m in ANIME_MODULES} == {kernel(m) for m in infos["transformer"]["loaded"]}


def test_anime_z_partial_repeat_is_a_typed_error(ref):
    """A fused `qkv` next to only some split keys: which holds the rest? A typed error names both key sets and the fix;
    with strict=False that block's `qkv` is reported as malformed and the rest loads."""
    from safetensors.numpy import load_file

    tensors = load_file(str(ref["files"]["z_anime"]))
    partial = {k: v for k, v in tensors.items() if ".attention.to.v." not in k}
    bases, _, _ = _trees(ref, "z_anime")
    trees = {"transformer": nested(bases["transformer"])}
    with pytest.raises(jlora.JloraError, match=r"layers\.0\.attention\.qkv\.lora\.down\.weight.*to\.q.*remove the fused") as e:
        jlora.load_lora_weights(dict(partial), trees, family="z_image")
    assert "to_v" in str(e.value) and "to.k.lora.down.weight" in str(e.value)
    with pytest.warns(UserWarning):
        _, report = jlora.load_lora_weights(dict(partial), trees, family="z_image", strict=False, return_report=True)
    assert {k for k in report.malformed} == {k for k in partial if "layers.0.attention.qkv" in k}
    assert "diffusion_model.layers.0.attention.to.q.lora.down.weight" in report.loaded_keys


# ---- 3. kohya-named Z-Image LoKr, LTX-2 with .alpha ------------------------------------------------------------


def test_kohya_z_image_lokr_against_diffusers_on_diffusers_names(ref):
    """Every key of the kohya-named LoKr (factors and `.alpha`) is loaded; fused weights equal diffusers' on the same
    tensors under `diffusion_model.` names."""
    path = ref["files"]["z_lokr_kohya"]
    bases, wants, infos = _trees(ref, "z_lokr_kohya")
    got, report = _load_fused(path, bases, family="z_image")
    _complete(report, path, "z_image")
    changed = assert_fused_equal(got["transformer"], wants["transformer"], bases["transformer"])
    assert changed == {kernel(m) for m in LOKR_MODULES}
    assert {kernel(m) for m in LOKR_MODULES} <= {kernel(m) for m in infos["transformer"]["loaded"]} | changed


@pytest.mark.parametrize("name", ["ltx2_alpha", "ltx2_down_alpha"])
def test_ltx2_alpha_files_against_diffusers_on_baked_alphas(ref, name):
    """LTX-2 files with `.alpha` (and one module without: alpha = rank) load every key, transformer and connectors;
    fused weights equal diffusers' on the alpha-baked copy."""
    path = ref["files"][name]
    bases, wants, infos = _trees(ref, name, ("transformer", "connectors"))
    got, report = _load_fused(path, bases, family="ltx2")
    _complete(report, path, "ltx2")
    assert sorted({p.alpha for p in report.placed}) == [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
    for component, modules in (("transformer", LTX2_ALPHA_MODULES), ("connectors", CONNECTOR_ALPHA_MODULES)):
        changed = assert_fused_equal(got[component], wants[component], bases[component])
        assert changed == {kernel(m) for m, _ in modules.values()} == {kernel(m) for m in infos[component]["loaded"]}


# ---- 4. shape indexes and `jlora inspect` ------------------------------------------------------------------------

INDEX_CASES = {  # builder -> (tiny model spec, released config) ; diffusers' defaults are the released models'
    "z_image_index": (Z_IMAGE, "Z_IMAGE_TURBO"),
    "ltx2_index": (LTX2, "LTX2_19B"),
    "ltx2_connectors_index": (CONNECTORS, "LTX2_19B_CONNECTORS"),
}


def mirror_shapes(shapes: dict) -> dict:
    """`{torch name: shape}` -> `{torch-mirror path: shape}` (as `flat_tree` places arrays, without any arrays)."""
    out = {}
    for name, shape in shapes.items():
        *module, leaf = name.split(".")
        shape = tuple(shape)
        if leaf == "weight":
            leaf = "scale" if len(shape) == 1 else "kernel"
            shape = shape if len(shape) < 2 else (*shape[2:], shape[1], shape[0])
        out[tuple(module) + (leaf,)] = shape
    return out


def test_z_image_and_ltx2_indexes_match_the_models():
    """Each index has exactly the torch-mirror leaves and shapes of diffusers 0.42.1's model: the tiny seeded models'
    state dicts, and the models built from diffusers' default configs on the meta device (released sizes)."""
    from converters import architectures_dit as A

    specs = []
    for spec, _ in INDEX_CASES.values():
        specs += [dict(op="state_dict", **spec),
                  dict(op="shapes", model=spec["model"], module=spec.get("module"), config={})]
    arrays, info = newest.call("batch", cases=specs)
    for i, (name, (spec, released)) in enumerate(INDEX_CASES.items()):
        tiny = {k[len(f"{2 * i}/"):]: v for k, v in arrays.items() if k.startswith(f"{2 * i}/")}
        want = {p: a.shape for p, a in flat_tree(tiny).items()}
        assert {p: s for p, (s, _) in getattr(A, name)(spec["config"]).items()} == want, name
        index = getattr(A, name)(getattr(A, released))
        assert {p: s for p, (s, _) in index.items()} == mirror_shapes(info["cases"][2 * i + 1]["shapes"]), name
    index = A.z_image_index()
    assert index[kernel("layers.29.feed_forward.w1")][0] == (3840, 10240)
    assert index[kernel("layers.0.adaLN_modulation.0")][0] == (256, 15360)
    index = A.ltx2_index()
    assert index[kernel("transformer_blocks.47.audio_to_video_attn.to_q")][0] == (4096, 2048)
    assert A.ltx2_connectors_index()[kernel("text_proj_in")][0] == (188160, 3840)


def _rank1(path, modules: dict) -> str:
    """A rank-1 file: `{key stem: ((in, out), down name, up name)}` (no weights needed to inspect it)."""
    rng, t = _rng(30), {}
    for stem, ((n_in, n_out), down, up) in modules.items():
        t[f"{stem}.{down}"] = rng.standard_normal((1, n_in)).astype(np.float32)
        t[f"{stem}.{up}"] = rng.standard_normal((n_out, 1)).astype(np.float32)
    save_file(t, str(path))
    return str(path)


def _fits(info: dict) -> bool:
    return "error" not in info and info["targets"] > 0 and not info["unplaced"] and not info.get("malformed")


def test_inspect_z_image_and_ltx2_files(tmp_path, capsys):
    """`jlora inspect` knows Z-Image-Turbo's and LTX-2 19B's shapes: files fit their family (guessed from the format,
    or given with --family) and not the other's; Lumina-2 / Z-Image shared names are Z-Image with --family z_image."""
    import json

    from jlora.cli import main
    from jlora.inspection import inspect_file

    lora = ("lora_A.weight", "lora_B.weight")
    z = _rank1(tmp_path / "z.safetensors", {
        "diffusion_model.layers.29.attention.to_q": ((3840, 3840), *lora),
        "diffusion_model.all_x_embedder.2-1": ((64, 3840), *lora),
        "lora_unet_noise_refiner_1_feed_forward_w2": ((10240, 3840), "lora_down.weight", "lora_up.weight")})
    info = inspect_file(z)
    assert info["format"] == "z_image" and info["family"] == "z_image" and _fits(info), info.get("error")
    assert info["weights"] == 3 and info["components"]["transformer"]["placed_modules"] == 3
    assert not _fits(inspect_file(z, family="ltx2"))
    shared = _rank1(tmp_path / "shared.safetensors", {
        "diffusion_model.layers.29.feed_forward.w1": ((3840, 10240), *lora),
        "diffusion_model.context_refiner.1.feed_forward.w3": ((3840, 10240), *lora)})
    assert inspect_file(shared)["format"] == "lumina2"  # by its keys alone
    assert main(["inspect", shared, "--family", "z_image", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "z_image" and info["family"] == "z_image" and _fits(info) and info["weights"] == 2

    ltx = _rank1(tmp_path / "ltx2.safetensors", {
        "diffusion_model.patchify_proj": ((128, 4096), *lora),
        "diffusion_model.transformer_blocks.47.audio_to_video_attn.to_q": ((4096, 2048), *lora),
        "diffusion_model.av_ca_v2a_gate_adaln_single.linear": ((2048, 2048), *lora),
        "text_embedding_projection.aggregate_embed": ((188160, 3840), *lora),
        "text_embedding_projection.audio_connector.transformer_blocks.1.ff.net.2": ((15360, 3840), *lora)})
    assert main(["inspect", ltx]) == 0
    text = capsys.readouterr().out
    assert "format      ltx2  (checked against family ltx2, guessed)" in text
    info = inspect_file(ltx)
    assert _fits(info) and info["weights"] == 5, info.get("error")
    assert {c: v["placed_modules"] for c, v in info["components"].items()} == {"transformer": 3, "connectors": 2}
    assert main(["inspect", ltx, "--family", "z_image"]) == 1
    assert "cannot place" in capsys.readouterr().out
