"""LoRA files of the newest DiT families (Flux3, Krea 2, MiniMax-H3 + musubi-tuner, Anima/Cosmos, Ideogram 4,
ACE-Step 1.5) against diffusers 0.42.1, at the level of fused weights.

Reference: the newest diffusers in the second environment (tests/newest.py): each tiny model is built there from
a small config (seeded), the file is read by the family's own loader mixin (`<Mixin>.lora_state_dict`, which runs
its converter for the original layouts, then `load_lora_into_transformer` / `load_lora_adapter`) and fused by PEFT
at `SCALE`. jlora loads the same file onto a torch-mirror Flax tree (`transformer_blocks/0/attn/to_q/kernel`,
(in, out) kernels) built from the same base weights and fuses it. Fused weights must agree within 1e-5 relative,
the LoRA must change exactly the weights the file names, every key must be consumed, and auto-detection must
give the format. Each family also has a diffusers/PEFT-named file (with `lora_adapter_metadata`: rank, alpha and
an alpha pattern), which stays the generic `peft` format.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import jlora
import newest
from converters import engine
from converters.guess import guess_family
from test_dit_formats import assert_detected, assert_fused_equal, assert_report_complete, flatten, nested

SCALE = 0.7
RANK = 4

MODELS = {
    "flux3": ("Flux3Transformer2DModel", dict(
        in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, axes_dims_rope=(2, 2, 2, 2))),
    "krea2": ("Krea2Transformer2DModel", dict(
        in_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, timestep_embed_dim=16, text_hidden_dim=16, num_text_layers=2, text_num_attention_heads=2,
        text_num_key_value_heads=2, text_intermediate_size=32, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4))),
    "ideogram4": ("Ideogram4Transformer2DModel", dict(
        in_channels=8, num_layers=1, attention_head_dim=8, num_attention_heads=2, intermediate_size=32, adaln_dim=16,
        llm_features_dim=16, mrope_section=(2, 1, 1))),
    "minimax_h3": ("MiniMaxH3Transformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, hidden_size=16, num_layers=1, num_refiner_layers=1, ffn_dim=32,
        in_channels=4, audio_in_channels=8, text_dim=16, freq_dim=16, time_embed_hidden_dim=16, time_embed_dim=8,
        rope_freq_dim=2)),
    "minimax_h3_128": ("MiniMaxH3Transformer3DModel", dict(  # 128-wide heads, as DiffSynth's qkv order assumes
        num_attention_heads=2, attention_head_dim=128, hidden_size=16, num_layers=1, num_refiner_layers=1, ffn_dim=32,
        in_channels=4, audio_in_channels=8, text_dim=16, freq_dim=16, time_embed_hidden_dim=16, time_embed_dim=8,
        rope_freq_dim=2)),
    "cosmos": ("CosmosTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=1, attention_head_dim=16, num_layers=1, text_embed_dim=16,
        adaln_lora_dim=8, max_size=(4, 8, 8), patch_size=(1, 2, 2))),
    "anima_text": ("AnimaTextConditioner", dict(
        source_dim=16, target_dim=16, model_dim=16, num_layers=1, num_attention_heads=2, target_vocab_size=32)),
    "ace_step": ("AceStepTransformer1DModel", dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, in_channels=8, audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=4)),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One module of a file: its source name and the diffusers module(s) of `model` it covers."""

    src: str
    dst: tuple[str, ...]
    alpha: float | None = None


def E(src: str, *dst: str, alpha: float | None = None) -> Entry:
    return Entry(src, dst, alpha)


@dataclasses.dataclass(frozen=True)
class Case:
    """A file: entries on `model` (component `component`), written under `prefix` with these factor names."""

    model: str
    mixin: str
    fmt: str
    family: str
    entries: tuple[Entry, ...]
    prefix: str = "diffusion_model."
    down: str = "lora_A.weight"
    up: str = "lora_B.weight"
    component: str = "transformer"
    peft_alpha: float | None = None  # PEFT files: lora_alpha in the metadata (alpha_pattern gives *.to_k 3)
    header: tuple[tuple[str, str], ...] = ()  # other header entries
    keys_fmt: str | None = None  # what the keys alone detect, when the target model decides (else `fmt`)


