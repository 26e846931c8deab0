"""Flux.2 LoRA and LoKr files against diffusers 0.42.1 (`Flux2LoraLoaderMixin`), at the level of fused weights.

diffusers 0.42.1 runs in the second reference environment (tests/newest.py). A tiny `Flux2Transformer2DModel` is
built there from a config (seeded); its weights make a torch-mirror tree here (diffusers module names, (in, out)
kernels, norm weights as `scale`). Each file is read by diffusers (`Flux2LoraLoaderMixin.lora_state_dict` +
`load_lora_into_transformer`, `fuse_lora(lora_scale=s)`) and by jlora (`load_lora_weights` + `fuse`), and the
fused weights must agree within 1e-5 relative, changing exactly the weights the file names.

The PEFT file comes from PEFT (`add_adapter(LoraConfig)`) and diffusers' `save_lora_weights`; the other layouts are
written with the key names diffusers' Flux.2 converters read. Where diffusers 0.42.1 departs from the format the
reference is the format's math on the same weights, as each test says:
  * ai-toolkit `final_layer.adaLN_modulation.1`: BFL stores (shift, scale) rows and diffusers' `norm_out.linear` is
    (scale, shift) (its Flux.2 checkpoint converter swaps them; its LoRA converter does not): the reference is
    diffusers' own delta with the two halves exchanged;
  * kohya files: diffusers' kohya Flux.2 converter drops (with a warning) the guidance embedder, the shared
    modulations and the final modulation: those weights' reference is `alpha / r * up @ down`.
A BFL LoKr on a fused `qkv` is fused by diffusers into `to_qkv` (it fuses the model's projections first); its rows are
compared with jlora's `to_q`, `to_k`, `to_v`.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import save_file

import jlora
from converters import architectures, engine
from converters.convert import target_modules
from converters.errors import InvalidAdapterError
from jlora.cli import main
from jlora.inspection import inspect_file
from jlora.leaf import LokrLeaf
from tests import newest
from mirror import flatten, kernel, nested  # noqa: E402

MODEL, MIXIN = "Flux2Transformer2DModel", "Flux2LoraLoaderMixin"
CONFIG = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=[4, 4, 4, 4])
SCALE, RANK = 0.7, 4
_D, _S = "transformer_blocks.0", "single_transformer_blocks.0"

# BFL module -> the diffusers modules it covers (row blocks in order).
BFL = {
    "double_blocks.0.img_attn.qkv": (f"{_D}.attn.to_q", f"{_D}.attn.to_k", f"{_D}.attn.to_v"),
    "double_blocks.0.txt_attn.qkv": (f"{_D}.attn.add_q_proj", f"{_D}.attn.add_k_proj", f"{_D}.attn.add_v_proj"),
    "double_blocks.0.img_attn.proj": (f"{_D}.attn.to_out.0",),
    "double_blocks.0.txt_attn.proj": (f"{_D}.attn.to_add_out",),
    "double_blocks.0.img_mlp.0": (f"{_D}.ff.linear_in",),
    "double_blocks.0.img_mlp.2": (f"{_D}.ff.linear_out",),
    "double_blocks.0.txt_mlp.0": (f"{_D}.ff_context.linear_in",),
    "double_blocks.0.txt_mlp.2": (f"{_D}.ff_context.linear_out",),
    "single_blocks.0.linear1": (f"{_S}.attn.to_qkv_mlp_proj",),
    "single_blocks.0.linear2": (f"{_S}.attn.to_out",),
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_guidance_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_guidance_embed.timestep_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
}
SHARED = {  # read by diffusers' ai-toolkit converter, not by its kohya one
    "guidance_in.in_layer": ("time_guidance_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_guidance_embed.guidance_embedder.linear_2",),
    "double_stream_modulation_img.lin": ("double_stream_modulation_img.linear",),
    "double_stream_modulation_txt.lin": ("double_stream_modulation_txt.linear",),
    "single_stream_modulation.lin": ("single_stream_modulation.linear",),
}
FINAL = {"final_layer.adaLN_modulation.1": ("norm_out.linear",)}  # (shift, scale) -> (scale, shift)
ALL = {**BFL, **SHARED, **FINAL}
PEFT_TARGETS = sorted({m for mods in ALL.values() for m in mods} | {"norm_out.linear"})
# LoKr: BFL sources diffusers maps (qkv onto its fused to_qkv) and LyCORIS names of diffusers modules.
LOKR_BFL = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
            "double_blocks.0.img_mlp.0", "single_blocks.0.linear1", "single_stream_modulation.lin", "final_layer.linear")
LOKR_LYCORIS = (f"{_D}.attn.to_q", f"{_D}.attn.to_v", f"{_D}.attn.to_out.0", f"{_D}.attn.add_k_proj",
                f"{_D}.ff.linear_in", f"{_D}.ff_context.linear_out", f"{_S}.attn.to_qkv_mlp_proj", f"{_S}.attn.to_out")
LOKR_FULL = ("final_layer.linear", f"{_S}.attn.to_out")  # stored with a full w2 (no alpha applies)


# ---- torch state dict <-> torch-mirror tree ---------------------------------------------------


def path_of(name: str) -> tuple[str, ...]:
    *module, leaf = name.split(".")
    return tuple(module) + (leaf,)


def mirror(sd: dict[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    out = {}
    for name, a in sd.items():
        *module, leaf = name.split(".")
        a = np.asarray(a, np.float32)
        if leaf == "weight":
            leaf, a = ("kernel", a.T) if a.ndim == 2 else ("scale", a)
        out[tuple(module) + (leaf,)] = np.ascontiguousarray(a)
    return out


def swap_rows(a: np.ndarray) -> np.ndarray:
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]])


# ---- writing files ----------------------------------------------------------------------------


def out_in(sd, modules) -> tuple[int, int]:
    shapes = [sd[f"{m}.weight"].shape for m in modules]
    return sum(s[0] for s in shapes), shapes[0][1]


def lora_tensors(sd, table, rng) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{source: (down (r, in), up (out, r))}`."""
    out = {}
    for src, modules in table.items():
        n_out, n_in = out_in(sd, modules)
        out[src] = ((rng.standard_normal((RANK, n_in)) * 0.5).astype(np.float32),
                    (rng.standard_normal((n_out, RANK)) * 0.5).astype(np.float32))
    return out


