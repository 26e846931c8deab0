"""DiT-family LoRA files (SD3, CogVideoX, Mochi, Wan, HunyuanVideo, LTX-Video, Lumina2, HiDream, Qwen-Image)
against diffusers, at the level of fused weights.

Each test builds a tiny diffusers transformer (seeded), writes a LoRA file in the format under test and
compares jlora's fused weights on a torch-mirror Flax tree (`blocks/0/attn1/to_q/kernel`, (in, out)
kernels, norm weights as `scale`) with the reference:
  * diffusers: `<Mixin>.lora_state_dict` + `load_lora_into_transformer`, then `transformer.fuse_lora(lora_scale=s)`;
  * where diffusers drops part of a file (Wan `.diff` keys and norm diffs) the dropped part is added to the
    diffusers result by the format's math (W += s * diff);
  * where diffusers cannot read a tiny model (HunyuanVideo `linear1` and Lumina2 `qkv` splits hard-code the
    released models' widths) the reference is the format's math on the torch weights, and the split itself is
    checked against diffusers' converter at the released widths.
Fused weights must agree within 1e-5 relative, and the LoRA must change exactly the expected weights.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HiDreamImageTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    MochiTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.loaders import (
    CogVideoXLoraLoaderMixin,
    HiDreamImageLoraLoaderMixin,
    HunyuanVideoLoraLoaderMixin,
    LTXVideoLoraLoaderMixin,
    Mochi1LoraLoaderMixin,
    QwenImageLoraLoaderMixin,
    SD3LoraLoaderMixin,
    WanLoraLoaderMixin,
)
from diffusers.loaders import lora_conversion_utils as dconv
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

import jlora
from converters import engine
from converters.formats import dit
from mirror import flatten, nested  # noqa: E402

SCALE = 0.7
RANK = 4

MODELS = {
    "sd3": (SD3Transformer2DModel, dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)),
    "cogvideox": (CogVideoXTransformer3DModel, dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=16,
        num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8)),
    "mochi": (MochiTransformer3DModel, dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16, in_channels=4,
        qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu", max_sequence_length=16)),
    "wan": (WanTransformer3DModel, dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)),
    "wan_i2v": (WanTransformer3DModel, dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        image_dim=12, added_kv_proj_dim=16)),
    "hunyuan_video": (HunyuanVideoTransformer3DModel, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))),
    "hunyuan_video_p2": (HunyuanVideoTransformer3DModel, dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))),
    "ltx_video": (LTXVideoTransformer3DModel, dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=1, caption_channels=16)),
    "lumina2": (Lumina2Transformer2DModel, dict(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=1, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
        cap_feat_dim=16)),
    "hidream": (HiDreamImageTransformer2DModel, dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1))),
    "qwen_image": (QwenImageTransformer2DModel, dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 2, 2))),
}
_built: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    if name not in _built:
        cls, cfg = MODELS[name]
        torch.manual_seed(0)
        _built[name] = cls(**cfg).eval()
    return _built[name]


# ---- torch state dict <-> torch-mirror Flax tree ----------------------------------------------


def flat_tree(state_dict) -> dict[tuple[str, ...], np.ndarray]:
    """`{path: array}` of the torch-mirror Flax tree of a (possibly PEFT-wrapped, fused) torch state dict."""
    out = {}
    for name, t in state_dict.items():
        if ".lora_" in name:
            continue
        *module, leaf = name.replace(".base_layer.", ".").split(".")
        a = t.detach().to(torch.float32).numpy().copy()
        if leaf == "weight":
            leaf = "scale" if a.ndim == 1 else "kernel"
            if a.ndim >= 2:
                a = a.transpose(*range(2, a.ndim), 1, 0)
        out[tuple(module) + (leaf,)] = a
    return out


def weight_path(module: str, param: str) -> tuple[str, ...]:
    """Path of a torch module's `kernel` / `scale` / `bias` in the torch-mirror tree."""
    return tuple(module.split(".")) + (param,)


# ---- references and jlora ---------------------------------------------------------------------


def diffusers_fused(name: str, mixin, path: str, scale: float = SCALE) -> tuple[dict, int]:
    """diffusers' fused weights (torch-mirror tree) and how many modules diffusers gave a LoRA."""
    m = copy.deepcopy(model(name))
    state_dict, metadata = mixin.lora_state_dict(
        os.path.dirname(path), weight_name=os.path.basename(path), return_lora_metadata=True
    )
    mixin.load_lora_into_transformer(state_dict, transformer=m, metadata=metadata)
    injected = sum(isinstance(mod, LoraLayer) for mod in m.modules())
    m.fuse_lora(lora_scale=scale)
    return flat_tree(m.state_dict()), injected


def jlora_fused(name: str, path: str, family: str, fmt: str | None, scale: float = SCALE):
    base = flat_tree(model(name).state_dict())
    adapters, report = jlora.load_lora_weights(
        path, {"transformer": nested(base)}, family=family, format=fmt, return_report=True
    )
    fused = flatten(jlora.fuse(nested(base), adapters["transformer"], scale))
    return fused, report


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


def assert_report_complete(report, keys, fmt: str) -> None:
    assert report.format == fmt
    assert not report.unmatched and not report.unplaced and not report.skipped, report.summary()
    assert set(report.loaded_keys) == set(keys)


def assert_detected(keys, fmt: str) -> None:
    assert engine.detect_format(keys).name == fmt
    assert [f.name for f in engine.matching_formats(keys)] == [fmt]


# ---- writing files ----------------------------------------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One module of a non-diffusers file: its source name, the diffusers module(s) it covers, and what it holds."""

    src: str
    dst: tuple[str, ...]
    alpha: float | None = None
    lora: bool = True
    diff: bool = False
    diff_b: bool = False
    set_weight: bool = False


