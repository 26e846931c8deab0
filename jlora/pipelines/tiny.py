"""A tiny random SD pipeline in memory (and its tokenizer files), for the demo and smoke runs.

The tokenizer is a real `CLIPTokenizer` over a small byte-level BPE vocabulary: the 256 byte
symbols, their end-of-word forms, merges learnt from a few words, then `<|startoftext|>` and
`<|endoftext|>` as the two last ids, the order of CLIP's own vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax

from jlora.models.random_init import random_params

WORDS = ("a photo of the cat dog in on with red blue green painting style an astronaut riding horse "
         "mountain river city night light portrait landscape").split()


def bpe_merges(words: Sequence[str], n: int = 40) -> list[tuple[str, str]]:
    """The `n` most frequent adjacent symbol pairs of `words`, merged greedily (BPE training)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    for _ in range(n):
        counts: dict = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(sorted(counts), key=counts.get)
        merges.append(best)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i : i + 2] = [s[i] + s[i + 1]]
                i += 1
    return merges


def clip_tokenizer(directory: str, *, pad_token: str = "<|endoftext|>", model_max_length: int = 77,
                   words: Sequence[str] = WORDS):
    """Write `vocab.json` and `merges.txt` into `directory` and return a `CLIPTokenizer` over them."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = bpe_merges(words)
    vocab = list(dict.fromkeys(chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                         pad_token=pad_token, model_max_length=model_max_length)


def tiny_sd(directory: str, seed: int = 0, *, sample_size: int = 32):
    """A random SD-1.5-shaped `StableDiffusion` (CLIP 2 layers, UNet (32, 64), VAE (32, 64)), images of
    `2 * sample_size` pixels. `directory` receives the tokenizer files."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    from jlora.pipelines.stable_diffusion import StableDiffusion

    tok = clip_tokenizer(os.path.join(directory, "tokenizer"), model_max_length=32)
    n = len(tok)
    cfg = CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=32, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=1)
    clip = FlaxCLIPTextModel(cfg, seed=seed, _do_init=False)
    unet = FlaxUNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = FlaxAutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, sample_size=2 * sample_size)
    key = jax.random.key(seed)
    shapes = {"text_encoder": jax.eval_shape(lambda k: clip.init_weights(k, (1, cfg.max_position_embeddings)), key),
              "unet": jax.eval_shape(unet.init_weights, key), "vae": jax.eval_shape(vae.init_weights, key)}
    params = {name: dict(random_params(dict(tree), seed + i)) for i, (name, tree) in enumerate(shapes.items())}
    sched = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    return StableDiffusion("sd", directory, [tok], [clip], unet, vae, params, sched, 0.18215, 2)