def write(path, tensors: dict) -> str:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path))
    return str(path)


def bfl_file(path, factors, prefix: str) -> str:
    return write(path, {k: v for src, (down, up) in factors.items()
                        for k, v in ((f"{prefix}{src}.lora_A.weight", down), (f"{prefix}{src}.lora_B.weight", up))})


def kohya_file(path, factors, alpha: float) -> str:
    tensors = {}
    for src, (down, up) in factors.items():
        name = "lora_unet_" + src.replace(".", "_")
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": np.asarray(alpha, np.float32)})
    return write(path, tensors)


def lokr_factors(n_out: int, n_in: int, rng, full: bool) -> dict[str, np.ndarray]:
    """w1 (4, 4) and w2 (out/4, in/4), w2 decomposed at rank 2 unless `full` (the split PEFT's LoKr rebuilds)."""
    o2, i2 = n_out // 4, n_in // 4
    out = {"lokr_w1": rng.standard_normal((4, 4)) * 0.5}
    if full:
        out["lokr_w2"] = rng.standard_normal((o2, i2)) * 0.3
    else:
        out["lokr_w2_a"] = rng.standard_normal((o2, 2)) * 0.5
        out["lokr_w2_b"] = rng.standard_normal((2, i2)) * 0.5
    return out


def lokr_file(path, sd, names: dict[str, tuple[str, ...]], key, rng, alpha: float = 3.0) -> str:
    tensors = {}
    for src, modules in names.items():
        n_out, n_in = out_in(sd, modules)
        full = src in LOKR_FULL
        for role, t in lokr_factors(n_out, n_in, rng, full).items():
            tensors[f"{key(src)}.{role}"] = t
        if not full:
            tensors[f"{key(src)}.alpha"] = np.asarray(alpha)
    return write(path, tensors)