_FP = (("q_proj", "attn.to_q"), ("k_proj", "attn.to_k"), ("v_proj", "attn.to_v"), ("attn_out", "attn.to_out.0"),
       ("mlp_in", "ff.linear_in"), ("mlp_out", "ff.linear_out"))
FLUX3 = (
    *(E(f"content_mode_blocks.{m}.0.{s}", f"mode_blocks.{m}.0.{d}") for m in ("image", "image_cond") for s, d in _FP),
    *(E(f"txt_mode_blocks.0.{s}", f"txt_mode_blocks.0.{d}") for s, d in _FP[::2]),
    *(E(f"single_blocks.0.{s}", f"single_transformer_blocks.0.{d}") for s, d in _FP),
    *(E(m, m) for m in ("context_embedder", "x_embedders.image", "early_stream_modulations.txt.linear",
                        "single_stream_modulations.image.linear", "timestep_embedder.linear_1", "norm_out.linear",
                        "proj_out")),
)

_KA = (("wq", "to_q"), ("wk", "to_k"), ("wv", "to_v"), ("wo", "to_out.0"), ("gate", "to_gate"))
KREA2 = (
    *(E(f"blocks.0.attn.{s}", f"transformer_blocks.0.attn.{d}") for s, d in _KA),
    *(E(f"blocks.0.mlp.{s}", f"transformer_blocks.0.ff.{s}") for s in ("gate", "up", "down")),
    *(E(f"txtfusion.{p}.0.attn.{s}", f"text_fusion.{p}.0.attn.{d}") for p in ("layerwise_blocks", "refiner_blocks")
      for s, d in _KA[1::2]),
    E("txtfusion.refiner_blocks.0.mlp.up", "text_fusion.refiner_blocks.0.ff.up"),
    E("first", "img_in"), E("last.linear", "final_layer.linear"), E("tmlp.0", "time_embed.linear_1"),
    E("tmlp.2", "time_embed.linear_2"), E("tproj.1", "time_mod_proj"), E("txtmlp.1", "txt_in.linear_1"),
    E("txtmlp.3", "txt_in.linear_2"),
)
KREA2_AI_TOOLKIT = KREA2[:4] + KREA2[8:10]

_IQKV = ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v")
IDEOGRAM4 = (
    E("layers.0.attention.qkv", *_IQKV, alpha=2.0),
    E("layers.0.attention.o", "layers.0.attention.to_out.0", alpha=6.0),
    *(E(f"layers.0.feed_forward.w{n}", f"layers.0.feed_forward.w{n}", alpha=1.0 + n) for n in (1, 2, 3)),
    E("layers.0.adaln_modulation", "layers.0.adaln_modulation", alpha=8.0),
)
IDEOGRAM4_PLAIN = (E("layers.0.attention.qkv", *_IQKV), E("layers.0.feed_forward.w2", "layers.0.feed_forward.w2"))


