"""Sharded LoRA fine-tuning of a Flax SD UNet with optax, orbax checkpoints and a diffusers LoRA file.

    python scripts/finetune.py --steps 20 --out /tmp/ft                  # tiny UNet built from a config
    python scripts/finetune.py --steps 40 --out /tmp/ft --resume         # go on from the newest checkpoint
    python scripts/finetune.py --unet /path/to/sd15/unet --targets 'to_[qkv]|to_out_0' --rank 16 --model-parallel 2

Runs on every visible device: a mesh ("data", "model") with the batch split over `data` and, with
`--model-parallel N`, the UNet kernels and the LoRA factors next to them split over `model`.
The data is synthetic (random latents and text embeddings, DDPM noise-prediction loss) and is a
function of (seed, step), so a resumed run sees the batches an uninterrupted one would; replace
`synthetic_batch` with a real loader. Checkpoints (adapter, optax state, step) go to
`OUT/checkpoints` every `--save-every` steps; at the end OUT/pytorch_lora_weights.safetensors is
written in the diffusers format (`pipe.load_lora_weights(OUT)` reads it).

Multi-host: start one process per host with `--distributed` (on SLURM, Open MPI, Kubernetes and
Cloud TPU pod slices jax.distributed.initialize() finds the cluster itself; elsewhere add
`--coordinator host0:1234 --num-processes N --process-id I`); every process runs the same steps and
checkpoints together,
and only process 0 prints and writes the LoRA file.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jlora
from jlora import training
from jlora.models.random_init import random_params

TRAIN_TIMESTEPS = 1000
TEXT_LEN = 7


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (LoRA file, checkpoints/)")
    parser.add_argument("--unet", default=None, help="a diffusers Flax UNet folder; default: a tiny random UNet")
    parser.add_argument("--channels", default="32,64", help="block_out_channels of the tiny UNet (multiples of 32)")
    parser.add_argument("--sample-size", type=int, default=16, help="latent height and width")
    parser.add_argument("--steps", type=int, default=20, help="train up to this step")
    parser.add_argument("--batch", type=int, default=8, help="global batch (a multiple of the data axis)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--targets", default=r"to_[qkv]|to_out_0|proj_in|proj_out|ff/net|conv[12]",
                        help="regex on kernel paths to put LoRAs on")
    parser.add_argument("--model-parallel", type=int, default=1, help="size of the model axis")
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    parser.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0 (needed "
                        "outside SLURM, Open MPI, Kubernetes and Cloud TPU, which jax detects)")
    parser.add_argument("--num-processes", type=int, default=None, help="with --coordinator: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process's index")
    return parser.parse_args(argv)


def tiny_unet(args):
    """A small SD-style Flax UNet from `--channels` (multiples of 32: the UNet's GroupNorms have 32 groups)."""
    from diffusers import FlaxUNet2DConditionModel

    channels = tuple(int(c) for c in args.channels.split(","))
    n = len(channels)
    return FlaxUNet2DConditionModel(
        sample_size=args.sample_size, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * max(n - 1, 1) + ("DownBlock2D",) * (n > 1),
        up_block_types=("UpBlock2D",) * (n > 1) + ("CrossAttnUpBlock2D",) * max(n - 1, 1),
    )


def build_unet(args):
    """(module, params): a diffusers Flax UNet from `--unet`, or a tiny random one."""
    if args.unet:
        from diffusers import FlaxUNet2DConditionModel

        return FlaxUNet2DConditionModel.from_pretrained(args.unet, dtype=jnp.float32)
    module = tiny_unet(args)
    return module, random_params(jax.eval_shape(module.init_weights, jax.random.key(args.seed)), args.seed)


def param_shardings(params, mesh):
    """Each kernel's output axis split over `model` when it divides; everything else replicated."""
    size = mesh.shape["model"]

    def spec(x):
        if x.ndim < 2 or x.shape[-1] % size:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))

    return jax.tree.map(spec, params)


def synthetic_batch(args, step: int, config) -> dict:
    """Latents, text embeddings, noise and timesteps of one step: a function of (seed, step) only."""
    rng = np.random.default_rng([args.seed, step])
    shape = (args.batch, config.in_channels, args.sample_size, args.sample_size)
    return {
        "latents": rng.standard_normal(shape, np.float32),
        "noise": rng.standard_normal(shape, np.float32),
        "timesteps": rng.integers(0, TRAIN_TIMESTEPS, args.batch).astype(np.int32),
        "text": rng.standard_normal((args.batch, TEXT_LEN, config.cross_attention_dim), np.float32),
    }


