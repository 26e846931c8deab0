"""Train a LoRA on a folder of images with captions: a diffusers SD 1.x / SDXL / Flux folder in, a LoRA file out.

    python scripts/train_lora.py --model path/to/stable-diffusion-v1-5 --data photos/ --out lora/ \\
        --resolution 512 --steps 1000 --batch 4 --rank 16 --lr 1e-4 --validation-prompt "a photo of sks dog"

`photos/` holds images with same-name `.txt` captions, or a `metadata.jsonl` (`file_name`, `text`), or
images only with `--instance-prompt` (DreamBooth). Images are resized, cropped and flipped as
diffusers' scripts do (`jlora.data`), encoded once by the VAE and the text encoders and cached in
`OUT/cache.safetensors`; each step samples the cached latent distribution and the noise and
timesteps from `(seed, step)`, so a resumed run (`--resume`) takes the steps an uninterrupted one
would. The objective is `train_text_to_image_lora.py`'s (epsilon or v-prediction from the
scheduler config, optional `--snr-gamma`); SDXL adds its two text encoders, pooled embeddings and
size/crop ids as `train_dreambooth_lora_sdxl.py` does; Flux trains its transformer with the flow-matching
loss of `train_dreambooth_lora_flux.py` (`--weighting-scheme`, `--guidance`). AdamW with warmup and a constant or cosine
schedule, gradient clipping and accumulation; the batch is split over every device (`data` axis).
`--train-text-encoder` also trains LoRAs on the CLIP text encoders' attention projections (SDXL: both,
Flux: CLIP only) as the DreamBooth scripts' `--train_text_encoder` does: their token ids are cached and
the encoders run inside the loss (`--text-encoder-lr` sets their learning rate).

Writes `OUT/checkpoints/<step>` (adapter and optimizer state, orbax) every `--save-every` steps,
`OUT/validation/<step>.png` every `--validate-every` steps, and at the end
`OUT/pytorch_lora_weights.safetensors` (`--format diffusers`, loads with `pipe.load_lora_weights`) or a
kohya / A1111 file (`--format kohya`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a diffusers SD 1.x / SDXL / Flux pipeline folder")
    p.add_argument("--data", required=True, help="folder of images with .txt captions or metadata.jsonl")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--instance-prompt", default=None, help="caption for images without one (DreamBooth)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--center-crop", action="store_true", help="center crop (default: random crop)")
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--steps", type=int, default=500, help="train up to this step")
    p.add_argument("--batch", type=int, default=1, help="global batch per step (divides over the data axis)")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps per update")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-gamma loss weighting")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="also train LoRAs on the CLIP text encoder(s)' q/k/v/out projections (SDXL: both encoders; "
                        "Flux: CLIP only, T5 stays frozen), as diffusers' DreamBooth scripts' --train_text_encoder")
    p.add_argument("--text-encoder-lr", type=float, default=None, help="text encoders' learning rate (default: --lr)")
    p.add_argument("--targets", default=None, help="regex over the denoiser's kernel paths (default: the attention "
                   "projections: SD/SDXL attn[12]/to_(q|k|v|out_0), Flux (img|txt)_attn/(qkv|proj)|linear[12])")
    p.add_argument("--weighting-scheme", default="none", choices=("none", "sigma_sqrt", "logit_normal", "mode", "cosmap"),
                   help="Flux: timestep density and loss weighting (as the Flux script)")
    p.add_argument("--guidance", type=float, default=3.5, help="Flux: the guidance embedding during training")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="base weights' dtype")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--validation-prompt", default=None)
    p.add_argument("--validate-every", type=int, default=100)
    p.add_argument("--validation-steps", type=int, default=25, help="denoising steps of validation images")
    p.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--model-parallel", type=int, default=1,
                   help="size of the mesh's model axis: the denoiser's and text encoders' kernels (output axis) and "
                        "the LoRA factors beside them split over it; the batch splits over the rest (data axis)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host; "
                   "on Cloud TPU pod slices, SLURM, Open MPI and Kubernetes it finds the cluster itself)")
    p.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0 (plain machines)")
    p.add_argument("--num-processes", type=int, default=None, help="with --coordinator: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process's index")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "accumulate", "rank", "save_every", "validate_every", "model_parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def encoders(pipe):
    """Jitted VAE (pixels -> latent mean and log-variance, NCHW) and prompt encoders of a pipeline."""
    import jax
    import jax.numpy as jnp

    vae, params = pipe.vae, pipe.params["vae"]

    @jax.jit
    def encode(pixels):
        dist = vae.apply({"params": params}, pixels.astype(pipe.dtype), method=vae.encode).latent_dist
        to_nchw = lambda x: jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)  # noqa: E731
        return {"mean": to_nchw(dist.mean), "logvar": to_nchw(dist.logvar)}

    def images(pixels):
        return {k: jax.device_get(v) for k, v in encode(pixels).items()}

    def captions(texts):
        context, pooled = pipe.encode_prompts(list(texts), {"text_encoder": None} if pipe.family == "flux" else {})
        out = {"context": jax.device_get(context)}
        if pooled is not None:
            out["pooled"] = jax.device_get(pooled)
        for i, ids in enumerate(pipe.token_ids(list(texts))):  # text-encoder training encodes them every step
            out[f"ids{i}"] = ids.astype("int32")
        return out

    return images, captions


def step_batch(cache, order, step: int, args, scaling: float, family: str, shift: float = 0.0, flow=None):
    """The batch of `step`: its examples' cached embeddings, a latent sample, noise and timesteps
    (Flux: and sigmas, from the scheduler config `flow`), all drawn from `(seed, step)`."""
    import numpy as np

    from jlora import data

    per_epoch = len(order(0))
    epoch, j = divmod(step, per_epoch)
    idx = order(epoch)[j]
    rng = np.random.default_rng([args.seed, step])
    mean, logvar = cache["latents/mean"][idx], cache["latents/logvar"][idx]
    std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
    latents = (mean + std * rng.standard_normal(mean.shape).astype(np.float32) - shift) * scaling
    batch = {"latents": latents.astype(np.float32), "noise": rng.standard_normal(mean.shape).astype(np.float32),
             "timesteps": rng.integers(0, 1000, len(idx)).astype(np.int32), "context": cache["captions/context"][idx]}
    if args.train_text_encoder:
        batch.update({k[len("captions/"):]: v[idx] for k, v in cache.items() if k.startswith("captions/ids")})
    if family == "flux":
        import jax

        from jlora import objectives

        key = jax.random.fold_in(jax.random.key(args.seed), step)
        t, sigmas = objectives.sample_flow_timesteps(key, len(idx), flow, weighting_scheme=args.weighting_scheme)
        batch["timesteps"], batch["sigmas"] = np.asarray(t), np.asarray(sigmas)
        batch["pooled"] = cache["captions/pooled"][idx]
    if family == "sdxl":
        batch["pooled"] = cache["captions/pooled"][idx]
        batch["time_ids"] = data.sdxl_time_ids(cache["original_size"][idx], cache["crop_top_left"][idx],
                                               args.resolution)
    return batch


def make_flux_loss(pipe, args):
    import jax.numpy as jnp

    from jlora import objectives
    from jlora.models import flux as flux_model
    from jlora.pipelines.flux import image_ids, pack, unpack

    apply_fn = flux_model.make_apply(pipe.transformer.config, pipe.dtype)
    guided = pipe.guidance_embeds

    def loss_fn(params, batch):
        h, w = batch["latents"].shape[-2:]
        pooled = batch["pooled"]
        if args.train_text_encoder:  # CLIP (with its LoRA) gives the pooled embedding; T5's context is cached
            pooled = pipe.encode_pooled(params, batch["ids0"]).astype(pooled.dtype)
            params = params["transformer"]

        def model_fn(noisy, t):
            txt = batch["context"]
            out = apply_fn(params, pack(noisy), txt, pooled, t / 1000, jnp.asarray(image_ids(h, w)),
                           jnp.zeros((txt.shape[1], 3), jnp.float32),
                           jnp.full((noisy.shape[0],), args.guidance, jnp.float32) if guided else None)
            return unpack(out, h, w)

        return objectives.flow_matching_loss(model_fn, batch["latents"], batch["noise"], batch["timesteps"],
                                             batch["sigmas"], weighting_scheme=args.weighting_scheme)

    return loss_fn


def make_loss(pipe, args, alphas):
    from jlora import objectives

    if pipe.family == "flux":
        return make_flux_loss(pipe, args)
    unet, sdxl = pipe.unet, pipe.family == "sdxl"
    prediction = pipe.scheduler_config.get("prediction_type", "epsilon")

    def loss_fn(params, batch):
        context, pooled = batch["context"], batch.get("pooled")
        if args.train_text_encoder:  # the text encoders (with their LoRAs) run inside the loss
            ids = [batch[f"ids{i}"] for i in range(len(pipe.encoder_names))]
            context, pooled = pipe.encode_tokens(params, ids)
            params = params["unet"]

        def model_fn(noisy, t):
            added = {"text_embeds": pooled, "time_ids": batch["time_ids"]} if sdxl else None
            return unet.apply({"params": params}, noisy, t, context, added, train=False).sample

        return objectives.diffusion_loss(model_fn, batch["latents"], batch["noise"], batch["timesteps"], alphas,
                                         prediction_type=prediction, snr_gamma=args.snr_gamma)

    return loss_fn


def optimizer(args):
    import optax

    from jlora import training

    updates = max(1, args.steps // args.accumulate)
    warmup = min(args.warmup, updates)

    def schedule(peak):
        if args.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1) if warmup else 1,
                                                      max(updates, warmup + 1))
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup]) if warmup else peak

    adamw = optax.adamw(schedule(args.lr), weight_decay=args.weight_decay)
    if args.train_text_encoder:  # one global-norm clip over all factors, as the scripts' params_to_optimize
        text = optax.adamw(schedule(args.text_encoder_lr if args.text_encoder_lr is not None else args.lr),
                           weight_decay=args.weight_decay)
        adamw = optax.multi_transform({"denoiser": adamw, "text": text},
                                      lambda tree: {k: "text" if k.startswith("text_encoder") else "denoiser"
                                                    for k in tree})
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), adamw)
    if args.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=args.accumulate)
    return training.optimizer(tx)


def denoiser(pipe) -> str:
    return "transformer" if pipe.family == "flux" else "unet"


DEFAULT_TARGETS = {"sd": r"attn[12]/to_(q|k|v|out_0)", "sdxl": r"attn[12]/to_(q|k|v|out_0)",
                   "flux": r"(img|txt)_attn/(qkv|proj)|linear[12]"}
TEXT_ENCODER_TARGETS = r"self_attn/(q|k|v|out)_proj"  # diffusers' scripts: q_proj, k_proj, v_proj, out_proj


def text_encoders(pipe) -> list[str]:
    """The text encoders `--train-text-encoder` trains: SD/SDXL's CLIPs, Flux's CLIP (not T5)."""
    return ["text_encoder"] if pipe.family == "flux" else list(pipe.encoder_names)


def lora_files(pipe, adapter, args) -> dict:
    """`{component: adapter}` as saved: the denoiser's, and the text encoders' when they train."""
    if args.train_text_encoder:
        return dict(adapter)
    return {denoiser(pipe): adapter}


def validate(pipe, adapters, args, step: int, folder: str, main_process: bool = True) -> str | None:
    """A validation PNG of the LoRA at `step` (the LoRA goes through a diffusers file, as a user loads it).

    Every process takes part in gathering the factors; the main process alone writes and renders."""
    import jlora
    from jlora.pipelines import Lora, Request, common, images

    os.makedirs(folder, exist_ok=True)
    path = jlora.save_lora_weights(folder, adapters, weight_name=f"{step:06d}.safetensors",
                                   is_main_process=main_process)
    if not main_process:
        return None
    pics = pipe.generate([Request(args.validation_prompt, loras=(Lora(path),), seed=args.seed,
                                  steps=args.validation_steps, width=args.resolution, height=args.resolution)])
    out = os.path.join(folder, f"{step:06d}.png")
    images.write_png(out, common.to_uint8(pics)[0])
    return out


def param_shardings(params, mesh):
    """Each kernel's output axis split over `model` when it divides; everything else replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    size = mesh.shape["model"]

    def spec(x):
        if size == 1 or x.ndim < 2 or x.shape[-1] % size:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))

    return jax.tree.map(spec, params)