def _h3_block(src: str, dst: str, alpha: float | None = None) -> tuple[Entry, ...]:
    return (E(f"{src}.attn.qkv_proj", f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v", alpha=alpha),
            E(f"{src}.attn.out_proj", f"{dst}.attn.to_out.0", alpha=alpha and alpha + 1),
            E(f"{src}.mlp.fc1", f"{dst}.ff.net.0.proj", alpha=alpha and alpha + 2),
            E(f"{src}.mlp.fc2", f"{dst}.ff.net.2", alpha=alpha and alpha + 3))


def _h3(alpha: float | None) -> tuple[Entry, ...]:
    return (*_h3_block("blocks.0", "transformer_blocks.0", alpha),
            *_h3_block("token_refiner.blocks.0", "token_refiner.refiner_blocks.0", alpha and alpha * 2),
            E("blocks.0.adaln_proj.linear", "transformer_blocks.0.adaln_proj.linear", alpha=alpha),
            *(E(s, d, alpha=alpha) for s, d in (
                ("video_patch_proj", "proj_in"), ("audio_patch_proj", "audio_proj_in"), ("condition_proj", "context_embedder"),
                ("time_embedder.proj_in", "time_embedder.linear_1"), ("time_embedder.proj_out", "time_embedder.linear_2"),
                ("final_layer.adaln_proj.linear", "norm_out.linear"), ("final_layer.video_out", "proj_out"),
                ("final_layer.audio_out", "audio_proj_out"))))


MINIMAX_H3 = _h3(None)
MINIMAX_H3_KOHYA = _h3(3.0)
MUSUBI_MINIMAX_H3 = tuple(dataclasses.replace(e, src=e.src.replace(".", "_")) for e in MINIMAX_H3_KOHYA)

_AA = (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("output_proj", "to_out.0"))
ANIMA = (
    *(E(f"blocks.0.{s}.{a}", f"transformer_blocks.0.{d}.{b}") for s, d in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in _AA),
    *(E(f"blocks.0.adaln_modulation_{s}.{n}", f"transformer_blocks.0.{d}.linear_{n}")
      for s, d in (("self_attn", "norm1"), ("cross_attn", "norm2"), ("mlp", "norm3")) for n in (1, 2)),
    E("blocks.0.mlp.layer1", "transformer_blocks.0.ff.net.0.proj"), E("blocks.0.mlp.layer2", "transformer_blocks.0.ff.net.2"),
    E("final_layer.adaln_modulation.1", "norm_out.linear_1"), E("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    E("final_layer.linear", "proj_out"), E("t_embedder.1.linear_1", "time_embed.t_embedder.linear_1"),
    E("t_embedder.1.linear_2", "time_embed.t_embedder.linear_2"), E("x_embedder.proj.1", "patch_embed.proj"),
)
ANIMA_ADAPTER = tuple(E(f"llm_adapter.{m}", m) for m in (
    "blocks.0.self_attn.q_proj", "blocks.0.self_attn.o_proj", "blocks.0.cross_attn.k_proj", "blocks.0.mlp.0",
    "blocks.0.mlp.2", "out_proj"))

ACE_STEP = (
    *(E(f"layers.0.{a}.{s}_proj", f"layers.0.{a}.{d}") for a in ("self_attn", "cross_attn")
      for s, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    E("layers.0.mlp.gate_proj", "layers.0.mlp.gate_proj"), E("layers.0.mlp.down_proj", "layers.0.mlp.down_proj"),
)


def _peft(model: str, mixin: str, family: str, modules: tuple[str, ...], component: str = "transformer") -> Case:
    return Case(model, mixin, "peft", family, tuple(E(m, m) for m in modules), prefix=f"{component}.",
                component=component, peft_alpha=6.0)


CASES = {
    "flux3": Case("flux3", "Flux3LoraLoaderMixin", "flux3", "flux3", FLUX3),
    "flux3_peft": _peft("flux3", "Flux3LoraLoaderMixin", "flux3", (
        "mode_blocks.image.0.attn.to_q", "mode_blocks.image.0.attn.to_k", "txt_mode_blocks.0.ff.linear_in",
        "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.ff.linear_out", "x_embedders.image_cond")),
    "krea2": Case("krea2", "Krea2LoraLoaderMixin", "krea2", "krea2", KREA2),
    "krea2_ai_toolkit": Case("krea2", "Krea2LoraLoaderMixin", "krea2", "krea2", KREA2_AI_TOOLKIT,
                             prefix="base_model.model."),
    "krea2_peft": _peft("krea2", "Krea2LoraLoaderMixin", "krea2", (
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.down",
        "text_fusion.layerwise_blocks.0.attn.to_gate", "img_in", "time_mod_proj")),
    "minimax_h3": Case("minimax_h3", "MiniMaxH3LoraLoaderMixin", "minimax_h3", "minimax_h3", MINIMAX_H3),
    # a network alpha in the header (diffusers: every module at alpha / rank when no `.alpha` tensors)
    "minimax_h3_header_alpha": Case("minimax_h3", "MiniMaxH3LoraLoaderMixin", "minimax_h3", "minimax_h3", MINIMAX_H3[:6],
                                    header=(("alpha", "10"),)),
    "minimax_h3_kohya_bare": Case("minimax_h3", "MiniMaxH3LoraLoaderMixin", "minimax_h3", "minimax_h3",
                                  MINIMAX_H3_KOHYA, prefix="", down="lora_down.weight", up="lora_up.weight"),
    "musubi_minimax_h3": Case("minimax_h3", "MiniMaxH3LoraLoaderMixin", "musubi_minimax_h3", "minimax_h3",
                              MUSUBI_MINIMAX_H3, prefix="lora_unet_", down="lora_down.weight", up="lora_up.weight"),
    "minimax_h3_peft": _peft("minimax_h3", "MiniMaxH3LoraLoaderMixin", "minimax_h3", (
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.0.proj",
        "token_refiner.refiner_blocks.0.attn.to_k", "transformer_blocks.0.adaln_proj.linear", "proj_out")),
    # the second partition's own file (diffusers: `transformer_ref.` keys go to `transformer_ref`)
    "minimax_h3_ref_peft": _peft("minimax_h3", "MiniMaxH3LoraLoaderMixin", "minimax_h3", (
        "transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.adaln_proj.linear"),
        "transformer_ref"),
    # a peft dump: diffusers names with PEFT's adapter name and no component prefix (no metadata: alpha = rank)
    "minimax_h3_peft_dump": Case("minimax_h3", "MiniMaxH3LoraLoaderMixin", "peft", "minimax_h3", tuple(E(m, m) for m in (
        "transformer_blocks.0.attn.to_v", "transformer_blocks.0.ff.net.2", "token_refiner.refiner_blocks.0.attn.to_out.0",
        "audio_proj_out")), prefix="", down="lora_A.default.weight", up="lora_B.default.weight"),
    "diffsynth_minimax_h3": Case("minimax_h3_128", "MiniMaxH3LoraLoaderMixin", "diffsynth_minimax_h3", "minimax_h3",
                                 MINIMAX_H3[:5] + MINIMAX_H3[-2:], prefix="", down="lora_A.default.weight",
                                 up="lora_B.default.weight"),
    "anima": Case("cosmos", "AnimaLoraLoaderMixin", "anima", "anima", ANIMA),
    "anima_adapter": Case("anima_text", "AnimaLoraLoaderMixin", "anima", "anima", ANIMA_ADAPTER,
                          component="text_conditioner"),
    "cosmos_peft": _peft("cosmos", "CosmosLoraLoaderMixin", "cosmos", (
        "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn2.to_k", "transformer_blocks.0.norm1.linear_1",
        "transformer_blocks.0.ff.net.2", "patch_embed.proj", "proj_out")),
    "anima_adapter_peft": _peft("anima_text", "AnimaLoraLoaderMixin", "anima", (
        "blocks.0.self_attn.q_proj", "blocks.0.self_attn.k_proj", "blocks.0.mlp.0", "out_proj"), "text_conditioner"),
    "ideogram4_kohya": Case("ideogram4", "Ideogram4LoraLoaderMixin", "ideogram4", "ideogram4", IDEOGRAM4,
                            down="lora_down.weight", up="lora_up.weight"),
    "ideogram4_conditional": Case("ideogram4", "Ideogram4LoraLoaderMixin", "ideogram4", "ideogram4", IDEOGRAM4_PLAIN,
                                  prefix="conditional_transformer."),
    # A diffusers-named Ideogram 4 file with modules only Ideogram 4 has is `ideogram4` (Z-Image shares the rest) ...
    "ideogram4_peft": dataclasses.replace(_peft("ideogram4", "Ideogram4LoraLoaderMixin", "ideogram4", (
        "layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.feed_forward.w3", "layers.0.adaln_modulation",
        "adaln_proj", "llm_cond_proj", "final_layer.linear")), fmt="ideogram4"),
    # ... one of the names Z-Image shares is Z-Image by its keys alone and Ideogram 4 on an Ideogram 4 tree,
    "ideogram4_peft_shared": dataclasses.replace(_peft("ideogram4", "Ideogram4LoraLoaderMixin", "ideogram4", (
        "layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.feed_forward.w1", "layers.0.feed_forward.w3")),
        fmt="ideogram4", keys_fmt="z_image"),
    # ... and so is one of the original names Lumina2 shares.
    "ideogram4_lumina2_names": Case("ideogram4", "Ideogram4LoraLoaderMixin", "ideogram4", "ideogram4", IDEOGRAM4_PLAIN,
                                    keys_fmt="lumina2"),
    "ace_step": Case("ace_step", "AceStepLoraLoaderMixin", "ace_step", "ace_step", ACE_STEP, prefix="base_model.model."),
    "ace_step_peft": _peft("ace_step", "AceStepLoraLoaderMixin", "ace_step", (
        "layers.0.self_attn.to_q", "layers.0.cross_attn.to_k", "layers.0.mlp.up_proj", "condition_embedder")),
}


def np_tree(state_dict: dict) -> dict:
    """`{path: array}` of the torch-mirror Flax tree of a torch-layout numpy state dict."""
    out = {}
    for name, a in state_dict.items():
        *module, leaf = name.split(".")
        a = np.asarray(a, np.float32)
        if leaf == "weight":
            leaf = "scale" if a.ndim == 1 else "kernel"
            if a.ndim >= 2:
                a = a.transpose(*range(2, a.ndim), 1, 0)
        out[tuple(module) + (leaf,)] = a
    return out


def write_case(path, case: Case, base: dict, seed: int) -> list[str]:
    """The case's file (numpy factors sized from the base weights); returns its keys."""
    rng = np.random.default_rng(seed)
    tensors, targets = {}, []
    for e in case.entries:
        shapes = [base[f"{m}.weight"].shape for m in e.dst]
        key = f"{case.prefix}{e.src}."
        tensors[key + case.down] = rng.standard_normal((RANK, shapes[0][1])) * 0.5
        tensors[key + case.up] = rng.standard_normal((sum(s[0] for s in shapes), RANK)) * 0.5
        if e.alpha is not None:
            tensors[key + "alpha"] = np.asarray(e.alpha)
        targets += e.dst
    metadata = None
    if case.peft_alpha is not None:
        config = {"r": RANK, "lora_alpha": case.peft_alpha, "target_modules": sorted(targets),
                  "alpha_pattern": {"to_k": 3.0}, "rank_pattern": {}}
        metadata = {"lora_adapter_metadata": json.dumps({f"{case.component}.{k}": v for k, v in config.items()})}
    metadata = {**(metadata or {}), **dict(case.header)} or None
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return sorted(tensors)


def expected_paths(case: Case) -> set:
    return {tuple(m.split(".")) + ("kernel",) for e in case.entries for m in e.dst}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Per case: (file, keys, base tree, diffusers' fused tree, diffusers' wrapped modules); two subprocesses."""
    tmp = tmp_path_factory.mktemp("newest_dit")
    names = sorted(MODELS)
    bases, _ = newest.call("batch", cases=[{"op": "state_dict", "model": MODELS[n][0], "config": MODELS[n][1], "seed": 0}
                                           for n in names])
    base = {n: {k[len(f"{i}/"):]: v for k, v in bases.items() if k.startswith(f"{i}/")} for i, n in enumerate(names)}
    files, specs = {}, []
    for seed, (name, case) in enumerate(sorted(CASES.items())):
        path = tmp / f"{name}.safetensors"
        files[name] = (path, write_case(path, case, base[case.model], seed))
        cls, config = MODELS[case.model]
        specs.append(dict(model=cls, config=config, lora=path, mixin=case.mixin, scale=SCALE, component=case.component))
    out = {}
    for (name, case), (ref_base, fused, info) in zip(sorted(CASES.items()), newest.fused_many(specs)):
        out[name] = (*files[name], np_tree(ref_base), np_tree(fused), info["loaded"])
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_weights_equal_diffusers_0_42(name, results):
    case = CASES[name]
    path, keys, base, want, loaded = results[name]
    assert_detected(keys, case.keys_fmt or case.fmt)
    adapters, report = jlora.load_lora_weights(str(path), {case.component: nested(base)}, family=case.family,
                                               return_report=True)
    assert_report_complete(report, keys, case.fmt)
    got = flatten(jlora.fuse(nested(base), adapters[case.component], SCALE))
    changed = assert_fused_equal(got, want, base)
    assert changed == expected_paths(case)
    assert len(loaded) == len(changed) == len(report.placed)
    forced, _ = jlora.load_lora_weights(str(path), {case.component: nested(base)}, family=case.family, format=case.fmt,
                                        return_report=True)
    assert_fused_equal(flatten(jlora.fuse(nested(base), forced[case.component], SCALE)), want, base)


def test_anima_file_loads_transformer_and_text_conditioner_together(results, tmp_path):
    """One Anima file with DiT and LLM-adapter keys fills both components, each as diffusers does."""
    _, dit_keys, dit_base, dit_want, _ = results["anima"]
    _, adapter_keys, adapter_base, adapter_want, _ = results["anima_adapter"]
    tensors = {**jlora.lora_state_dict(results["anima"][0]), **jlora.lora_state_dict(results["anima_adapter"][0])}
    assert_detected(tensors, "anima")
    params = {"transformer": nested(dit_base), "text_conditioner": nested(adapter_base)}
    adapters, report = jlora.load_lora_weights(tensors, params, family="anima", return_report=True)
    assert_report_complete(report, tensors, "anima")
    assert_fused_equal(flatten(jlora.fuse(params["transformer"], adapters["transformer"], SCALE)), dit_want, dit_base)
    assert_fused_equal(flatten(jlora.fuse(params["text_conditioner"], adapters["text_conditioner"], SCALE)),
                       adapter_want, adapter_base)


NEWEST = ("flux3", "krea2", "ideogram4", "minimax_h3", "musubi_minimax_h3", "diffsynth_minimax_h3", "anima", "ace_step")
OTHER_FILES = {
    "wan": ["diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.ffn.0.lora_up.weight"],
    "lumina2": ["diffusion_model.layers.0.attention.qkv.lora_A.weight", "diffusion_model.layers.0.attention.out.lora_B.weight",
                "diffusion_model.layers.0.adaLN_modulation.1.lora_A.weight"],
    "comfy_flux": ["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
                   "diffusion_model.single_blocks.0.linear1.lora_up.weight"],
    "kohya_flux": ["lora_unet_single_blocks_0_linear1.lora_down.weight"],
    "musubi_wan": ["lora_unet_blocks_0_self_attn_q.lora_down.weight"],
    "peft_sd": ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"],
    "prefixed_ltx": ["diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight"],
    "hunyuan": ["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight", "diffusion_model.final_layer.linear.lora_A.weight"],
}


@pytest.mark.parametrize("other", sorted(OTHER_FILES))
def test_newest_detectors_leave_other_formats_alone(other):
    assert not [f.name for f in engine.matching_formats(OTHER_FILES[other]) if f.name in NEWEST]


def test_ideogram4_fused_qkv_that_does_not_split_names_the_key():
    rng = np.random.default_rng(1)
    tensors = {"diffusion_model.layers.0.attention.qkv.lora_A.weight": rng.standard_normal((RANK, 16)).astype(np.float32),
               "diffusion_model.layers.0.attention.qkv.lora_B.weight": rng.standard_normal((47, RANK)).astype(np.float32),
               "diffusion_model.layers.0.attention.o.lora_A.weight": rng.standard_normal((RANK, 16)).astype(np.float32),
               "diffusion_model.layers.0.attention.o.lora_B.weight": rng.standard_normal((16, RANK)).astype(np.float32)}
    tree = {"layers": {"0": {"attention": {p: {"kernel": np.zeros((16, 16), np.float32)}
                                           for p in ("to_q", "to_k", "to_v")}}}}
    before = {k: v.copy() for k, v in tensors.items()}
    with pytest.raises(jlora.errors.InvalidAdapterError, match="47 output rows.*attention.qkv"):
        jlora.load_lora_weights(tensors, {"transformer": tree}, family="ideogram4")
    assert all(np.array_equal(before[k], tensors[k]) for k in tensors)


def test_diffsynth_qkv_rows_that_are_not_whole_heads_name_the_key():
    rng = np.random.default_rng(2)
    tensors = {"blocks.0.attn.qkv_proj.lora_A.default.weight": rng.standard_normal((RANK, 16)).astype(np.float32),
               "blocks.0.attn.qkv_proj.lora_B.default.weight": rng.standard_normal((48, RANK)).astype(np.float32)}
    tree = {"transformer_blocks": {"0": {"attn": {p: {"kernel": np.zeros((16, 16), np.float32)}
                                                  for p in ("to_q", "to_k", "to_v")}}}}
    with pytest.raises(jlora.errors.InvalidAdapterError, match=r"qkv_proj\.lora_B\.default\.weight: 48 output rows"):
        jlora.load_lora_weights(tensors, {"transformer": tree}, family="minimax_h3")


GUESSED = {"anima_adapter": "anima", "cosmos_peft": "cosmos", "anima_adapter_peft": "anima"}


# Files of names another family shares (Ideogram 4's qkv and feed-forward are Lumina2's) are left out.
@pytest.mark.parametrize("name", sorted(n for n in CASES if n not in ("ideogram4_peft_shared", "ideogram4_conditional",
                                                                      "ideogram4_lumina2_names")))
def test_family_is_guessed_from_the_file(name, results):
    """`jlora inspect` and error messages name the family from the records' module names."""
    case = CASES[name]
    tensors = jlora.lora_state_dict(results[name][0])
    records, _ = engine.build_records(engine.get_format(case.keys_fmt or case.fmt), tensors)
    records = [dataclasses.replace(r, component=r.component or case.component) for r in records]
    assert guess_family(records) == GUESSED.get(name, case.family)


def test_minimax_h3_header_alpha_that_is_not_a_number_is_an_error(results):
    path, keys, base, _, _ = results["minimax_h3"]
    tensors = jlora.lora_state_dict(path)
    save_file(tensors, str(path) + ".bad", metadata={"alpha": "eight"})
    with pytest.raises(jlora.errors.InvalidAdapterError, match="header entry 'alpha' is 'eight'"):
        jlora.load_lora_weights(str(path) + ".bad", {"transformer": nested(base)}, family="minimax_h3")


def test_minimax_h3_header_alpha_scales_every_module(results):
    """The header's alpha 10 at rank 4 gives 2.5 times the delta of the same tensors without it (alpha = rank)."""
    path, _, base, want, _ = results["minimax_h3_header_alpha"]
    plain = jlora.load_lora_weights(jlora.lora_state_dict(path), {"transformer": nested(base)}, family="minimax_h3")
    got = flatten(jlora.fuse(nested(base), plain["transformer"], SCALE))
    for leaf in expected_paths(CASES["minimax_h3_header_alpha"]):
        np.testing.assert_allclose(want[leaf] - base[leaf], 2.5 * (got[leaf] - base[leaf]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["flux3", "krea2", "anima"])  # ACE-Step trainers write PEFT factor names
def test_kohya_factor_names_with_alpha(name, results):
    """The same files with `lora_down` / `lora_up` and an `.alpha` of 2 per module (diffusers reads these layouts
    only with lora_A / lora_B): reference = the format's math, base + alpha / rank x diffusers' fused delta."""
    case = CASES[name]
    path, _, base, want, _ = results[name]
    tensors = {}
    for k, v in jlora.lora_state_dict(path).items():
        k = k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        tensors[k] = v
        if k.endswith(".lora_down.weight"):
            tensors[k[: -len("lora_down.weight")] + "alpha"] = np.float32(2.0)
    assert_detected(tensors, case.fmt)
    adapters, report = jlora.load_lora_weights(tensors, {case.component: nested(base)}, family=case.family,
                                               return_report=True)
    assert_report_complete(report, tensors, case.fmt)
    got = flatten(jlora.fuse(nested(base), adapters[case.component], SCALE))
    expected = {p: base[p] + 2.0 / RANK * (want[p] - base[p]) for p in want}
    assert assert_fused_equal(got, expected, base) == expected_paths(case)