def noise_prediction_loss(module):
    """DDPM training loss (linear betas 1e-4 .. 0.02): MSE between the predicted and the added noise."""
    betas = np.linspace(1e-4, 0.02, TRAIN_TIMESTEPS, dtype=np.float64)
    alphas_cumprod = jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)

    def loss_fn(params, batch):
        a = alphas_cumprod[batch["timesteps"]][:, None, None, None]
        noisy = jnp.sqrt(a) * batch["latents"] + jnp.sqrt(1.0 - a) * batch["noise"]
        pred = module.apply({"params": params}, noisy, batch["timesteps"], batch["text"], train=False).sample
        return jnp.mean((pred - batch["noise"]) ** 2)

    return loss_fn


def put_global(batch: dict, sharding) -> dict:
    """A host batch (the same on every process) as global arrays split over the data axis."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in batch.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.distributed:
        cluster = {k: v for k, v in (("coordinator_address", args.coordinator), ("num_processes", args.num_processes),
                                     ("process_id", args.process_id)) if v is not None}
        jax.distributed.initialize(**cluster)
    main_process = jax.process_index() == 0
    say = print if main_process else (lambda *a, **k: None)

    n = jax.device_count()
    if n % args.model_parallel or (args.batch % (n // args.model_parallel)):
        raise SystemExit(f"{n} devices: --model-parallel must divide them and --batch must divide by the data axis")
    mesh = jax.make_mesh((n // args.model_parallel, args.model_parallel), ("data", "model"), (AxisType.Auto,) * 2)
    module, params = build_unet(args)
    params = jax.device_put(params, param_shardings(params, mesh))

    key = jax.random.key(args.seed + 1)
    adapter = jlora.init_adapter(params, key, rank=args.rank, alpha=args.alpha, targets=args.targets)
    adapter = jlora.shard_adapter(adapter, params)
    tx = training.optimizer(optax.adamw(args.lr, weight_decay=args.weight_decay))
    opt_state = training.init_opt_state(tx, adapter)
    state = {"adapter": adapter, "opt_state": opt_state, "step": 0}
    step_fn = training.make_train_step(
        noise_prediction_loss(module), tx, state_shardings=jax.tree.map(lambda x: x.sharding, (adapter, opt_state))
    )

    ckpt_dir = os.path.join(args.out, "checkpoints")
    newest = training.latest_step(ckpt_dir)
    if newest is not None and not args.resume:
        raise SystemExit(f"{ckpt_dir} holds step {newest}: pass --resume to go on from it, or another --out")
    if newest is not None:
        state = training.restore_checkpoint(ckpt_dir, state)
        say(f"resumed from step {state['step']} ({ckpt_dir})")
    factors = sum(l.a.size + l.b.size for l in jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf) if l is not None)
    say(f"{n} {jax.devices()[0].platform} devices, mesh {dict(mesh.shape)}, {jlora.count(adapter)} LoRA targets, "
        f"{factors} trainable values")

    data_sharding = NamedSharding(mesh, P("data"))
    adapter, opt_state, start = state["adapter"], state["opt_state"], int(state["step"])
    say(f"{'step':>6} {'loss':>10} {'ms/step':>9}   (the first row includes compilation)")
    window, t0 = [], time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        batch = put_global(synthetic_batch(args, step, module.config), data_sharding)
        adapter, opt_state, metrics = step_fn(adapter, opt_state, params, batch)
        window.append(metrics["loss"])
        if step % args.log_every == 0 or step == args.steps:
            losses = [float(x) for x in window]  # waits for the steps of this window
            ms = 1e3 * (time.perf_counter() - t0) / len(losses)
            say(f"{step:>6} {np.mean(losses):>10.5f} {ms:>9.1f}")
            window, t0 = [], time.perf_counter()
        if step % args.save_every == 0 or step == args.steps:
            saving = time.perf_counter()
            training.save_checkpoint(ckpt_dir, step, {"adapter": adapter, "opt_state": opt_state, "step": step},
                                     max_to_keep=args.keep)
            t0 += time.perf_counter() - saving  # step times leave the checkpoint writes out

    # every process calls it: factors sharded over hosts are gathered; only the main process writes
    path = jlora.save_lora_weights(args.out, {"unet": adapter}, is_main_process=main_process)
    say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
