"""Batch generation with LoRAs on jlora's Flax Flux: a flow-matching Euler loop, sharded over devices.

    python scripts/generate.py --lora style.safetensors --scale 0.8 --batch 8 --steps 8 --out latents.npy
    python scripts/generate.py --transformer /path/to/FLUX.1-dev/transformer --lora a.safetensors --lora b.safetensors \\
        --weights 0.7 0.5 --prompt-embeds embeds.npz --height 128 --width 128

Without `--transformer` a tiny random Flux is built (a smoke run). Text conditioning comes from
`--prompt-embeds` (an .npz with `encoder_hidden_states` (B, S, joint_attention_dim) and
`pooled_projections` (B, pooled_projection_dim), e.g. from a text-encoder run elsewhere) or is random.
Several `--lora` files are combined with `--weights` (as diffusers' `set_adapters`); the call scale is
a traced argument, so `--scale` values share one compiled step. The batch is split over all devices
(data parallel, params and adapters replicated). Prints a timing table (LoRA applied per step vs the
same step on fused params) and writes the final packed latents.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from converters.safetensors_io import load_file
from jlora.models import flux

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def load_transformer(directory: str | None, seed: int):
    """(config, apply_fn, params) from a diffusers transformer folder, or a tiny random Flux."""
    if directory is None:
        return TINY, flux.make_apply(TINY), flux.init_params(TINY, jax.random.key(seed))
    with open(os.path.join(directory, "config.json")) as f:
        config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    state_dict = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        state_dict.update(load_file(path)[0])
    apply_fn, params = flux.from_diffusers(state_dict, config)
    return config, apply_fn, params


def image_ids(height: int, width: int) -> np.ndarray:
    """Flux's (frame, row, col) position ids of a height x width grid of packed latent tokens."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def sample(step, params, adapter, scale, noise, txt, pooled, img_ids, txt_ids, guidance, steps: int):
    """Euler integration of the flow from t=1 (noise) to t=0 with `steps` equal steps."""
    sigmas = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    x = noise
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        t = jnp.full((x.shape[0],), s0, x.dtype)
        v = step(params, adapter, scale, x, txt, pooled, t, img_ids, txt_ids, guidance)
        x = x + (s1 - s0) * v
    return x


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transformer", default=None, help="a diffusers FluxTransformer2DModel folder (config.json + safetensors)")
    parser.add_argument("--lora", action="append", default=[], help="LoRA file (repeat for several)")
    parser.add_argument("--weights", type=float, nargs="*", default=None, help="one weight per --lora")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--height", type=int, default=8, help="packed latent rows (image height / 16)")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--prompt-embeds", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="latents.npy")
    args = parser.parse_args(argv)

    config, apply_fn, params = load_transformer(args.transformer, args.seed)
    cfg = flux.FluxConfig.of(config)
    loaded = [jlora.load_lora_weights(f, {"transformer": params}, family="flux")["transformer"] for f in args.lora]
    if not loaded:
        adapter = jax.tree.map(lambda _: None, params)
    else:
        adapter = jlora.combine(loaded, args.weights or [1.0] * len(loaded))

    rng = np.random.default_rng(args.seed)
    n_img, b = args.height * args.width, args.batch
    if args.prompt_embeds:
        embeds = np.load(args.prompt_embeds)
        txt, pooled = embeds["encoder_hidden_states"][:b], embeds["pooled_projections"][:b]
    else:
        txt = rng.standard_normal((b, 16, cfg.joint_attention_dim)).astype(np.float32)
        pooled = rng.standard_normal((b, cfg.pooled_projection_dim)).astype(np.float32)
    noise = rng.standard_normal((b, n_img, cfg.in_channels)).astype(np.float32)
    guidance = np.full((b,), args.guidance, np.float32) if cfg.guidance_embeds else None

    n_dev = jax.device_count()
    if b % n_dev:
        print(f"batch {b} does not split over {n_dev} devices; use a multiple of {n_dev}", file=sys.stderr)
        return 2
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    noise, txt, pooled = (jax.device_put(x, batch) for x in (noise, txt, pooled))
    guidance = None if guidance is None else jax.device_put(guidance, batch)
    img_ids, txt_ids = image_ids(args.height, args.width), np.zeros((txt.shape[1], 3), np.float32)

    step = jax.jit(lambda p, a, s, x, c, y, t, i, j, g: apply_fn(jlora.apply(p, a, s), x, c, y, t, i, j, g))
    timings = {}
    t0 = time.perf_counter()
    out = jax.block_until_ready(sample(step, params, adapter, args.scale, noise, txt, pooled, img_ids, txt_ids, guidance, args.steps))
    timings["first run (compile + sample)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(sample(step, params, adapter, args.scale, noise, txt, pooled, img_ids, txt_ids, guidance, args.steps))
    timings["LoRA applied in every step"] = time.perf_counter() - t0
    fused = jlora.fuse(params, adapter, args.scale)
    none = jax.tree.map(lambda _: None, params)
    jax.block_until_ready(sample(step, fused, none, 1.0, noise, txt, pooled, img_ids, txt_ids, guidance, 1))
    t0 = time.perf_counter()
    out_fused = jax.block_until_ready(sample(step, fused, none, 1.0, noise, txt, pooled, img_ids, txt_ids, guidance, args.steps))
    timings["fused params"] = time.perf_counter() - t0
    diff = float(jnp.abs(out - out_fused).max())

    np.save(args.out, np.asarray(out))
    print(f"{b} samples x {args.steps} steps, {n_img} tokens, {len(args.lora)} LoRA(s), scale {args.scale}, "
          f"{n_dev} {jax.devices()[0].platform} devices -> {args.out}")
    for name, seconds in timings.items():
        print(f"  {name:<32} {seconds * 1e3:9.1f} ms")
    print(f"  {'applied / fused time':<32} {timings['LoRA applied in every step'] / timings['fused params']:9.2f}x")
    print(f"  {'max |applied - fused| latents':<32} {diff:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
