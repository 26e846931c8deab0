"""Shape indexes of standard diffusion architectures, without building any model.

`unet_index(config)` gives `{path: (shape, dtype)}` of a diffusers-Flax
`FlaxUNet2DConditionModel` for a diffusers UNet config; `clip_index(...)` the same
for a transformers-Flax CLIP text model. With `family_indexes("sdxl")` the
converters can check and convert a LoRA file for a family with no weights at hand
(`jlora inspect`, `jlora convert`, benchmarks on real-size trees).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from converters import architectures_dit

Path = tuple[str, ...]
Index = dict[Path, tuple[tuple[int, ...], np.dtype]]

SD15_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, transformer_layers_per_block=1, use_linear_projection=False,
)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, use_linear_projection=True)
SDXL_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, projection_dim=None)
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, projection_dim=None)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, projection_dim=1280)

FLUX_DEV = dict(
    in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
)

# Flux.2 transformers (diffusers `Flux2Transformer2DModel` configs of the released models). dev: 8 double and 48
# single blocks, 48 heads of 128 (hidden 6144), text features 15360 (Mistral Small 3.1, three layers of 5120),
# guidance embedder; klein 4B: 5 + 20 blocks, 24 heads (hidden 3072), text 7680 (Qwen3-4B, 3 x 2560), no guidance;
# klein 9B: 8 + 24 blocks, 32 heads (hidden 4096), text 12288 (Qwen3-8B, 3 x 4096), no guidance. All: 128 latent
# channels, patch 1, MLP ratio 3 (SwiGLU), timestep channels 256.
FLUX2_DEV = dict(
    in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0, guidance_embeds=True,
)
FLUX2_KLEIN_4B = dict(FLUX2_DEV, num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                      guidance_embeds=False)
FLUX2_KLEIN_9B = dict(FLUX2_DEV, num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                      guidance_embeds=False)

FAMILY_MODELS = {
    "sd": {"unet": SD15_UNET, "text_encoder": CLIP_L},
    "sd2": {"unet": SD2_UNET, "text_encoder": CLIP_H},
    "sdxl": {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G},
    "flux": {"transformer": FLUX_DEV, "text_encoder": CLIP_L},
    "flux2": {"transformer": FLUX2_DEV},
    "flux2_klein_4b": {"transformer": FLUX2_KLEIN_4B},
    "flux2_klein_9b": {"transformer": FLUX2_KLEIN_9B},
    "z_image": {"transformer": architectures_dit.Z_IMAGE_TURBO},
    "ltx2": {"transformer": architectures_dit.LTX2_19B, "connectors": architectures_dit.LTX2_19B_CONNECTORS},
}
# (family, component) -> the index builder, where it is not the UNet / CLIP / Flux.1 default
_BUILDERS = {
    **{(f, "transformer"): "flux2" for f in ("flux2", "flux2_klein_4b", "flux2_klein_9b")},
    ("z_image", "transformer"): "z_image",
    ("ltx2", "transformer"): "ltx2",
    ("ltx2", "connectors"): "ltx2_connectors",
}


class _Builder:
    def __init__(self, dtype):
        self.index: Index = {}
        self.dtype = np.dtype(dtype)

    def add(self, path: Path, shape) -> None:
        self.index[path] = (tuple(int(s) for s in shape), self.dtype)

    def dense(self, path: Path, n_in: int, n_out: int, bias: bool = True) -> None:
        self.add(path + ("kernel",), (n_in, n_out))
        if bias:
            self.add(path + ("bias",), (n_out,))

    def conv(self, path: Path, n_in: int, n_out: int, k: int) -> None:
        self.add(path + ("kernel",), (k, k, n_in, n_out))
        self.add(path + ("bias",), (n_out,))

    def norm(self, path: Path, n: int) -> None:
        self.add(path + ("scale",), (n,))
        self.add(path + ("bias",), (n,))

    def resnet(self, path: Path, n_in: int, n_out: int, temb: int) -> None:
        self.norm(path + ("norm1",), n_in)
        self.conv(path + ("conv1",), n_in, n_out, 3)
        self.dense(path + ("time_emb_proj",), temb, n_out)
        self.norm(path + ("norm2",), n_out)
        self.conv(path + ("conv2",), n_out, n_out, 3)
        if n_in != n_out:
            self.conv(path + ("conv_shortcut",), n_in, n_out, 1)

    def transformer(self, path: Path, ch: int, cross: int, layers: int, linear: bool) -> None:
        self.norm(path + ("norm",), ch)
        for name in ("proj_in", "proj_out"):
            (self.dense if linear else lambda p, a, b: self.conv(p, a, b, 1))(path + (name,), ch, ch)
        for k in range(layers):
            block = path + (f"transformer_blocks_{k}",)
            for attn, kv in (("attn1", ch), ("attn2", cross)):
                self.dense(block + (attn, "to_q"), ch, ch, bias=False)
                self.dense(block + (attn, "to_k"), kv, ch, bias=False)
                self.dense(block + (attn, "to_v"), kv, ch, bias=False)
                self.dense(block + (attn, "to_out_0"), ch, ch)
            self.dense(block + ("ff", "net_0", "proj"), ch, 8 * ch)
            self.dense(block + ("ff", "net_2"), 4 * ch, ch)
            for n in ("norm1", "norm2", "norm3"):
                self.norm(block + (n,), ch)


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def unet_index(config: Mapping, dtype=np.float32) -> Index:
    """The params shape index of a diffusers-Flax UNet2DConditionModel for a diffusers UNet config."""
    b = _Builder(dtype)
    ch = tuple(config["block_out_channels"])
    n, L = len(ch), config.get("layers_per_block", 2)
    layers = _per_block(config.get("transformer_layers_per_block", 1), n)
    cross, linear = config.get("cross_attention_dim", 768), config.get("use_linear_projection", False)
    temb = 4 * ch[0]
    b.conv(("conv_in",), config.get("in_channels", 4), ch[0], 3)
    b.dense(("time_embedding", "linear_1"), ch[0], temb)
    b.dense(("time_embedding", "linear_2"), temb, temb)
    if config.get("addition_embed_type") == "text_time":
        b.dense(("add_embedding", "linear_1"), config["projection_class_embeddings_input_dim"], temb)
        b.dense(("add_embedding", "linear_2"), temb, temb)
    out = ch[0]
    for i, kind in enumerate(config["down_block_types"]):
        n_in, out = out, ch[i]
        for j in range(L):
            b.resnet((f"down_blocks_{i}", f"resnets_{j}"), n_in if j == 0 else out, out, temb)
            if kind.startswith("CrossAttn"):
                b.transformer((f"down_blocks_{i}", f"attentions_{j}"), out, cross, layers[i], linear)
        if i < n - 1:
            b.conv((f"down_blocks_{i}", "downsamplers_0", "conv"), out, out, 3)
    b.resnet(("mid_block", "resnets_0"), ch[-1], ch[-1], temb)
    b.transformer(("mid_block", "attentions_0"), ch[-1], cross, layers[-1], linear)
    b.resnet(("mid_block", "resnets_1"), ch[-1], ch[-1], temb)
    rch, rlayers = ch[::-1], layers[::-1]
    out = rch[0]
    for i, kind in enumerate(config["up_block_types"]):
        prev, out, n_in = out, rch[i], rch[min(i + 1, n - 1)]
        for j in range(L + 1):
            skip = n_in if j == L else out
            b.resnet((f"up_blocks_{i}", f"resnets_{j}"), (prev if j == 0 else out) + skip, out, temb)
            if kind.startswith("CrossAttn"):
                b.transformer((f"up_blocks_{i}", f"attentions_{j}"), out, cross, rlayers[i], linear)
        if i < n - 1:
            b.conv((f"up_blocks_{i}", "upsamplers_0", "conv"), out, out, 3)
    b.norm(("conv_norm_out",), ch[0])
    b.conv(("conv_out",), ch[0], config.get("out_channels", 4), 3)
    return b.index


def clip_index(hidden_size: int, intermediate_size: int, num_hidden_layers: int, projection_dim: int | None = None,
               vocab_size: int = 49408, max_position_embeddings: int = 77, dtype=np.float32) -> Index:
    """The params shape index of a transformers-Flax CLIP text model (with projection if `projection_dim`)."""
    b = _Builder(dtype)
    d, root = hidden_size, ("text_model",)
    b.add(root + ("embeddings", "token_embedding", "embedding"), (vocab_size, d))
    b.add(root + ("embeddings", "position_embedding", "embedding"), (max_position_embeddings, d))
    for i in range(num_hidden_layers):
        layer = root + ("encoder", "layers", str(i))
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            b.dense(layer + ("self_attn", p), d, d)
        b.dense(layer + ("mlp", "fc1"), d, intermediate_size)
        b.dense(layer + ("mlp", "fc2"), intermediate_size, d)
        b.norm(layer + ("layer_norm1",), d)
        b.norm(layer + ("layer_norm2",), d)
    b.norm(root + ("final_layer_norm",), d)
    if projection_dim:
        b.dense(("text_projection",), d, projection_dim, bias=False)
    return b.index


def flux_index(config: Mapping, dtype=np.float32) -> Index:
    """The params shape index of `jlora.models.flux` (BFL layout, stacked blocks) for a diffusers Flux config."""
    b = _Builder(dtype)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    hd, mlp = config["attention_head_dim"], 4 * d
    n2, n1 = config["num_layers"], config["num_single_layers"]
    out = config.get("out_channels") or config["in_channels"]

    def stacked(path, n, n_in, n_out):
        b.add(path + ("kernel",), (n, n_in, n_out))
        b.add(path + ("bias",), (n, n_out))

    b.dense(("img_in",), config["in_channels"], d)
    b.dense(("txt_in",), config["joint_attention_dim"], d)
    embedders = [("time_in", 256), ("vector_in", config["pooled_projection_dim"])]
    if config.get("guidance_embeds"):
        embedders.append(("guidance_in", 256))
    for name, n_in in embedders:
        b.dense((name, "in_layer"), n_in, d)
        b.dense((name, "out_layer"), d, d)
    for stream in ("img", "txt"):
        stacked(("double_blocks", f"{stream}_mod", "lin"), n2, d, 6 * d)
        stacked(("double_blocks", f"{stream}_attn", "qkv"), n2, d, 3 * d)
        stacked(("double_blocks", f"{stream}_attn", "proj"), n2, d, d)
        stacked(("double_blocks", f"{stream}_mlp_0"), n2, d, mlp)
        stacked(("double_blocks", f"{stream}_mlp_2"), n2, mlp, d)
        for norm in ("query_norm", "key_norm"):
            b.add(("double_blocks", f"{stream}_attn", "norm", norm, "scale"), (n2, hd))
    stacked(("single_blocks", "modulation", "lin"), n1, d, 3 * d)
    stacked(("single_blocks", "linear1"), n1, d, 3 * d + mlp)
    stacked(("single_blocks", "linear2"), n1, d + mlp, d)
    for norm in ("query_norm", "key_norm"):
        b.add(("single_blocks", "norm", norm, "scale"), (n1, hd))
    b.dense(("final_layer", "adaLN_modulation_1"), d, 2 * d)
    b.dense(("final_layer", "linear"), d, config.get("patch_size", 1) ** 2 * out)
    return b.index


def flux2_index(config: Mapping, dtype=np.float32) -> Index:
    """The shape index of diffusers' `Flux2Transformer2DModel` as a torch-mirror tree (diffusers module names,
    `(in, out)` kernels, norm weights as `scale`; no biases) for a diffusers Flux.2 config."""
    b = _Builder(dtype)
    hd = config.get("attention_head_dim", 128)
    d = config.get("num_attention_heads", 48) * hd
    mlp = int(d * config.get("mlp_ratio", 3.0))
    out = config.get("out_channels") or config.get("in_channels", 128)

    def dense(module: str, n_in: int, n_out: int) -> None:
        b.dense(tuple(module.split(".")), n_in, n_out, bias=False)

    def norms(prefix: str, *names: str) -> None:
        for n in names:
            b.add(tuple(f"{prefix}.{n}".split(".")) + ("scale",), (hd,))

    embedders = ["timestep_embedder"] + (["guidance_embedder"] if config.get("guidance_embeds", True) else [])
    for e in embedders:
        dense(f"time_guidance_embed.{e}.linear_1", config.get("timestep_guidance_channels", 256), d)
        dense(f"time_guidance_embed.{e}.linear_2", d, d)
    dense("double_stream_modulation_img.linear", d, 6 * d)
    dense("double_stream_modulation_txt.linear", d, 6 * d)
    dense("single_stream_modulation.linear", d, 3 * d)
    dense("x_embedder", config.get("in_channels", 128), d)
    dense("context_embedder", config.get("joint_attention_dim", 15360), d)
    for i in range(config.get("num_layers", 8)):
        attn = f"transformer_blocks.{i}.attn"
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            dense(f"{attn}.{name}", d, d)
        norms(attn, "norm_q", "norm_k", "norm_added_q", "norm_added_k")
        for ff in ("ff", "ff_context"):
            dense(f"transformer_blocks.{i}.{ff}.linear_in", d, 2 * mlp)
            dense(f"transformer_blocks.{i}.{ff}.linear_out", mlp, d)
    for i in range(config.get("num_single_layers", 48)):
        attn = f"single_transformer_blocks.{i}.attn"
        dense(f"{attn}.to_qkv_mlp_proj", d, 3 * d + 2 * mlp)
        dense(f"{attn}.to_out", d + mlp, d)
        norms(attn, "norm_q", "norm_k")
    dense("norm_out.linear", d, 2 * d)
    dense("proj_out", d, config.get("patch_size", 1) ** 2 * out)
    return b.index


def family_indexes(family: str, dtype=np.float16) -> dict[str, Index]:
    """Shape indexes of every component of a family's standard models (`sd`, `sd2`, `sdxl`, `flux`, `flux2`, `z_image`,
    `ltx2`, ...: the keys of `FAMILY_MODELS`)."""
    from converters.errors import JloraError

    if family not in FAMILY_MODELS:
        raise JloraError(f"no standard architecture for family {family!r}; known: {sorted(FAMILY_MODELS)}.")
    builders = {"flux2": flux2_index, "z_image": architectures_dit.z_image_index, "ltx2": architectures_dit.ltx2_index,
                "ltx2_connectors": architectures_dit.ltx2_connectors_index}
    out = {}
    for component, cfg in FAMILY_MODELS[family].items():
        if (family, component) in _BUILDERS:
            out[component] = builders[_BUILDERS[family, component]](cfg, dtype)
        elif component == "unet":
            out[component] = unet_index(cfg, dtype)
        elif component == "transformer":
            out[component] = flux_index(cfg, dtype)
        else:
            out[component] = clip_index(**cfg, dtype=dtype)
    return out
