"""Tiny random diffusers pipelines, saved with `save_pretrained`, for pipeline parity tests.

Every component is built from a config with diffusers/transformers in torch (seeded), tokenizers
included: a byte-level CLIP BPE vocabulary (256 bytes, their end-of-word forms, a few merges,
then `<|startoftext|>` and `<|endoftext|>` last, as in CLIP's real vocabulary) and a Unigram T5
tokenizer built with `tokenizers`. LoRA files come from PEFT on the saved components through the
pipeline's own `save_lora_weights`. Builders are cached per process; treat their results as read-only.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import numpy as np
import torch

CLIP_LEN = 24
T5_LEN = 16
_WORDS = ("a photo of the cat dog in on with red blue green painting style an astronaut riding horse "
          "mountain river city night light portrait landscape").split()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def clip_tokenizer(directory: str, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over a tiny byte-level BPE vocabulary (ids: bytes, bytes</w>, merges, bos, eos)."""
    from jlora.pipelines.tiny import clip_tokenizer as build

    return build(directory, pad_token=pad_token, model_max_length=CLIP_LEN, words=_WORDS)


def t5_tokenizer():
    """A T5TokenizerFast over a Unigram vocabulary (`<pad>` 0, `</s>` 1, `<unk>` 2, words, letters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    pieces += [("\u2581", -4.0)] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz,.!'"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=T5_LEN)


def _clip_text(vocab_size: int, projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CLIP_LEN, hidden_act="quick_gelu",
                         projection_dim=hidden, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=1, layer_norm_eps=1e-5)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(**kw):
    from diffusers import AutoencoderKL

    cfg = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=32, norm_num_groups=32)
    return AutoencoderKL(**{**cfg, **kw}).eval()


def _randomize(module, std: float = 0.1, seed: int = 0):
    """Non-zero random weights everywhere (zero-initialised layers included), norms near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _euler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  timestep_spacing="leading")


def build_sd15(directory: str) -> str:
    """A StableDiffusionPipeline (DDIM) saved to `directory`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = clip_tokenizer(os.path.join(directory, "_vocab"))
    _seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32).eval()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(len(tok), False), tokenizer=tok, unet=unet,
                                   scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def build_sdxl(directory: str) -> str:
    """A StableDiffusionXLPipeline (Euler discrete, two CLIP encoders, text_time conditioning)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok = clip_tokenizer(os.path.join(directory, "_vocab"))
    tok2 = clip_tokenizer(os.path.join(directory, "_vocab2"), pad_token="!")
    _seed(1)
    te, te2 = _clip_text(len(tok), False), _clip_text(len(tok2), True)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, cross_attention_dim=64, attention_head_dim=(2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                norm_num_groups=32).eval()
    _randomize(unet.add_embedding, 0.05, 3)  # the size/crop conditioning must matter
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=_euler())
    pipe.save_pretrained(directory)
    return directory


def build_flux(directory: str) -> str:
    """A FluxPipeline: CLIP + T5 encoders, a 1+1 block Flux transformer with guidance, a 16-channel VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = clip_tokenizer(os.path.join(directory, "_vocab"))
    tok2 = t5_tokenizer()
    _seed(2)
    te = _clip_text(len(tok), False)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=1)).eval()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    _randomize(transformer, 0.1, 4)
    vae = _vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5035,
               shift_factor=0.0609)
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                            max_shift=1.15, num_train_timesteps=1000, shift=3.0,
                                            use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok2,
                        transformer=transformer)
    pipe.save_pretrained(directory)
    return directory


BUILDERS = {"sd": build_sd15, "sdxl": build_sdxl, "flux": build_flux}
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
DENOISER = {"sd": "unet", "sdxl": "unet", "flux": "transformer"}
LORA_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
             "time_emb_proj"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out", "norm1.linear", "norm.linear"],
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


_ROOT = None


def root() -> str:
    global _ROOT
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="jlora-pipelines-")
    return _ROOT


@functools.lru_cache(maxsize=None)
def pipeline_dir(family: str) -> str:
    """The saved tiny pipeline of `family` ("sd", "sdxl", "flux"), built once per process."""
    return BUILDERS[family](os.path.join(root(), family))


def torch_pipeline(family: str):
    """A fresh diffusers torch pipeline loaded from the saved folder (fp32, CPU)."""
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASSES[family]).from_pretrained(pipeline_dir(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.lru_cache(maxsize=None)
def lora_file(family: str, seed: int = 0, rank: int = 4, alpha: float = 8.0, text_encoder: bool = True) -> str:
    """A PEFT LoRA on the denoiser (and the first text encoder), saved with the pipeline's
    `save_lora_weights` (diffusers keys and `lora_adapter_metadata`)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = torch_pipeline(family)
    denoiser = DENOISER[family]
    layers, metadata = {}, {}
    components = [(denoiser, getattr(pipe, denoiser))] + ([("text_encoder", pipe.text_encoder)] if text_encoder else [])
    for i, (name, model) in enumerate(components):
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                            target_modules=LORA_TARGETS[name if name != "text_encoder" else "text_encoder"])
        torch.manual_seed(1000 * seed + i)
        model.add_adapter(config)
        with torch.no_grad():  # make B as large as A so the LoRA visibly changes the image
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn_like(p) * (0.3 if name != "text_encoder" else 0.2))
        layers[f"{name}_lora_layers"] = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    out = os.path.join(root(), f"lora-{family}-{seed}-{rank}-{int(text_encoder)}")
    type(pipe).save_lora_weights(out, **layers, **metadata)
    return os.path.join(out, "pytorch_lora_weights.safetensors")


def initial_latents(family: str, n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Unit-normal initial latents in the layout the torch pipeline takes (`latents=`): (n, C, h, w) for
    SD/SDXL, packed (n, h/2 * w/2, 4C) for Flux."""
    rng = np.random.default_rng(seed)
    if family == "flux":
        h, w = height // 2 // 2, width // 2 // 2  # VAE scale 2, then 2x2 packing
        return rng.standard_normal((n, h * w, 64)).astype(np.float32)
    return rng.standard_normal((n, 4, height // 2, width // 2)).astype(np.float32)
