"""Batch text-to-image with LoRAs: a diffusers checkpoint folder and a prompts file in, PNGs out.

    python scripts/generate.py --model path/to/stable-diffusion-xl-base-1.0 --prompts prompts.jsonl \\
        --out images/ --dtype bfloat16

`prompts.jsonl` holds one request per line, e.g.

    {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": 7, "steps": 30, "guidance": 5.0,
     "width": 1024, "height": 1024, "loras": [{"path": "style.safetensors", "weight": 0.8}], "lora_scale": 1.0}

Only `prompt` is required. Each line N gives `out/NNNNNN.png` and `out/NNNNNN.json`; `out/contact_sheet.png`
shows them all; a rerun skips images whose sidecar matches. Prompts with different LoRAs share a batch
(per-sample LoRAs, text encoders included). The devices form a mesh with a `data` axis (the batch) and
a `model` axis (`--fsdp`, weights split FSDP-style; by default all devices for Flux, 1 for SD/SDXL).
Exit status: 0 when every image was made or skipped, 1 when any request failed, 2 on a usage or model error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a diffusers pipeline folder (model_index.json), or a single "
                   "checkpoint file (original SD/SDXL layout, BFL Flux) with --config")
    p.add_argument("--config", default=None, help="with a single-file --model: a diffusers folder of the same model "
                   "(configs, tokenizers, and components the file lacks)")
    p.add_argument("--prompts", required=True, help="JSONL file, one request per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="params and compute dtype")
    p.add_argument("--batch", type=int, default=4, help="images per batch (default 4)")
    p.add_argument("--steps", type=int, default=None, help="steps for requests without 'steps' (SD 30, Flux 28)")
    p.add_argument("--guidance", type=float, default=None, help="guidance for requests without 'guidance'")
    p.add_argument("--fsdp", type=int, default=None, help="size of the mesh's model axis (divides the device count)")
    p.add_argument("--lora-mode", choices=("auto", "per_sample", "merged"), default="auto",
                   help="per-sample LoRAs, or LoRAs merged per batch (batches then group by LoRA set)")
    p.add_argument("--scheduler", default=None, help="SD/SDXL: DDIMScheduler or EulerDiscreteScheduler instead of the folder's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def make_mesh(fsdp: int | None, family: str):
    """A (data, model) mesh over all devices."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    n = len(devices)
    model = fsdp if fsdp is not None else (n if family == "flux" else 1)
    if model < 1 or n % model:
        raise ValueError(f"--fsdp {model} must divide the {n} devices.")
    return Mesh(np.array(devices).reshape(n // model, model), ("data", "model"))


def _bars(enabled: bool):
    if not enabled:
        return None, None
    from tqdm.auto import tqdm

    return (lambda n: tqdm(total=n, desc="batches", unit="batch"),
            lambda n: tqdm(total=n, desc="steps", unit="step", leave=False))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from converters.errors import ModelFileNotFoundError, UnsupportedModelError
    from jlora.errors import JloraError
    from jlora.models import bytes_per_device, fsdp
    from jlora.pipelines import batch, family_of, load_pipeline

    try:
        if os.path.isfile(args.model) and args.config is None:
            raise ModelFileNotFoundError(f"{args.model}: a single-file checkpoint has no configs or tokenizers; add "
                                         "--config <diffusers folder of the same model>.")
        family = family_of(args.config if os.path.isfile(args.model) else args.model)
        mesh = make_mesh(args.fsdp, family)
        shard = fsdp(mesh, "model")
        pipe = load_pipeline(args.model, config=args.config,
                             dtype=getattr(jnp, args.dtype) if args.dtype != "float32" else None,
                             shardings=lambda component: shard,
                             **({"scheduler": args.scheduler} if args.scheduler and family != "flux" else {}))
        pipe.data_sharding = NamedSharding(mesh, PartitionSpec("data"))
        items = batch.read_prompts(args.prompts)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ModelFileNotFoundError, UnsupportedModelError, JloraError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    per_device = bytes_per_device(pipe.params)
    most = max(per_device.values()) if per_device else 0
    print(f"{family} from {args.model}: mesh data={mesh.shape['data']} x model={mesh.shape['model']} "
          f"({len(per_device)} {next(iter(per_device)).platform} devices), parameters {most / 2**30:.2f} GiB "
          f"per device (largest), {sum(per_device.values()) / 2**30:.2f} GiB in all")
    print(f"{len(items)} requests in {args.prompts}")
    batch_bar, step_bar = _bars(not args.no_progress)
    summary = batch.run(pipe, items, args.out, model=os.path.abspath(args.model), batch=args.batch, steps=args.steps,
                        guidance=args.guidance, batch_bar=batch_bar, step_bar=step_bar, lora_mode=args.lora_mode)
    for message in summary.failed:
        print(f"failed: {message}", file=sys.stderr)
    print(f"{len(summary.made)} made, {len(summary.skipped)} skipped (already made), {len(summary.failed)} failed; "
          f"images in {args.out}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