def E(src: str, *dst: str, **kw) -> Entry:
    return Entry(src, dst, **kw)


def _out_in(sd: dict, modules: tuple[str, ...]) -> tuple[int, int | None]:
    shapes = [tuple(sd[f"{m}.weight"].shape) for m in modules]
    return sum(s[0] for s in shapes), (shapes[0][1] if len(shapes[0]) > 1 else None)


def write_file(path, name: str, entries, *, prefix: str, down: str, up: str, seed: int = 0) -> dict:
    """A non-diffusers LoRA file for model `name`; returns its tensors (numpy)."""
    sd = model(name).state_dict()
    rng = _rng(seed)
    tensors = {}
    for e in entries:
        n_out, n_in = _out_in(sd, e.dst)
        key = f"{prefix}{e.src}."
        if e.lora:
            tensors[key + down] = rng.standard_normal((RANK, n_in)) * 0.5
            tensors[key + up] = rng.standard_normal((n_out, RANK)) * 0.5
        if e.alpha is not None:
            tensors[key + "alpha"] = np.asarray(e.alpha)
        if e.diff:
            shape = (n_out,) if n_in is None else (n_out, n_in)
            tensors[key + "diff"] = rng.standard_normal(shape) * 0.3
        if e.diff_b:
            tensors[key + "diff_b"] = rng.standard_normal((n_out,)) * 0.3
        if e.set_weight:
            tensors[key + "set_weight"] = rng.standard_normal((n_out,) if n_in is None else (n_out, n_in))
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(path))
    return tensors


def expected_paths(name: str, entries) -> set:
    """Tree paths a file's entries change (norm weights are `scale`)."""
    sd = model(name).state_dict()
    out = set()
    for e in entries:
        for module in e.dst:
            w = sd[f"{module}.weight"]
            if e.lora or e.diff or e.set_weight:
                out.add(weight_path(module, "scale" if w.ndim == 1 else "kernel"))
            if e.diff_b:
                out.add(weight_path(module, "bias"))
    return out


def peft_file(directory, name: str, mixin, targets, *, alpha_pattern=None, seed: int = 0) -> str:
    """A diffusers/PEFT file (PEFT `add_adapter` + the mixin's `save_lora_weights`, with adapter metadata)."""
    lora = copy.deepcopy(model(name))
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                        alpha_pattern=alpha_pattern or {})
    lora.add_adapter(config)
    with torch.no_grad():
        for pname, p in lora.named_parameters():
            if "lora_B" in pname:
                p.mul_(3.0)
    mixin.save_lora_weights(str(directory), transformer_lora_layers=get_peft_model_state_dict(lora),
                            transformer_lora_adapter_metadata=config.to_dict())
    return os.path.join(str(directory), "pytorch_lora_weights.safetensors")


def read_keys(path) -> list[str]:
    return list(jlora.lora_state_dict(path))


def resave(path, new_path, rename) -> str:
    """The file at `path` with keys renamed and no header metadata."""
    tensors = jlora.lora_state_dict(path)
    save_file({rename(k): torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, str(new_path))
    return str(new_path)


def format_math(name: str, entries, tensors: dict, prefix: str, up: str, down: str, scale: float,
                swapped: tuple[str, ...] = ()) -> dict:
    """Base weights + scale * the format's delta: alpha / r * up @ down (+ diff), rows cut by the targets' widths;
    a set weight replaces the weight whatever the scale."""
    sd = model(name).state_dict()
    want = dict(flat_tree(sd))
    for e in entries:
        key = f"{prefix}{e.src}."
        delta = None
        if e.lora:
            factor = float(tensors[key + "alpha"]) / RANK if key + "alpha" in tensors else 1.0
            delta = factor * (tensors[key + up].astype(np.float64) @ tensors[key + down].astype(np.float64))
        if e.diff:
            d = tensors[key + "diff"].astype(np.float64)
            delta = d if delta is None else delta + d
        bias = tensors[key + "diff_b"].astype(np.float64) if e.diff_b else None
        if e.src in swapped:
            half = delta.shape[0] // 2
            delta = np.concatenate([delta[half:], delta[:half]])
            bias = None if bias is None else np.concatenate([bias[half:], bias[:half]])
        start = 0
        for module in e.dst:
            rows = sd[f"{module}.weight"].shape[0]
            if delta is not None:
                piece = delta[start : start + rows]
                path = weight_path(module, "scale" if piece.ndim == 1 else "kernel")
                want[path] = want[path] + scale * (piece if piece.ndim == 1 else piece.T)
            if bias is not None:
                path = weight_path(module, "bias")
                want[path] = want[path] + scale * bias[start : start + rows]
            if e.set_weight:
                value = tensors[key + "set_weight"][start : start + rows]
                want[weight_path(module, "scale" if value.ndim == 1 else "kernel")] = value if value.ndim == 1 else value.T
            start += rows
    return {k: np.asarray(v, np.float32) for k, v in want.items()}


# ---- 1. PEFT files (SD3, CogVideoX, Mochi; Wan, HunyuanVideo, Qwen-Image) on torch-mirror trees -

_JOINT = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "ff.net.0.proj",
          "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_out"]