# ---- jlora and comparisons --------------------------------------------------------------------


def jlora_fused(path, base: dict, **kw):
    adapters, report = jlora.load_lora_weights(path, {"transformer": nested(base)}, family="flux2",
                                               return_report=True, **kw)
    return flatten(jlora.fuse(nested(base), adapters["transformer"], SCALE)), report, adapters["transformer"]


def assert_fused_equal(got: dict, want: dict, base: dict) -> tuple[set, float]:
    """Leaf-by-leaf agreement within 1e-5 relative; returns the paths the LoRA changed and the largest error."""
    assert got.keys() == want.keys()
    changed, worst = set(), 0.0
    for path, w in want.items():
        g = got[path]
        assert g.shape == w.shape, path
        err = float(np.max(np.abs(g - w))) / max(float(np.max(np.abs(w))), 1e-12)
        worst = max(worst, err)
        assert err <= 1e-5, f"{'/'.join(path)}: relative max|diff| {err}"
        if not np.array_equal(w, base[path]):
            assert not np.allclose(w, base[path], rtol=1e-3, atol=1e-3), f"{'/'.join(path)}: change too small to test"
            changed.add(path)
    return changed, worst


def assert_complete(report, keys, fmt: str) -> None:
    assert report.format == fmt
    assert not report.unmatched and not report.unplaced and not report.skipped, report.summary()
    assert set(report.loaded_keys) == set(keys)