def put_global(tree, shardings):
    """Host values (the same on every process) as global arrays with `shardings` (works across hosts)."""
    import jax
    import numpy as np

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)


def make_mesh(args):
    """("data", "model") over every device; `--batch` must split over the data axis."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from jlora.errors import JloraError

    n = jax.device_count()
    if n % args.model_parallel:
        raise JloraError(f"--model-parallel {args.model_parallel} does not divide the {n} devices.")
    data = n // args.model_parallel
    if args.batch % data:
        if args.model_parallel == 1 and jax.process_count() == 1:  # a batch too small for every device: one device
            return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        raise JloraError(f"--batch {args.batch} does not split over the data axis of {data} devices "
                         f"({n} devices / --model-parallel {args.model_parallel}).")
    return Mesh(np.array(jax.devices()).reshape(data, args.model_parallel), ("data", "model"))


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlora
    from jlora import data, objectives, training
    from jlora.errors import JloraError
    from jlora.pipelines import load_pipeline

    if args.distributed:
        cluster = {k: v for k, v in (("coordinator_address", args.coordinator), ("num_processes", args.num_processes),
                                     ("process_id", args.process_id)) if v is not None}
        jax.distributed.initialize(**cluster)
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)
    try:
        pipe = load_pipeline(args.model, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None)
        if pipe.family == "flux":
            data.check_resolution(args.resolution, pipe.vae_scale * 2)
        else:
            data.check_resolution(args.resolution, pipe.vae_scale * 2 ** (len(pipe.unet.block_out_channels) - 1))
        examples = data.read_folder(args.data, instance_prompt=args.instance_prompt)
        if len(examples) < args.batch:
            raise JloraError(f"{args.data}: {len(examples)} examples, fewer than --batch {args.batch}.")
        if args.text_encoder_lr is not None and not args.train_text_encoder:
            raise JloraError("--text-encoder-lr needs --train-text-encoder.")
        mesh = make_mesh(args)
    except (JloraError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    images_fn, captions_fn = encoders(pipe)
    # every process encodes the same examples on its own devices (one cache file each when several share OUT)
    cache_name = "cache.safetensors" if jax.process_count() == 1 else f"cache.process{jax.process_index()}.safetensors"
    cache = data.cache_latents(examples, images_fn, captions_fn, os.path.join(args.out, cache_name),
                               resolution=args.resolution, seed=args.seed, key=f"{os.path.abspath(args.model)}|ids",
                               center_crop=args.center_crop, random_flip=args.random_flip,
                               flip_before_crop=pipe.family in ("sdxl", "flux"))
    order = lambda epoch: data.batches(len(examples), args.batch, seed=args.seed, epoch=epoch, drop_last=True)  # noqa: E731
    if pipe.family == "flux":
        scaling = float(pipe.vae_config.get("scaling_factor", 1.0))
        shift = float(pipe.vae_config.get("shift_factor") or 0.0)
        flow, alphas = pipe.scheduler_config, None
    else:
        scaling, shift, flow = pipe.vae_scaling_factor, 0.0, None
        alphas = objectives.alphas_cumprod(pipe.scheduler_config)

    def place(tree):
        return put_global(tree, param_shardings(tree, mesh))

    params = place(pipe.params[denoiser(pipe)])
    adapter = jlora.init_adapter(params, jax.random.key(args.seed), rank=args.rank, alpha=args.alpha,
                                 targets=args.targets or DEFAULT_TARGETS[pipe.family])
    if args.train_text_encoder:
        params, adapter = {denoiser(pipe): params}, {denoiser(pipe): adapter}
        for i, name in enumerate(text_encoders(pipe)):
            params[name] = place(pipe.params[name])
            adapter[name] = jlora.init_adapter(params[name], jax.random.fold_in(jax.random.key(args.seed), i + 1),
                                               rank=args.rank, alpha=args.alpha, targets=TEXT_ENCODER_TARGETS)
    adapter = jlora.shard_adapter(adapter, params)
    tx = optimizer(args)
    opt_state = training.init_opt_state(tx, adapter)
    ckpt = os.path.join(args.out, "checkpoints")
    start = 0
    if args.resume and training.latest_step(ckpt) is not None:
        state = training.restore_checkpoint(ckpt, {"adapter": adapter, "opt_state": opt_state})
        adapter, opt_state, start = state["adapter"], state["opt_state"], training.latest_step(ckpt)
        say(f"resumed from step {start}")
    step_fn = training.make_train_step(make_loss(pipe, args, alphas), tx,
                                       state_shardings=jax.tree.map(lambda x: x.sharding, (adapter, opt_state)))
    bar = None
    if not args.no_progress and main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=start, desc="training", unit="step")
    trained = "+".join([denoiser(pipe)] + (text_encoders(pipe) if args.train_text_encoder else []))
    say(f"{pipe.family} {trained} LoRA rank {args.rank} on {jlora.count(adapter)} kernels, {len(examples)} images, "
          f"batch {args.batch} over {mesh.shape['data']} device(s)"
        + (f", model axis {mesh.shape['model']}" if mesh.shape["model"] > 1 else "")
        + (f", {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    t0, losses = time.perf_counter(), []
    for step in range(start, args.steps):
        batch = data.shard_batch(step_batch(cache, order, step, args, scaling, pipe.family, shift, flow), mesh)
        adapter, opt_state, metrics = step_fn(adapter, opt_state, params, batch)
        losses.append(float(metrics["loss"]))
        done = step + 1
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", steps_per_s=f"{(done - start) / (time.perf_counter() - t0):.2f}")
        if done % args.save_every == 0 or done == args.steps:
            training.save_checkpoint(ckpt, done, {"adapter": adapter, "opt_state": opt_state}, max_to_keep=3)
        if args.validation_prompt and (done % args.validate_every == 0 or done == args.steps):
            validate(pipe, lora_files(pipe, adapter, args), args, done, os.path.join(args.out, "validation"),
                     main_process)
    if bar:
        bar.close()
    weight_name = "pytorch_lora_weights.safetensors" if args.format == "diffusers" else "lora_kohya.safetensors"
    path = jlora.save_lora_weights(args.out, lora_files(pipe, adapter, args), weight_name=weight_name,
                                   format=args.format, is_main_process=main_process)
    if losses:
        say(f"steps {start + 1}..{args.steps}: loss first {losses[0]:.4f}, last {losses[-1]:.4f}")
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