PEFT_CASES = {
    "sd3": (SD3LoraLoaderMixin, "sd3", _JOINT + ["context_embedder", "linear_1", "linear_2", "norm_out.linear"]),
    "cogvideox": (CogVideoXLoraLoaderMixin, "cogvideox",
                  ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm2.linear",
                   "proj_out", "text_proj", "linear_1"]),
    "mochi": (Mochi1LoraLoaderMixin, "mochi", _JOINT + ["caption_proj", "to_kv"]),
    # diffusers-named files of the families whose original layouts have formats here stay PEFT files
    "wan": (WanLoraLoaderMixin, "wan", ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "time_proj"]),
    "hunyuan_video": (HunyuanVideoLoraLoaderMixin, "hunyuan_video", _JOINT + ["proj_mlp", "norm.linear", "proj_in"]),
    "qwen_image": (QwenImageLoraLoaderMixin, "qwen_image",
                   ["to_q", "to_k", "add_k_proj", "to_out.0", "img_mod.1", "txt_mlp.net.2", "img_in"]),
}


@pytest.mark.parametrize("name", sorted(PEFT_CASES))
def test_peft_file_on_torch_mirror_tree(name, tmp_path):
    mixin, family, targets = PEFT_CASES[name]
    path = peft_file(tmp_path, name, mixin, targets, alpha_pattern={"to_k": 3})
    keys = read_keys(path)
    assert_detected(keys, "peft")
    want, injected = diffusers_fused(name, mixin, path)
    got, report = jlora_fused(name, path, family, None)
    assert_report_complete(report, keys, "peft")
    assert report.schemes == {"transformer": "torch_mirror"}
    changed = assert_fused_equal(got, want, flat_tree(model(name).state_dict()))
    assert len(changed) == injected == len(report.placed) > 10
    forced, _ = jlora_fused(name, path, family, "peft")
    assert_fused_equal(forced, want, flat_tree(model(name).state_dict()))


# ---- 2. Wan: original names (lora_down + alpha + diffs; lora_A i2v) and musubi-tuner ---------