def diffusers_tree(fused: dict) -> dict:
    """diffusers' fused weights as a torch-mirror tree; a fused `to_qkv` / `to_added_qkv` goes back to its rows."""
    sd = dict(fused)
    for fused_name, parts in (("to_qkv", ("to_q", "to_k", "to_v")), ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        for name in [n for n in sd if n.endswith(f".attn.{fused_name}.weight")]:
            prefix = name[: -len(f"{fused_name}.weight")]
            for part, rows in zip(parts, np.split(sd.pop(name), 3)):
                sd[f"{prefix}{part}.weight"] = rows
    return mirror(sd)


# ---- the reference run (one subprocess for the files, one for every fused case) ----------------


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Every file written here (widths from `architectures.flux2_index`, itself checked against the model), then one
    reference subprocess: the seeded model's weights, the PEFT file, and diffusers' fused weights for each file."""
    newest.require()
    tmp = tmp_path_factory.mktemp("flux2")
    index = architectures.flux2_index(CONFIG)
    sd = {".".join(p[:-1]) + ".weight": np.zeros(s[::-1], np.float32) for p, (s, _) in index.items()}  # shapes only
    rng = np.random.default_rng(0)
    factors = lora_tensors(sd, ALL, rng)
    files = {"peft": str(tmp / "peft.safetensors")}
    files["ai_toolkit"] = bfl_file(tmp / "ai_toolkit.safetensors", factors, "diffusion_model.")
    files["base_model"] = bfl_file(tmp / "base_model.safetensors", factors, "base_model.model.")
    files["plain"] = bfl_file(tmp / "plain.safetensors", {k: factors[k] for k in BFL}, "diffusion_model.")
    files["kohya"] = kohya_file(tmp / "kohya.safetensors", factors, alpha=2.0)
    dotted = {k.replace("lora_unet_", "diffusion_model.", 1): v for k, v in jlora.lora_state_dict(files["kohya"]).items()}
    for src in ALL:  # the underscored names back to BFL's dots
        flat = "diffusion_model." + src.replace(".", "_")
        dotted = {(f"diffusion_model.{src}" + k[len(flat):] if k.startswith(flat + ".") else k): v
                  for k, v in dotted.items()}
    files["lokr_bfl"] = lokr_file(tmp / "lokr_bfl.safetensors", sd, {k: ALL[k] for k in LOKR_BFL},
                                  lambda s: f"diffusion_model.{s}", rng)
    files["lokr_lycoris"] = lokr_file(tmp / "lokr_lycoris.safetensors", sd, {m: (m,) for m in LOKR_LYCORIS},
                                      lambda m: "lycoris_" + m.replace(".", "_"), rng)
    files["lokr_bare"] = lokr_file(tmp / "lokr_bare.safetensors", sd, {m: (m,) for m in LOKR_LYCORIS}, lambda m: m,
                                   np.random.default_rng(5))
    # jlora's LoKr adapters (read from the LyCORIS file onto the model's shapes) saved by jlora, for diffusers.
    lokr_adapter = jlora.load_lora(files["lokr_lycoris"], jlora.abstract_params(index), "transformer")
    files["lokr_saved"] = jlora.save_lora_weights(tmp / "saved", {"transformer": lokr_adapter})
    lora_adapter = jlora.load_lora(files["ai_toolkit"], jlora.abstract_params(index), "transformer")
    files["lora_saved"] = jlora.save_lora_weights(tmp / "saved_lora", {"transformer": lora_adapter})
    dotted_path = write(tmp / "dotted_kohya.safetensors", dotted)
    names = [n for n in files if n != "peft"]
    files["dotted_kohya"] = dotted_path  # no diffusers case: its reference is the kohya file's
    common = dict(op="fused", model=MODEL, config=CONFIG, mixin=MIXIN, seed=0, scale=SCALE, component="transformer",
                  dtype="float32")
    arrays, info = newest.call("batch", cases=[
        {"op": "state_dict", "model": MODEL, "config": CONFIG, "seed": 0},
        {"op": "peft_file", "model": MODEL, "config": CONFIG, "seed": 0, "r": RANK, "alpha": 6,
         "targets": PEFT_TARGETS, "mixin": MIXIN, "path": files["peft"]},
        *({**common, "lora": files[n]} for n in ["peft"] + names),
    ])
    out = {"sd": {k[2:]: v for k, v in arrays.items() if k.startswith("0/")}, "files": files, "factors": factors}
    out["base"] = mirror(out["sd"])
    for i, n in enumerate(["peft"] + names, start=2):
        fused = {k[len(f"{i}/fused/"):]: v for k, v in arrays.items() if k.startswith(f"{i}/fused/")}
        out[n] = (diffusers_tree(fused), info["cases"][i])
    return out


def expected(table) -> set:
    return {kernel(m) for mods in table.values() for m in mods}


# ---- LoRA layouts -----------------------------------------------------------------------------


def test_peft_file(ref):
    """PEFT + diffusers' saver (diffusers names, `transformer.` prefix, adapter metadata alpha 6 / r 4)."""
    want, _ = ref["peft"]
    got, report, _ = jlora_fused(ref["files"]["peft"], ref["base"])
    changed, _ = assert_fused_equal(got, want, ref["base"])
    assert changed == {kernel(m) for m in PEFT_TARGETS}
    assert_complete(report, jlora.lora_state_dict(ref["files"]["peft"]), "peft")


@pytest.mark.parametrize("name", ["ai_toolkit", "base_model"])
def test_bfl_names(ref, name):
    """ai-toolkit (`diffusion_model.`) and PEFT-saved (`base_model.model.`) BFL names with `lora_A` / `lora_B`:
    diffusers' fused weights, except `norm_out.linear`, whose reference is diffusers' delta with the
    (shift, scale) halves exchanged (diffusers 0.42.1's Flux.2 LoRA converter leaves them in BFL order)."""
    want, _ = ref[name]
    base = ref["base"]
    norm_out = kernel("norm_out.linear")
    want = dict(want)
    want[norm_out] = base[norm_out] + swap_rows((want[norm_out] - base[norm_out]).T).T
    got, report, _ = jlora_fused(ref["files"][name], base)
    changed, _ = assert_fused_equal(got, want, base)
    assert changed == expected(ALL)
    assert_complete(report, jlora.lora_state_dict(ref["files"][name]), "flux2")


def test_bfl_names_without_flux2_markers(ref):
    """A BFL file naming only modules Flux.1 also has: read as Flux.2 because the target is a Flux.2 model."""
    path = ref["files"]["plain"]
    keys = jlora.lora_state_dict(path).keys()
    assert engine.detect_format(keys).name == "comfy_flux"  # keys alone: Flux.1
    assert engine.detect_format(keys, modules=target_modules({"transformer": ref["base"]})).name == "flux2"
    want, _ = ref["plain"]
    got, report, _ = jlora_fused(path, ref["base"])
    changed, _ = assert_fused_equal(got, want, ref["base"])
    assert changed == expected(BFL)
    assert_complete(report, keys, "flux2")


def test_lora_saved_by_jlora_reloads_in_diffusers(ref):
    """The ai-toolkit file as jlora reads it, saved by `save_lora_weights` (diffusers names, q/k/v pieces as their own
    modules, final modulation already in diffusers' order): diffusers reads it to the weights jlora fuses."""
    want, _ = ref["lora_saved"]
    got, _, _ = jlora_fused(ref["files"]["ai_toolkit"], ref["base"])
    changed, _ = assert_fused_equal(got, want, ref["base"])
    assert changed == expected(ALL)


def kohya_want(ref) -> dict:
    """The reference for the kohya factors at alpha 2: diffusers' fused weights where its kohya converter reads the
    module, and `alpha / r * up @ down` (final modulation rows swapped) for the ones it drops."""
    want, base = dict(ref["kohya"][0]), ref["base"]
    dropped = {kernel(m) for mods in {**SHARED, **FINAL}.values() for m in mods}
    assert all(np.array_equal(want[p], base[p]) for p in dropped)  # diffusers 0.42.1 left them alone
    for src, modules in {**SHARED, **FINAL}.items():
        down, up = ref["factors"][src]
        delta = 2.0 / RANK * (up.astype(np.float64) @ down.astype(np.float64))
        if src in FINAL:
            delta = swap_rows(delta)
        want[kernel(modules[0])] = (base[kernel(modules[0])] + SCALE * delta.T).astype(np.float32)
    return want


@pytest.mark.parametrize("name,fmt", [("kohya", "kohya_flux2"), ("dotted_kohya", "flux2")])
def test_kohya_factors(ref, name, fmt):
    """kohya `lora_unet_double_blocks_0_img_attn_qkv` + `.alpha` 2 (rank 4), and the same factors as
    `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight` + `.alpha` (which diffusers 0.42.1 sends to its
    kohya converter and drops whole): both against `kohya_want`."""
    base = ref["base"]
    got, report, _ = jlora_fused(ref["files"][name], base)
    changed, _ = assert_fused_equal(got, kohya_want(ref), base)
    assert changed == expected(ALL)
    assert_complete(report, jlora.lora_state_dict(ref["files"][name]), fmt)


# ---- LoKr -------------------------------------------------------------------------------------


def test_lokr_bfl(ref):
    """ai-toolkit LoKr in BFL names (`lokr_w1`, `lokr_w2_a/b`, `.alpha` 3 at rank 2; one full w2): diffusers bakes
    alpha / rank into w1 and fuses the model's q/k/v for the fused `qkv` LoKr; jlora's q, k, v rows equal it."""
    want, info = ref["lokr_bfl"]
    got, report, adapter = jlora_fused(ref["files"]["lokr_bfl"], ref["base"])
    changed, _ = assert_fused_equal(got, want, ref["base"])
    assert changed == expected({k: ALL[k] for k in LOKR_BFL})
    assert_complete(report, jlora.lora_state_dict(ref["files"]["lokr_bfl"]), "flux2")
    kinds = {p.module: p.leaf for p in report.placed}
    assert kinds[f"{_D}.attn.to_q"] == "diff" and kinds[f"{_D}.ff.linear_in"] == "lokr"


def test_lokr_lycoris(ref):
    """LyCORIS LoKr around the diffusers model (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`)."""
    want, _ = ref["lokr_lycoris"]
    got, report, adapter = jlora_fused(ref["files"]["lokr_lycoris"], ref["base"])
    changed, _ = assert_fused_equal(got, want, ref["base"])
    assert changed == {kernel(m) for m in LOKR_LYCORIS}
    assert_complete(report, jlora.lora_state_dict(ref["files"]["lokr_lycoris"]), "lycoris_prefixed")
    assert {p.leaf for p in report.placed} == {"lokr"}


def test_lokr_bare_diffusers_names(ref):
    """LoKr on bare dotted diffusers names with `.alpha` (SimpleTuner's export; diffusers bakes alpha / rank)."""
    want, _ = ref["lokr_bare"]
    got, report, _ = jlora_fused(ref["files"]["lokr_bare"], ref["base"])
    changed, _ = assert_fused_equal(got, want, ref["base"])
    assert changed == {kernel(m) for m in LOKR_LYCORIS}
    assert_complete(report, jlora.lora_state_dict(ref["files"]["lokr_bare"]), "diffusers_lokr")


def test_lokr_saved_by_jlora_reloads_in_diffusers(ref):
    """jlora's LoKr leaves saved by `save_lora_weights` (`transformer.{module}.lokr_w1` / `lokr_w2`, the factor folded
    into w1): diffusers (PEFT LoKr) reads the file back to the fused weights jlora has, and jlora reads it too."""
    want, info = ref["lokr_saved"]
    assert sorted(info["loaded"]) == sorted(LOKR_LYCORIS)
    base = ref["base"]
    mine, _, adapter = jlora_fused(ref["files"]["lokr_lycoris"], base)
    assert all(isinstance(leaf, LokrLeaf) for leaf in jax_leaves(adapter))
    changed, _ = assert_fused_equal(mine, want, base)
    assert changed == {kernel(m) for m in LOKR_LYCORIS}
    again, report, _ = jlora_fused(ref["files"]["lokr_saved"], base)
    assert_fused_equal(again, want, base)
    assert_complete(report, jlora.lora_state_dict(ref["files"]["lokr_saved"]), "diffusers_lokr")


def jax_leaves(adapter):
    import jax

    from jlora.leaf import is_adapter_leaf

    return [l for l in jax.tree.leaves(adapter, is_leaf=is_adapter_leaf) if l is not None]


# ---- shape index and inspect ------------------------------------------------------------------


def test_flux2_index_matches_the_model(ref):
    """`architectures.flux2_index` of the tiny config has exactly the tiny diffusers model's weights and shapes
    (the files above take their widths from it)."""
    index = architectures.flux2_index(CONFIG)
    assert {p: s for p, (s, _) in index.items()} == {p: a.shape for p, a in ref["base"].items()}


def _dev_file(path, cfg, rng, markers: bool = True) -> str:
    """A rank-1 ai-toolkit Flux.2 file at a released model's widths (for `inspect`, no weights needed)."""
    index = architectures.flux2_index(cfg)
    shape = lambda m: index[kernel(m)][0]  # noqa: E731  (in, out)
    last = cfg["num_single_layers"] - 1
    sources = {
        "double_blocks.0.img_attn.qkv": (shape(f"{_D}.attn.to_q")[0], 3 * shape(f"{_D}.attn.to_q")[1]),
        f"single_blocks.{last}.linear1": shape(f"single_transformer_blocks.{last}.attn.to_qkv_mlp_proj"),
        "double_stream_modulation_img.lin": shape("double_stream_modulation_img.linear"),
        "final_layer.adaLN_modulation.1": shape("norm_out.linear"),
    }
    if not markers:  # only names Flux.1 has too
        del sources["double_stream_modulation_img.lin"]
    tensors = {}
    for src, (n_in, n_out) in sources.items():
        tensors[f"diffusion_model.{src}.lora_A.weight"] = rng.standard_normal((1, n_in))
        tensors[f"diffusion_model.{src}.lora_B.weight"] = rng.standard_normal((n_out, 1))
    return write(path, tensors)


def fits(info: dict) -> bool:
    """Every key of the file placed on the models checked against."""
    return "error" not in info and info["targets"] > 0 and not info["unplaced"] and not info.get("malformed")


def test_inspect_flux2_files(tmp_path, capsys):
    """`jlora inspect` knows Flux.2 dev and klein shapes: a dev file fits dev (family from the format) and not
    klein 4B; a klein 4B file fits klein 4B; a file of names Flux.1 shares is read as Flux.2 with `--family flux2`."""
    rng = np.random.default_rng(1)
    dev = _dev_file(tmp_path / "dev.safetensors", architectures.FLUX2_DEV, rng)
    info = inspect_file(dev)
    assert info["format"] == "flux2" and info["family"] == "flux2" and fits(info), info.get("error")
    assert info["components"]["transformer"]["placed_modules"] == 4 and info["weights"] == 6
    assert not fits(inspect_file(dev, family="flux2_klein_4b"))
    klein = _dev_file(tmp_path / "klein.safetensors", architectures.FLUX2_KLEIN_4B, rng)
    assert fits(inspect_file(klein, family="flux2_klein_4b"))
    assert not fits(inspect_file(klein, family="flux2"))
    plain = _dev_file(tmp_path / "plain.safetensors", architectures.FLUX2_DEV, rng, markers=False)
    assert inspect_file(plain)["format"] == "comfy_flux"  # by its keys alone a Flux.1 file
    info = inspect_file(plain, family="flux2")
    assert info["format"] == "flux2" and fits(info) and info["weights"] == 5, info.get("error")
    assert main(["inspect", klein, "--family", "flux2_klein_4b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "flux2_klein_4b"
    # dev widths: hidden 6144, single-block fused projection 3 * 6144 + 2 * 18432 rows, shared modulation 6 * 6144
    index = architectures.flux2_index(architectures.FLUX2_DEV)
    assert index[kernel("single_transformer_blocks.47.attn.to_qkv_mlp_proj")][0] == (6144, 55296)
    assert index[kernel("double_stream_modulation_img.linear")][0] == (6144, 36864)
    assert index[kernel("context_embedder")][0] == (15360, 6144)


# ---- bad input --------------------------------------------------------------------------------


def test_tucker_lokr_on_a_split_qkv_is_a_typed_error(tmp_path):
    """A LoKr with a Tucker core on the fused `qkv` cannot be cut into q, k, v: the error names the key."""
    path = write(tmp_path / "tucker.safetensors", {
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": np.ones((4, 4)),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_a": np.ones((2, 24)),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2_b": np.ones((2, 8)),
        "diffusion_model.double_blocks.0.img_attn.qkv.lokr_t2": np.ones((2, 2, 1, 1)),
        "diffusion_model.single_stream_modulation.lin.lora_A.weight": np.ones((1, 32)),
        "diffusion_model.single_stream_modulation.lin.lora_B.weight": np.ones((96, 1)),
    })
    params = jlora.abstract_params(architectures.flux2_index(CONFIG))
    with pytest.raises(InvalidAdapterError, match=r"img_attn\.qkv.*cannot be split"):
        jlora.load_lora(path, params, "transformer")


def test_saving_lora_and_lokr_leaves_in_one_file_is_a_typed_error(ref, tmp_path):
    """diffusers reads a file with any LoKr key as LoKr only, so one component's LoRA and LoKr leaves are refused."""
    import jax

    from jlora.leaf import is_adapter_leaf

    params = jlora.abstract_params(architectures.flux2_index(CONFIG))
    lora = jlora.load_lora(ref["files"]["ai_toolkit"], params, "transformer")
    lokr = jlora.load_lora(ref["files"]["lokr_lycoris"], params, "transformer")
    mixed = jax.tree.map(lambda a, b: a if a is not None else b, lokr, lora, is_leaf=is_adapter_leaf)
    with pytest.raises(jlora.JloraError, match="LoRA and LoKr leaves cannot share"):
        jlora.save_lora_weights(tmp_path, {"transformer": mixed})
    assert not list(tmp_path.iterdir())