_QKVO = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
WAN_T2V = (
    *(E(f"blocks.{i}.self_attn.{s}", f"blocks.{i}.attn1.{d}", alpha=2.0 + n + i, diff_b=s == "q")
      for i in (0, 1) for n, (s, d) in enumerate(_QKVO)),
    *(E(f"blocks.{i}.cross_attn.{s}", f"blocks.{i}.attn2.{d}", alpha=1.5 * (n + 1)) for i in (0, 1)
      for n, (s, d) in enumerate(_QKVO[:3])),
    E("blocks.0.cross_attn.o", "blocks.0.attn2.to_out.0", lora=False, diff=True),
    *(E(f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.net.0.proj", alpha=6.0, diff_b=True) for i in (0, 1)),
    *(E(f"blocks.{i}.ffn.2", f"blocks.{i}.ffn.net.2") for i in (0, 1)),
    E("blocks.0.norm3", "blocks.0.norm2", lora=False, diff=True, diff_b=True),
    E("blocks.1.self_attn.norm_q", "blocks.1.attn1.norm_q", lora=False, diff=True),
    E("blocks.1.cross_attn.norm_k", "blocks.1.attn2.norm_k", lora=False, diff=True),
    E("head.head", "proj_out"),
    E("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    E("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    E("time_projection.1", "condition_embedder.time_proj", diff_b=True),
)
WAN_I2V = (
    E("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
    E("blocks.0.cross_attn.q", "blocks.0.attn2.to_q"),
    E("blocks.0.cross_attn.k_img", "blocks.0.attn2.add_k_proj"),
    E("blocks.0.cross_attn.v_img", "blocks.0.attn2.add_v_proj", diff_b=True),
    E("blocks.0.cross_attn.norm_k_img", "blocks.0.attn2.norm_added_k", lora=False, diff=True),
    E("blocks.0.ffn.2", "blocks.0.ffn.net.2"),
    E("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj", diff_b=True),
    E("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    E("img_emb.proj.4", "condition_embedder.image_embedder.norm2", lora=False, diff=True, diff_b=True),
)
WAN_CASES = {
    "t2v_lora_down": ("wan", WAN_T2V, "lora_down.weight", "lora_up.weight"),
    "i2v_lora_A": ("wan_i2v", WAN_I2V, "lora_A.weight", "lora_B.weight"),
}


def _diffusers_plus_dropped(name, mixin, path, entries, tensors, prefix):
    """diffusers' fused weights plus what its Wan converter drops: `.diff` keys and bias diffs without a LoRA."""
    want, injected = diffusers_fused(name, mixin, path)
    for e in entries:
        (module,) = e.dst
        key = f"{prefix}{e.src}."
        if e.diff:
            d = tensors[key + "diff"]
            path = weight_path(module, "scale" if d.ndim == 1 else "kernel")
            want[path] = want[path] + SCALE * (d if d.ndim == 1 else d.T)
        if e.diff_b and not e.lora:
            path = weight_path(module, "bias")
            want[path] = want[path] + SCALE * tensors[key + "diff_b"]
    return want, injected


@pytest.mark.parametrize("case", sorted(WAN_CASES))
def test_wan_original_names(case, tmp_path):
    name, entries, down, up = WAN_CASES[case]
    path = str(tmp_path / "wan.safetensors")
    tensors = write_file(path, name, entries, prefix="diffusion_model.", down=down, up=up)
    assert_detected(tensors, "wan")
    want, injected = _diffusers_plus_dropped(name, WanLoraLoaderMixin, path, entries, tensors, "diffusion_model.")
    got, report = jlora_fused(name, path, "wan", None)
    assert_report_complete(report, tensors, "wan")
    changed = assert_fused_equal(got, want, flat_tree(model(name).state_dict()))
    assert changed == expected_paths(name, entries)
    assert injected == sum(e.lora for e in entries)
    forced, _ = jlora_fused(name, path, "wan", "wan")
    assert_fused_equal(forced, want, flat_tree(model(name).state_dict()))


_MUSUBI_MODULES = (*((f"self_attn_{s}", f"attn1.{d}") for s, d in _QKVO),
                   *((f"cross_attn_{s}", f"attn2.{d}") for s, d in _QKVO),
                   ("ffn_0", "ffn.net.0.proj"), ("ffn_2", "ffn.net.2"))
MUSUBI = tuple(E(f"blocks_{i}_{s}", f"blocks.{i}.{d}", alpha=1.0 + n + 2 * i)
               for i in (0, 1) for n, (s, d) in enumerate(_MUSUBI_MODULES))


def test_musubi_wan(tmp_path):
    path = str(tmp_path / "musubi.safetensors")
    tensors = write_file(path, "wan", MUSUBI, prefix="lora_unet_", down="lora_down.weight", up="lora_up.weight", seed=1)
    assert_detected(tensors, "musubi_wan")
    want, injected = diffusers_fused("wan", WanLoraLoaderMixin, path)
    got, report = jlora_fused("wan", path, "wan", None)
    assert_report_complete(report, tensors, "musubi_wan")
    changed = assert_fused_equal(got, want, flat_tree(model("wan").state_dict()))
    assert changed == expected_paths("wan", MUSUBI) and injected == len(MUSUBI) == 20
    forced, _ = jlora_fused("wan", path, "wan", "musubi_wan")
    assert_fused_equal(forced, want, flat_tree(model("wan").state_dict()))


def test_wan_keys_without_a_place_are_reported(tmp_path):
    """Modulation diffs (`scale_shift_table`) have no adapter kind in jlora: strict raises naming them,
    strict=False loads the rest."""
    path = str(tmp_path / "wan.safetensors")
    tensors = write_file(path, "wan", WAN_T2V[:2], prefix="diffusion_model.", down="lora_down.weight", up="lora_up.weight")
    extra = {"diffusion_model.blocks.0.modulation.diff": np.ones((1, 6, 16), np.float32)}
    tensors.update(extra)
    base = nested(flat_tree(model("wan").state_dict()))
    with pytest.raises(jlora.errors.KeyMismatchError, match="modulation.diff"):
        jlora.load_lora_weights(tensors, {"transformer": base}, family="wan")
    with pytest.warns(UserWarning, match="1 keys not loaded"):
        _, report = jlora.load_lora_weights(tensors, {"transformer": base}, family="wan", strict=False, return_report=True)
    assert sorted(report.unmatched) == sorted(extra) and len(report.placed) == 3  # q has a bias diff


def _conv_factors(weight: torch.Tensor, rng) -> tuple[np.ndarray, np.ndarray]:
    """LoRA factors for a conv weight (out, in, *k): down (r, in, *k), up (out, r, 1, ...)."""
    out_ch, in_ch, *k = weight.shape
    down = rng.standard_normal((RANK, in_ch, *k)).astype(np.float32) * 0.5
    up = rng.standard_normal((out_ch, RANK) + (1,) * len(k)).astype(np.float32) * 0.5
    return down, up


def _peft_fused(name: str, module: str, down, up, alpha: float, scale: float) -> dict:
    """PEFT's fused weights for one LoRA on `module` of the tiny model (PEFT layer math, independent of jlora)."""
    m = copy.deepcopy(model(name))
    m.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=[module]))
    layer = m.get_submodule(module)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(down))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(up))
    m.fuse_lora(lora_scale=scale)
    return flat_tree(m.state_dict())


def test_wan_conv3d_patch_embedding_against_peft(tmp_path):
    """`diffusion_model.patch_embedding` (Conv3d, 5-D factors and diffs) in a Wan original-name file."""
    path = str(tmp_path / "wan.safetensors")
    tensors = write_file(path, "wan", WAN_T2V[:1], prefix="diffusion_model.", down="lora_down.weight", up="lora_up.weight")
    weight = model("wan").state_dict()["patch_embedding.weight"]
    down, up = _conv_factors(weight, _rng(5))
    key = "diffusion_model.patch_embedding."
    tensors.update({key + "lora_down.weight": down, key + "lora_up.weight": up, key + "alpha": np.float32(3.0)})
    base = nested(flat_tree(model("wan").state_dict()))
    got = flatten(jlora.fuse(base, jlora.load_lora_weights(tensors, {"transformer": base}, family="wan")["transformer"], SCALE))
    want = _peft_fused("wan", "patch_embedding", down, up, 3.0, SCALE)
    kernel = weight_path("patch_embedding", "kernel")
    assert got[kernel].shape == weight.numpy().transpose(2, 3, 4, 1, 0).shape
    assert np.abs(want[kernel] - flatten(base)[kernel]).max() > 1e-2
    np.testing.assert_allclose(got[kernel], want[kernel], rtol=1e-5, atol=1e-6)

    diffs = {key + "diff": _rng(6).standard_normal(tuple(weight.shape)).astype(np.float32),
             key + "diff_b": _rng(7).standard_normal((weight.shape[0],)).astype(np.float32)}
    no_lora = {k: v for k, v in tensors.items() if not k.startswith(key)}
    adapter = jlora.load_lora_weights({**no_lora, **diffs}, {"transformer": base}, family="wan")["transformer"]
    fused = flatten(jlora.fuse(base, adapter, SCALE))
    torch_w = weight.numpy() + SCALE * diffs[key + "diff"]  # the format's math in torch layout, then to DHWIO
    np.testing.assert_allclose(fused[kernel], torch_w.transpose(2, 3, 4, 1, 0), rtol=1e-5, atol=1e-6)
    bias = weight_path("patch_embedding", "bias")
    np.testing.assert_allclose(fused[bias], flatten(base)[bias] + SCALE * diffs[key + "diff_b"], rtol=1e-6, atol=1e-6)


# ---- 3. HunyuanVideo (original names) ---------------------------------------------------------

_HD, _HS, _HR = "transformer_blocks.0", "single_transformer_blocks.0", "context_embedder.token_refiner.refiner_blocks.0"
_REF = "txt_in.individual_token_refiner.blocks.0"
HUNYUAN = (
    E("double_blocks.0.img_attn_qkv", f"{_HD}.attn.to_q", f"{_HD}.attn.to_k", f"{_HD}.attn.to_v"),
    E("double_blocks.0.txt_attn_qkv", f"{_HD}.attn.add_q_proj", f"{_HD}.attn.add_k_proj", f"{_HD}.attn.add_v_proj"),
    E("double_blocks.0.img_attn_proj", f"{_HD}.attn.to_out.0"),
    E("double_blocks.0.txt_attn_proj", f"{_HD}.attn.to_add_out"),
    E("double_blocks.0.img_mlp.fc1", f"{_HD}.ff.net.0.proj"),
    E("double_blocks.0.txt_mlp.fc2", f"{_HD}.ff_context.net.2"),
    E("double_blocks.0.img_mod.linear", f"{_HD}.norm1.linear"),
    E("double_blocks.0.txt_mod.linear", f"{_HD}.norm1_context.linear"),
    E("single_blocks.0.linear2", f"{_HS}.proj_out"),
    E("single_blocks.0.modulation.linear", f"{_HS}.norm.linear"),
    E(f"{_REF}.self_attn_proj", f"{_HR}.attn.to_out.0"),
    E(f"{_REF}.mlp.fc1", f"{_HR}.ff.net.0.proj"),
    E(f"{_REF}.adaLN_modulation.1", f"{_HR}.norm_out.linear"),
    E("txt_in.input_embedder", "context_embedder.proj_in"),
    E("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    E("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    E("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    E("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
    E("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    E("final_layer.linear", "proj_out"),
)
# What diffusers 0.35.2 cannot read at tiny widths or reads wrongly: `linear1` (its split hard-codes 3072
# rows), the final modulation and the token refiner's qkv (it cuts lora_A's rank rows like a weight's).
# Alphas: diffusers would reject them.
HUNYUAN_MATH = (
    E(f"{_REF}.self_attn_qkv", f"{_HR}.attn.to_q", f"{_HR}.attn.to_k", f"{_HR}.attn.to_v", alpha=2.0),
    E("single_blocks.0.linear1", f"{_HS}.attn.to_q", f"{_HS}.attn.to_k", f"{_HS}.attn.to_v", f"{_HS}.proj_mlp",
      alpha=3.0, diff_b=True),
    E("final_layer.adaLN_modulation.1", "norm_out.linear", alpha=5.0, diff_b=True),
    E("double_blocks.0.img_attn_qkv", f"{_HD}.attn.to_q", f"{_HD}.attn.to_k", f"{_HD}.attn.to_v", lora=False, diff=True),
    E("double_blocks.0.img_attn_q_norm", f"{_HD}.attn.norm_q", lora=False, diff=True),
    E(f"{_REF}.norm1", f"{_HR}.norm1", lora=False, diff=True, diff_b=True),
    E("double_blocks.0.img_attn_k_norm", f"{_HD}.attn.norm_k", lora=False, set_weight=True),
    E("double_blocks.0.txt_attn_qkv", f"{_HD}.attn.add_q_proj", f"{_HD}.attn.add_k_proj", f"{_HD}.attn.add_v_proj",
      lora=False, set_weight=True),
)


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer."])
def test_hunyuan_video_against_diffusers(prefix, tmp_path):
    path = str(tmp_path / "hunyuan.safetensors")
    tensors = write_file(path, "hunyuan_video", HUNYUAN, prefix=prefix, down="lora_A.weight", up="lora_B.weight")
    assert_detected(tensors, "hunyuan_video")
    want, injected = diffusers_fused("hunyuan_video", HunyuanVideoLoraLoaderMixin, path)
    got, report = jlora_fused("hunyuan_video", path, "hunyuan_video", None)
    assert_report_complete(report, tensors, "hunyuan_video")
    changed = assert_fused_equal(got, want, flat_tree(model("hunyuan_video").state_dict()))
    assert changed == expected_paths("hunyuan_video", HUNYUAN) and injected == len(changed) == 24
    forced, _ = jlora_fused("hunyuan_video", path, "hunyuan_video", "hunyuan_video")
    assert_fused_equal(forced, want, flat_tree(model("hunyuan_video").state_dict()))


def test_hunyuan_video_conv3d_img_in_against_diffusers(tmp_path):
    """`img_in.proj` (the Conv3d patch embedding, 5-D lora_A) next to linear modules."""
    name, key = "hunyuan_video_p2", "diffusion_model.img_in.proj."
    tensors = write_file(tmp_path / "lin.safetensors", name, HUNYUAN[:3], prefix="diffusion_model.",
                         down="lora_A.weight", up="lora_B.weight")
    weight = model(name).state_dict()["x_embedder.proj.weight"]
    assert tuple(weight.shape[2:]) == (1, 2, 2)
    down, up = _conv_factors(weight, _rng(8))
    tensors.update({key + "lora_A.weight": down, key + "lora_B.weight": up})
    path = str(tmp_path / "hunyuan.safetensors")
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, path)
    want, injected = diffusers_fused(name, HunyuanVideoLoraLoaderMixin, path)
    got, report = jlora_fused(name, path, "hunyuan_video", None)
    assert_report_complete(report, tensors, "hunyuan_video")
    changed = assert_fused_equal(got, want, flat_tree(model(name).state_dict()))
    assert weight_path("x_embedder.proj", "kernel") in changed and injected == len(changed) == 8


def test_hunyuan_video_fused_linear1_and_final_modulation(tmp_path):
    path = str(tmp_path / "hunyuan.safetensors")
    tensors = write_file(path, "hunyuan_video", HUNYUAN_MATH, prefix="diffusion_model.", down="lora_down.weight",
                         up="lora_up.weight", seed=2)
    assert_detected(tensors, "hunyuan_video")
    want = format_math("hunyuan_video", HUNYUAN_MATH, tensors, "diffusion_model.", "lora_up.weight", "lora_down.weight",
                       SCALE, swapped=("final_layer.adaLN_modulation.1",))
    got, report = jlora_fused("hunyuan_video", path, "hunyuan_video", None)
    assert_report_complete(report, tensors, "hunyuan_video")
    changed = assert_fused_equal(got, want, flat_tree(model("hunyuan_video").state_dict()))
    assert changed == expected_paths("hunyuan_video", HUNYUAN_MATH)


def test_diffusers_cuts_lora_A_of_hunyuan_final_modulation_and_refiner_qkv():
    """diffusers 0.35.2 cuts lora_A of `final_layer.adaLN_modulation.1` (halves swapped) and of the token
    refiner's `self_attn_qkv` (thirds) like a weight: the first gives a delta that is not the file's delta with
    its output halves swapped, the second gives factors whose ranks do not match. jlora cuts only output rows."""
    rng = _rng(3)
    a, b = rng.standard_normal((6, 16)).astype(np.float32), rng.standard_normal((32, 6)).astype(np.float32)
    qkv_a, qkv_b = rng.standard_normal((6, 16)).astype(np.float32), rng.standard_normal((48, 6)).astype(np.float32)
    tensors = {"final_layer.adaLN_modulation.1.lora_A.weight": a, "final_layer.adaLN_modulation.1.lora_B.weight": b,
               f"{_REF}.self_attn_qkv.lora_A.weight": qkv_a, f"{_REF}.self_attn_qkv.lora_B.weight": qkv_b}
    theirs = dconv._convert_hunyuan_video_lora_to_diffusers({k: torch.from_numpy(v) for k, v in tensors.items()})
    full = b @ a
    swapped = np.concatenate([full[16:], full[:16]])
    up_theirs, down_theirs = (theirs[f"transformer.norm_out.linear.{f}.weight"].numpy() for f in ("lora_B", "lora_A"))
    delta_theirs = up_theirs @ down_theirs
    assert not np.allclose(delta_theirs, swapped, atol=1e-3)
    assert theirs[f"transformer.{_HR}.attn.to_q.lora_A.weight"].shape[0] == 2  # rank 6 cut into thirds
    assert theirs[f"transformer.{_HR}.attn.to_q.lora_B.weight"].shape[1] == 6

    ours = _records("hunyuan_video", tensors)
    np.testing.assert_allclose(ours["norm_out.linear"].tensors["up"] @ ours["norm_out.linear"].tensors["down"], swapped,
                               rtol=1e-5, atol=1e-5)
    for n, proj in enumerate(("to_q", "to_k", "to_v")):
        rec = ours[f"{_HR}.attn.{proj}"]
        np.testing.assert_array_equal(rec.tensors["down"], qkv_a)
        np.testing.assert_array_equal(rec.tensors["up"], qkv_b[16 * n : 16 * (n + 1)])


def _records(fmt_name: str, tensors: dict) -> dict:
    fmt = engine.get_format(fmt_name)
    records, unmatched = engine.build_records(fmt, tensors)
    assert not unmatched
    return {p.module: p for r in records for p in fmt.split(r)}


def _assert_same_as_diffusers(ours: dict, theirs: dict) -> None:
    """Records (module, down, rows of up) equal diffusers' converted `transformer.<module>.lora_A/B` keys."""
    names = {k[len("transformer."):-len(".lora_A.weight")] for k in theirs if k.endswith(".lora_A.weight")}
    assert set(ours) == names
    for module, rec in ours.items():
        np.testing.assert_array_equal(rec.tensors["down"], theirs[f"transformer.{module}.lora_A.weight"].numpy())
        np.testing.assert_array_equal(rec.tensors["up"], theirs[f"transformer.{module}.lora_B.weight"].numpy())


def test_fused_splits_match_diffusers_at_released_widths():
    """At the released models' widths the input-width rules give diffusers' hard-coded splits:
    HunyuanVideo linear1 (hidden 3072: q, k, v, mlp = 3072 x 3, 12288) and Lumina2 qkv (2304, 768, 768)."""
    rng = _rng(4)

    def pair(n_out, n_in):
        return rng.standard_normal((1, n_in)).astype(np.float32), rng.standard_normal((n_out, 1)).astype(np.float32)

    hunyuan = {}
    for src, (n_out, n_in) in {"single_blocks.0.linear1": (3 * 3072 + 4 * 3072, 3072),
                               "double_blocks.0.img_attn_qkv": (3 * 3072, 3072)}.items():
        a, b = pair(n_out, n_in)
        hunyuan[f"diffusion_model.{src}.lora_A.weight"], hunyuan[f"diffusion_model.{src}.lora_B.weight"] = a, b
    theirs = dconv._convert_hunyuan_video_lora_to_diffusers({k: torch.from_numpy(v) for k, v in hunyuan.items()})
    _assert_same_as_diffusers(_records("hunyuan_video", hunyuan), theirs)

    lumina = {}
    widths = {"attention.qkv": (3840, 2304), "attention.out": (2304, 2304), "feed_forward.w1": (64, 2304),
              "feed_forward.w2": (2304, 64), "feed_forward.w3": (64, 2304), "adaLN_modulation.1": (4 * 2304, 1024)}
    for src, (n_out, n_in) in widths.items():
        a, b = pair(n_out, n_in)
        lumina[f"diffusion_model.layers.0.{src}.lora_A.weight"], lumina[f"diffusion_model.layers.0.{src}.lora_B.weight"] = a, b
    theirs = dconv._convert_non_diffusers_lumina2_lora_to_diffusers({k: torch.from_numpy(v) for k, v in lumina.items()})
    _assert_same_as_diffusers(_records("lumina2", lumina), theirs)


# ---- LTX-Video and HiDream: diffusers names under diffusion_model. ----------------------------

PREFIXED_CASES = {
    "ltx_video": (LTXVideoLoraLoaderMixin, "ltx_video",
                  ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_embed.linear",
                   "linear_1", "linear_2"]),
    "hidream": (HiDreamImageLoraLoaderMixin, "hidream",
                ["to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "w1", "w2", "w3",
                 "adaLN_modulation.1", "final_layer.linear", "x_embedder.proj"]),
}


@pytest.mark.parametrize("name", sorted(PREFIXED_CASES))
def test_diffusers_names_under_diffusion_model(name, tmp_path):
    mixin, family, targets = PREFIXED_CASES[name]
    peft_path = peft_file(tmp_path / "peft", name, mixin, targets, seed=5)
    path = resave(peft_path, tmp_path / "comfy.safetensors", lambda k: "diffusion_model." + k[len("transformer."):])
    keys = read_keys(path)
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert_detected(keys, "prefixed_diffusers")
    want, injected = diffusers_fused(name, mixin, path)
    got, report = jlora_fused(name, path, family, None)
    assert_report_complete(report, keys, "prefixed_diffusers")
    changed = assert_fused_equal(got, want, flat_tree(model(name).state_dict()))
    assert len(changed) == injected == len(report.placed) > 8
    forced, _ = jlora_fused(name, path, family, "prefixed_diffusers")
    assert_fused_equal(forced, want, flat_tree(model(name).state_dict()))


# ---- Lumina2 (original names) -----------------------------------------------------------------

LUMINA2 = (
    E("layers.0.attention.qkv", "layers.0.attn.to_q", "layers.0.attn.to_k", "layers.0.attn.to_v", alpha=2.0),
    E("layers.0.attention.out", "layers.0.attn.to_out.0", alpha=6.0),
    *(E(f"layers.0.feed_forward.w{n}", f"layers.0.feed_forward.linear_{n}") for n in (1, 2, 3)),
    E("layers.0.adaLN_modulation.1", "layers.0.norm1.linear", alpha=1.0),
    E("noise_refiner.0.attention.qkv", "noise_refiner.0.attn.to_q", "noise_refiner.0.attn.to_k", "noise_refiner.0.attn.to_v"),
    E("noise_refiner.0.adaLN_modulation.1", "noise_refiner.0.norm1.linear", alpha=8.0),
    E("context_refiner.0.attention.qkv", "context_refiner.0.attn.to_q", "context_refiner.0.attn.to_k",
      "context_refiner.0.attn.to_v", lora=False, diff=True),
    E("context_refiner.0.feed_forward.w2", "context_refiner.0.feed_forward.linear_2"),
    E("context_refiner.0.attention_norm1", "context_refiner.0.norm1", lora=False, diff=True),
    E("layers.0.attention_norm1", "layers.0.norm1.norm", lora=False, diff=True),
    E("layers.0.attention.q_norm", "layers.0.attn.norm_q", lora=False, diff=True),
    E("x_embedder", "x_embedder"),
    E("t_embedder.mlp.0", "time_caption_embed.timestep_embedder.linear_1", alpha=3.0),
    E("cap_embedder.1", "time_caption_embed.caption_embedder.1"),
    E("final_layer.adaLN_modulation.1", "norm_out.linear_1"),
    E("final_layer.linear", "norm_out.linear_2", diff_b=True),
)


def test_lumina2_original_names(tmp_path):
    """Reference: the format's math (diffusers' converter hard-codes the released widths, checked above)."""
    path = str(tmp_path / "lumina2.safetensors")
    tensors = write_file(path, "lumina2", LUMINA2, prefix="diffusion_model.", down="lora_A.weight", up="lora_B.weight", seed=6)
    assert_detected(tensors, "lumina2")
    want = format_math("lumina2", LUMINA2, tensors, "diffusion_model.", "lora_B.weight", "lora_A.weight", SCALE)
    got, report = jlora_fused("lumina2", path, "lumina2", None)
    assert_report_complete(report, tensors, "lumina2")
    changed = assert_fused_equal(got, want, flat_tree(model("lumina2").state_dict()))
    assert changed == expected_paths("lumina2", LUMINA2)
    forced, _ = jlora_fused("lumina2", path, "lumina2", "lumina2")
    assert_fused_equal(forced, want, flat_tree(model("lumina2").state_dict()))


# ---- Qwen-Image: dotted names with lora_down + alpha, and kohya names --------------------------

_QWEN_BLOCK = (("attn.to_q", 2.0), ("attn.to_k", 3.0), ("attn.to_v", 5.0), ("attn.add_q_proj", 1.0), ("attn.to_out.0", 6.0),
               ("attn.to_add_out", 7.0), ("img_mlp.net.0.proj", 2.5), ("txt_mlp.net.2", 9.0), ("img_mod.1", 4.0),
               ("txt_mod.1", 0.5))
QWEN_BLOCKS = tuple(E(f"transformer_blocks.{i}.{m}", f"transformer_blocks.{i}.{m}", alpha=a + i) for i in (0, 1)
                    for m, a in _QWEN_BLOCK)
QWEN_DOTTED = QWEN_BLOCKS + tuple(E(m, m, alpha=a) for m, a in (("img_in", 3.0), ("txt_in", 1.5), ("proj_out", 2.0),
                                                                 ("norm_out.linear", 8.0)))
QWEN_KOHYA = tuple(dataclasses.replace(e, src=e.src.replace(".", "_")) for e in QWEN_BLOCKS)
QWEN_CASES = {"dotted": (QWEN_DOTTED, "", "prefixed_diffusers"), "kohya": (QWEN_KOHYA, "lora_unet_", "kohya_dit")}


@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen_image(case, tmp_path):
    entries, prefix, fmt = QWEN_CASES[case]
    path = str(tmp_path / "qwen.safetensors")
    tensors = write_file(path, "qwen_image", entries, prefix=prefix, down="lora_down.weight", up="lora_up.weight", seed=7)
    assert_detected(tensors, fmt)
    want, injected = diffusers_fused("qwen_image", QwenImageLoraLoaderMixin, path)
    got, report = jlora_fused("qwen_image", path, "qwen_image", None)
    assert_report_complete(report, tensors, fmt)
    changed = assert_fused_equal(got, want, flat_tree(model("qwen_image").state_dict()))
    assert changed == expected_paths("qwen_image", entries) and injected == len(entries)
    forced, _ = jlora_fused("qwen_image", path, "qwen_image", fmt)
    assert_fused_equal(forced, want, flat_tree(model("qwen_image").state_dict()))


# ---- detection and bad inputs -----------------------------------------------------------------

DIT_FORMATS = ("wan", "musubi_wan", "hunyuan_video", "lumina2", "prefixed_diffusers", "kohya_dit")
OTHER_FILES = {
    "kohya_flux": ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_single_blocks_0_linear1.alpha"],
    "comfy_flux": ["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
                   "diffusion_model.single_blocks.0.modulation.lin.lora_up.weight"],
    "comfy_flux_lora_A": ["diffusion_model.double_blocks.0.img_mlp.0.lora_A.weight", "diffusion_model.txt_in.lora_B.weight"],
    "peft_flux": ["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"],
    "peft_sd": ["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",
                "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"],
    "kohya_sd": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                 "lora_te_text_model_x.alpha"],
    "kohya_sdxl_sgm": ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"],
    "xlabs": ["double_blocks.0.processor.qkv_lora1.down.weight", "diffusion_model.single_blocks.1.processor.proj_lora.up.weight"],
    "onetrainer": ["lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"],
    "fal_kontext": ["base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight"],
    "old_diffusers": ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"],
    "comfy_sd_unet": ["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight"],
}


@pytest.mark.parametrize("other", sorted(OTHER_FILES))
def test_dit_detectors_leave_other_formats_alone(other):
    keys = frozenset(OTHER_FILES[other])
    assert not [f.name for f in engine.matching_formats(keys) if f.name in DIT_FORMATS]


def _hunyuan_tree():
    return {"transformer": nested(flat_tree(model("hunyuan_video").state_dict()))}


@pytest.mark.parametrize("src, n_out, match", [
    ("double_blocks.0.img_attn_qkv", 47, "47 output rows .* 'equal'"),
    ("single_blocks.0.linear1", 48, r"48 output rows .*input features 16.* 'qkv_mlp'"),
])
def test_fused_rows_that_do_not_split_name_the_key(src, n_out, match):
    rng = _rng(8)
    tensors = {f"diffusion_model.{src}.lora_A.weight": rng.standard_normal((RANK, 16)).astype(np.float32),
               f"diffusion_model.{src}.lora_B.weight": rng.standard_normal((n_out, RANK)).astype(np.float32)}
    with pytest.raises(jlora.errors.InvalidAdapterError, match=match) as e:  # linear1 alone also reads as Flux
        jlora.load_lora_weights(tensors, _hunyuan_tree(), family="hunyuan_video", format="hunyuan_video")
    assert src in str(e.value)


def test_fused_rows_of_a_lora_for_another_width_are_a_shape_error():
    """Rows that split but do not fit the model (a LoRA for a wider model) fail on the target's shape."""
    rng = _rng(9)
    tensors = {"diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight": rng.standard_normal((RANK, 32)).astype(np.float32),
               "diffusion_model.double_blocks.0.img_attn_qkv.lora_B.weight": rng.standard_normal((96, RANK)).astype(np.float32)}
    with pytest.raises(jlora.errors.ShapeMismatchError, match="img_attn_qkv"):
        jlora.load_lora_weights(tensors, _hunyuan_tree(), family="hunyuan_video")


def test_map_tables_have_one_rule_per_source():
    """Every map becomes one anchored rule; no key of the tables' own sources matches two rules."""
    for fmt, maps in (("wan", dit.WAN_MAPS), ("hunyuan_video", dit.HUNYUAN_VIDEO_MAPS), ("lumina2", dit.LUMINA2_MAPS)):
        assert len(engine.get_format(fmt).rules) == len(maps)
    keys = {f"diffusion_model.{e.src}.lora_A.weight" for e in WAN_T2V + WAN_I2V}
    keys |= {f"diffusion_model.{e.src}.diff" for e in LUMINA2}
    for fmt in ("wan", "lumina2"):
        engine.match_keys(engine.get_format(fmt), keys)  # raises on a key matching two rules
