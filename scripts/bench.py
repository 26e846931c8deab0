"""jlora vs diffusers + PEFT on the same SD-shaped UNet and LoRA file, and LoRA vs base.

Every figure is a ratio measured in this one run, on this machine:

    python scripts/bench.py                 # SD-1.5-shaped UNet at reduced width (default)
    python scripts/bench.py --size tiny     # the test-suite UNet, seconds
    python scripts/bench.py --size medium   # SD-1.5 at half width, 48x48 latents (SD-1.5's 768-d context)
    python scripts/bench.py --size sd15     # full SD-1.5 width (needs ~16 GB RAM, minutes on CPU)
    python scripts/bench.py --kohya-sdxl    # loading a real-size SDXL kohya file (~190 MB fp16, ~10 GB RAM)
    python scripts/bench.py --serving       # hotswap into a warm jitted step; K LoRAs per sample in one call
    python scripts/bench.py --generate      # images/s, N prompts over K LoRAs: per-sample vs grouped vs diffusers
    python scripts/bench.py --keys          # load time vs number of modules / unplaceable keys (linear?)
    python scripts/bench.py --train         # LoRA training steps/s and peak memory: jlora vs diffusers + PEFT

Rows: file -> adapters (jlora) vs diffusers' lora_state_dict + load_lora_into_unet, and vs a raw
safetensors read; the jitted step with the LoRA applied vs the base step (and vs the fused
params); fusing (jlora.fuse, jitted) vs diffusers' fuse_lora; the torch step with LoRA vs without.
--serving: swapping a new LoRA into a warm jitted step (jlora.pad_adapter) vs the first call and vs
diffusers' load_lora_adapter(hotswap=True); K LoRAs per sample in one call (jlora.per_sample) vs K
merged calls and vs the base step.
--generate: text-to-image on a tiny saved SD pipeline (tests/pipelines_ref.py), N prompts spread over K
LoRA files: jlora with per-sample LoRAs in mixed batches, jlora with batches grouped by LoRA (merged,
one compiled step reused across LoRAs), and diffusers' torch pipeline grouped by LoRA (`set_adapters`).
--train: LoRA fine-tuning steps with the epsilon-prediction MSE of diffusers' `train_text_to_image_lora.py`
(DDPM `add_noise`, AdamW on the LoRA factors) on the same UNet, LoRA file, batch and latent size: jlora
(`objectives.diffusion_loss`, `training.make_train_step`) vs diffusers + PEFT in torch (autograd,
`torch.optim.AdamW`). Each side runs in a fresh subprocess, so its peak memory is its own: device peak on
GPUs (jax `memory_stats`, `torch.cuda.max_memory_allocated`), resident-set growth over the loaded model on CPU.
Both run diffusers' UNet as configured by default: the Flax one materializes the attention softmax, the torch
one uses `scaled_dot_product_attention`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402
import torch  # noqa: E402

import jlora  # noqa: E402
import reference as R  # noqa: E402

SIZES = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=(2, 4), sample_size=16),
    "small": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256, attention_head_dim=8, sample_size=32),
    "medium": dict(block_out_channels=(160, 320, 640, 640), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, sample_size=48),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, sample_size=64),
}


def _config(size: str) -> dict:
    n = len(SIZES[size]["block_out_channels"])
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return dict(in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0, down_block_types=down, up_block_types=up, **SIZES[size])


def _time(fn, repeat: int) -> float:
    """Median wall time of `fn()` in ms (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = ["wall"]  # --clock: the interleaved step rows measure wall time or this process's CPU time


def _time_interleaved(fns: dict, repeat: int) -> dict:
    """`{name: ms}`: the fastest of `repeat` rounds, each round calling every `fn` once in turn (after one
    warm-up call each), so load from other processes on a shared machine falls on all of them alike.
    With `--clock cpu` the figure is the CPU time of this process (all its threads), which other
    processes on a shared machine barely change."""
    clock = CLOCKS[CLOCK[0]]
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: min(ts) * 1e3 for name, ts in times.items()}


def _print(title: str, rows, head: tuple[str, str] = ("A ms", "B ms")) -> None:
    """A table of (name, A, B, note) rows with A/B; a figure that is None prints as n/a."""
    print(title + "\n")
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {head[0]:>9}  {head[1]:>9}  {'A/B':>6}  note")
    for name, x, y, note in rows:
        xs, ys = (f"{v:9.2f}" if v is not None else f"{'n/a':>9}" for v in (x, y))
        ratio = f"{x / y:6.2f}" if x is not None and y else f"{'n/a':>6}"
        print(f"{name:<{w}}  {xs}  {ys}  {ratio}  {note}")


def write_sdxl_kohya(path: str, rank: int = 32, seed: int = 0) -> int:
    """A kohya LoRA on every Linear and 1x1-conv kernel of the SDXL UNet and CLIP-L (fp16); returns modules."""
    from converters.architectures import family_indexes
    from converters.naming import get_scheme
    from converters.safetensors_io import save_file

    rng = np.random.default_rng(seed)
    out, n = {}, 0
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_")):
        scheme = get_scheme("diffusers_flax" if component == "unet" else "torch_mirror")
        for p, (shape, _) in family_indexes("sdxl")[component].items():
            if p[-1] != "kernel" or (len(shape) == 4 and shape[0] != 1):
                continue
            n_in, n_out = shape[-2], shape[-1]
            name = prefix + scheme.to_module(p[:-1]).replace(".", "_")
            k = (1, 1) if len(shape) == 4 else ()
            out[f"{name}.lora_down.weight"] = (rng.standard_normal((rank, n_in) + k) * 0.01).astype(np.float16)
            out[f"{name}.lora_up.weight"] = (rng.standard_normal((n_out, rank) + k) * 0.01).astype(np.float16)
            out[f"{name}.alpha"] = np.array(rank / 2, np.float16)
            n += 1
    save_file(out, path)
    return n


def _read_and_transfer(path: str) -> list:
    """The least a loader returning device arrays does: read the file, move each LoRA factor in Flax layout."""
    from converters.safetensors_io import load_file

    tensors, _ = load_file(path)
    flax = [t.transpose(2, 3, 1, 0) if t.ndim == 4 else t.T for t in tensors.values() if t.ndim >= 2]
    return jax.device_put(flax)


def bench_kohya_sdxl(repeat: int) -> None:
    """file -> adapters for a real-size SDXL kohya file: jlora vs diffusers vs a raw read."""
    import safetensors.flax
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as M
    from transformers import CLIPTextConfig, CLIPTextModel

    from converters import plans
    from converters.architectures import SDXL_UNET, family_indexes

    tmp = tempfile.mkdtemp(prefix="jlora-bench-")
    path = os.path.join(tmp, "sdxl_kohya.safetensors")
    n_modules = write_sdxl_kohya(path)
    indexes = family_indexes("sdxl")
    params = {c: jlora.abstract_params(indexes[c]) for c in ("unet", "text_encoder")}
    def load(cold: bool):
        if cold:  # a file of a structure not seen before: the rule tables run
            plans.clear()
        return jax.block_until_ready(jlora.load_lora_weights(path, params, family="sdxl"))

    times = _time_interleaved({  # fastest of interleaved rounds: the allocator's state falls on all alike
        "jlora": lambda: load(False),
        "cold": lambda: load(True),
        "numpy": lambda: safetensors.numpy.load_file(path),
        "flax": lambda: jax.block_until_ready(safetensors.flax.load_file(path)),
        "floor": lambda: jax.block_until_ready(_read_and_transfer(path))}, repeat)
    jl, cold, raw_np, raw_jax, floor = (times[k] for k in ("jlora", "cold", "numpy", "flax", "floor"))

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET, attention_head_dim=(5, 10, 20))
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
    unet, te = unet.to_empty(device="cpu").half(), te.to_empty(device="cpu").half()
    times = []
    for i in range(max(2, repeat // 2)):
        t = time.perf_counter()
        state_dict, alphas = M.lora_state_dict(tmp, weight_name="sdxl_kohya.safetensors")
        M.load_lora_into_unet(state_dict, alphas, unet, adapter_name=f"a{i}")
        M.load_lora_into_text_encoder(state_dict, alphas, te, prefix="text_encoder", adapter_name=f"a{i}")
        times.append(time.perf_counter() - t)
    dl = statistics.median(times) * 1e3
    _print(
        f"\nSDXL kohya file: {n_modules} modules, rank 32, {os.path.getsize(path) / 1e6:.0f} MB fp16 "
        f"(SDXL UNet + CLIP-L shapes); jax {jax.__version__}, torch {torch.__version__}",
        [
            ("file -> adapters: jlora / diffusers load_lora_into_*", jl, dl, "target <= 0.1"),
            ("file -> adapters: jlora / safetensors.numpy read", jl, raw_np, "target <= 2; structure seen"),
            ("file -> adapters: jlora, new structure / numpy read", cold, raw_np, "conversion plans cleared"),
            ("file -> adapters: jlora / safetensors.flax read", jl, raw_jax, "both end in device arrays"),
            ("file -> adapters: jlora / read + device_put floor", jl, floor, "conversion overhead"),
            ("read + device_put floor / safetensors.numpy read", floor, raw_np, "no conversion at all"),
        ],
    )


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # the modules diffusers' SDXL LoRA scripts train


def write_sdxl_peft(directory: str, rank: int, seed: int = 0) -> str:
    """A diffusers (PEFT) LoRA of rank `rank` on every attention projection of the SDXL UNet (fp16, no
    header: alpha = rank), as `<directory>/pytorch_lora_weights.safetensors`; returns the path."""
    from converters.architectures import family_indexes
    from converters.naming import get_scheme
    from converters.safetensors_io import save_file

    rng, out, scheme = np.random.default_rng(seed), {}, get_scheme("diffusers_flax")
    for p, (shape, _) in family_indexes("sdxl")["unet"].items():
        module = scheme.to_module(p[:-1]) if p[-1] == "kernel" and len(shape) == 2 else ""
        if module.endswith(tuple("." + m for m in ATTENTION)):
            out[f"unet.{module}.lora_A.weight"] = (rng.standard_normal((rank, shape[0])) * 0.01).astype(np.float16)
            out[f"unet.{module}.lora_B.weight"] = (rng.standard_normal((shape[1], rank)) * 0.01).astype(np.float16)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, R.LORA_WEIGHT_NAME)
    save_file(out, path)
    return path


def bench_hotswap_sdxl(repeat: int, rank: int = 64) -> None:
    """Hotswap at SDXL size: file -> padded adapter written into the previous adapter's buffers (`hotswap_lora`,
    and `load_lora` + `pad_adapter(donate=True)`),
    vs diffusers' `load_lora_adapter(hotswap=True)` on the fp16 UNet, vs a raw read of the same file."""
    from diffusers import UNet2DConditionModel

    from converters import plans
    from converters.architectures import SDXL_UNET, family_indexes
    from jlora import hotswap_template, pad_adapter

    tmp = tempfile.mkdtemp(prefix="jlora-bench-hotswap-")
    paths = [write_sdxl_peft(os.path.join(tmp, str(i)), r, seed=i) for i, r in enumerate((rank, rank // 2))]
    params = jlora.abstract_params(family_indexes("sdxl")["unet"])
    first = jlora.load_lora(paths[0], params, "unet")
    modules = sum(leaf is not None for leaf in jax.tree.leaves(first, is_leaf=jlora.is_adapter_leaf))
    current = [hotswap_template(params, rank, targets=[first], dtype=jax.numpy.float16)]
    del first

    def swap(i, cold=False):
        if cold:  # a file of a structure not seen before: the rule tables run
            plans.clear()
        current[0] = jlora.hotswap_lora(paths[i], params, current[0], "unet")
        return jax.block_until_ready(current[0])

    def load_and_pad(i):
        current[0] = pad_adapter(jlora.load_lora(paths[i], params, "unet"), current[0], donate=True)
        return jax.block_until_ready(current[0])

    for i in (0, 1, 0, 1):  # compiles the padding once per rank layout
        swap(i), load_and_pad(i)
    # each round swaps the rank-64 file in, then the rank-32 one: every swap replaces the other file's LoRA
    times = _time_interleaved({"swap": lambda: swap(0), "swap_half": lambda: swap(1), "swap_cold": lambda: swap(0, True),
                               "pad": lambda: load_and_pad(0), "pad_half": lambda: load_and_pad(1),
                               "load": lambda: jax.block_until_ready(jlora.load_lora(paths[0], params, "unet")),
                               "raw": lambda: safetensors.numpy.load_file(paths[0])}, repeat)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET, attention_head_dim=(5, 10, 20))
    unet = unet.to_empty(device="cpu").half()
    unet.enable_lora_hotswap(target_rank=rank)
    unet.load_lora_adapter(os.path.dirname(paths[1]), weight_name=R.LORA_WEIGHT_NAME, prefix="unet", adapter_name="default")

    def diffusers_swap(i):
        unet.load_lora_adapter(os.path.dirname(paths[i]), weight_name=R.LORA_WEIGHT_NAME, prefix="unet",
                               adapter_name="default", hotswap=True)

    dl = _time_interleaved({"full": lambda: diffusers_swap(0), "half": lambda: diffusers_swap(1)}, repeat)
    _print(
        f"\nHotswap on the SDXL UNet: rank {rank} / {rank // 2} LoRAs on {modules} attention projections, "
        f"{os.path.getsize(paths[0]) / 1e6:.0f} / {os.path.getsize(paths[1]) / 1e6:.0f} MB fp16 files; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}",
        [
            (f"hotswap SDXL rank {rank}: jlora hotswap_lora / diffusers hotswap", times["swap"], dl["full"], "target <= 0.5; same file"),
            (f"hotswap SDXL rank {rank}: jlora hotswap_lora / safetensors.numpy read", times["swap"], times["raw"], "target <= 2"),
            (f"hotswap SDXL rank {rank}: jlora, new structure / diffusers hotswap", times["swap_cold"], dl["full"], "conversion plans cleared"),
            (f"hotswap SDXL rank {rank}: jlora load_lora + pad(donate) / hotswap_lora", times["pad"], times["swap"], "two steps vs one"),
            (f"hotswap SDXL rank {rank // 2}: jlora hotswap_lora / diffusers hotswap", times["swap_half"], dl["half"], "into the rank-64 template"),
            (f"hotswap SDXL rank {rank // 2}: jlora load_lora + pad(donate) / hotswap_lora", times["pad_half"], times["swap_half"], ""),
            (f"hotswap SDXL rank {rank}: jlora load alone / safetensors.numpy read", times["load"], times["raw"], "the file -> adapter part"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="step rows: wall time, or this process's CPU time (for a shared, busy machine)")
    parser.add_argument("--fuse-only", action="store_true", help="only the fuse vs read+write pass row")
    parser.add_argument("--step-only", action="store_true", help="only the jitted-step rows (LoRA strategies vs base)")
    parser.add_argument("--kohya-sdxl", action="store_true", help="only the real-size SDXL kohya loading benchmark")
    parser.add_argument("--serving", action="store_true", help="only the serving benchmark (hotswap, per-sample LoRAs)")
    parser.add_argument("--hotswap-sdxl", action="store_true", help="only the SDXL-size hotswap benchmark (rank 64)")
    parser.add_argument("--loras", type=int, default=4, help="--serving/--generate: number of LoRAs K")
    parser.add_argument("--generate", action="store_true", help="only the image-generation benchmark")
    parser.add_argument("--keys", action="store_true", help="only the key-count scaling benchmark")
    parser.add_argument("--train", action="store_true", help="only the LoRA training benchmark (jlora vs diffusers+PEFT)")
    parser.add_argument("--no-base", action="store_true", help="--train: skip the base-weights forward+backward rows")
    parser.add_argument("--train-side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--step-side", choices=STEP_VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=int, default=16, help="--generate: number of prompts N")
    parser.add_argument("--batch", type=int, help="--generate: batch size (default 8); --train: batch (default 4)")
    parser.add_argument("--steps", type=int,
                        help="--generate: denoising steps (default 10); --train: optimizer steps per timing (default 5)")
    parser.add_argument("--resolution", type=int, default=64, help="--generate: image height and width")
    args = parser.parse_args()
    CLOCK[0] = args.clock
    torch.set_grad_enabled(False)
    if args.train_side:
        side = _train_side_jax if args.train_side == "jax" else _train_side_torch
        result = side(args.size, args.rank, args.batch or 4, args.steps or 5, args.repeat, not args.no_base)
        print(_RESULT + json.dumps(result), flush=True)
        return
    if args.step_side:
        print(_RESULT + json.dumps(_step_side(args.size, args.rank, args.step_side, args.repeat)), flush=True)
        return
    if args.train:
        bench_train(args.size, args.rank, args.batch or 4, args.steps or 5, args.repeat, not args.no_base)
        return
    if args.keys:
        bench_keys(args.repeat)
        return
    if args.generate:
        bench_generate(args.prompts, args.loras, args.batch or 8, args.steps or 10, args.resolution, max(1, args.repeat // 3))
        return
    if args.kohya_sdxl:
        bench_kohya_sdxl(args.repeat)
        return
    if args.hotswap_sdxl:
        bench_hotswap_sdxl(args.repeat)
        return
    if args.serving:
        bench_serving(args.size, args.rank, args.repeat, args.loras)
        return

    rows: list[tuple[str, float, float, str]] = []
    if args.step_only:  # the step sides run first, so this process holds no model while they run
        rows, _ = _step_rows(args.size, args.rank, args.repeat)
    ref = R._unet_ref(f"bench_{args.size}", _config(args.size), 0, lambda rng: {})
    tmp = tempfile.mkdtemp(prefix="jlora-bench-")
    path = R.make_peft_lora_file(tmp, [ref], rank=args.rank, alpha=args.rank * 2, pipeline="sd")
    n_modules = len({k.rsplit(".lora_", 1)[0] for k in safetensors.numpy.load_file(path)})
    if args.step_only:
        _print_unet(args, ref, path, n_modules, rows)
        return
    if args.fuse_only:
        rows += _fuse_rows(ref, jlora.load_lora(path, ref.flax_params, "unet"), args.repeat)[:1]
        _print_unet(args, ref, path, n_modules, rows)
        return
    rows += _load_rows(ref, path, args.repeat)
    step_rows, a = _step_rows(args.size, args.rank, args.repeat)
    rows += step_rows
    adapter = jlora.load_lora(path, ref.flax_params, "unet")

    # 3. Fusing.
    rows += _fuse_rows(ref, adapter, args.repeat)
    model = R.torch_model_with_lora(ref, path)

    def diffusers_fuse():
        model.fuse_lora(lora_scale=0.8)
        model.unfuse_lora()

    df = _time(diffusers_fuse, args.repeat)
    jf = rows[-2][1]
    rows.append(("fuse (jlora, jitted / diffusers fuse+unfuse)", jf, df, "diffusers figure includes unfuse"))

    # 4. Torch reference steps, for context.
    tb = _time(lambda: R.torch_forward(ref.torch_model, ref), args.repeat)
    tl = _time(lambda: R.torch_forward(model, ref, scale=0.8), args.repeat)
    rows.append(("torch step: diffusers+PEFT LoRA / base", tl, tb, "PEFT's unfused overhead"))
    rows.append(("step: jlora LoRA, strategy auto (jax) / diffusers LoRA (torch)", a, tl, "same CPU, different frameworks"))

    _print_unet(args, ref, path, n_modules, rows)


def _print_unet(args, ref, path, n_modules, rows) -> None:
    n_params = sum(x.size for x in jax.tree.leaves(ref.flax_params))
    _print(
        f"\nUNet {args.size}: {n_params / 1e6:.1f} M params, LoRA rank {args.rank} on {n_modules} modules, "
        f"file {os.path.getsize(path) / 1e6:.1f} MB; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}",
        rows,
    )


def _load_rows(ref, path, repeat: int) -> list:
    """Rows: file -> adapter, jlora vs diffusers and vs a raw safetensors read."""
    jl = _time(lambda: jax.block_until_ready(jlora.load_lora(path, ref.flax_params, "unet")), repeat)
    raw = _time(lambda: safetensors.numpy.load_file(path), repeat)

    def diffusers_load():
        model = copy.deepcopy(ref.torch_model)
        t = time.perf_counter()
        _diffusers_load(model, path)
        return time.perf_counter() - t

    dl = statistics.median(diffusers_load() for _ in range(max(2, repeat // 2))) * 1e3
    return [("load file -> adapter (jlora / diffusers)", jl, dl, "lower is better"),
            ("load file -> adapter (jlora / raw safetensors read)", jl, raw, "")]


def _fuse_rows(ref, adapter, repeat: int) -> list:
    """Rows: jlora.fuse vs one read + write pass (`x + 1`, jitted) over the same adapted weights."""
    leaves, treedef = jax.tree_util.tree_flatten(adapter, is_leaf=lambda x: x is None or jlora.is_adapter_leaf(x))
    weights = [w for w, leaf in zip(treedef.flatten_up_to(ref.flax_params), leaves) if leaf is not None]
    weights = jax.device_put(weights)
    params = jax.device_put(ref.flax_params)
    plus_one = jax.jit(lambda ws: [w + 1 for w in ws])
    times = _time_interleaved({"fuse": lambda: jax.block_until_ready(jlora.fuse(params, adapter, 0.8)),
                               "pass": lambda: jax.block_until_ready(plus_one(weights))}, repeat)
    mb = sum(w.nbytes for w in weights) / 1e6
    return [("fuse (jlora) / x + 1 over the adapted weights", times["fuse"], times["pass"],
             f"target <= 1.5; {len(weights)} weights, {mb:.0f} MB, {CLOCK[0]} clock"),
            ("fuse (jlora) ms, for the row below", times["fuse"], None, "")]


STEP_VARIANTS = ("merge", "unmerged", "auto", "fused")


def _step_inputs(ref) -> dict:
    """The UNet inputs with a 77-token text context (the CFG batch of 2 of `ref.inputs`)."""
    context = ref.inputs["encoder_hidden_states"]
    text = np.random.default_rng(2).standard_normal((context.shape[0], TEXT_TOKENS, context.shape[-1]))
    return dict(ref.inputs, encoder_hidden_states=text.astype(np.float32))


def _step_side(size: str, rank: int, variant: str, repeat: int) -> dict:
    """One step variant beside the base step, interleaved in this process: the LoRA per call with
    `strategy=variant`, or (`"fused"`) the base step on fused params."""
    ref = R._unet_ref(f"bench_{size}", _config(size), 0, lambda rng: {})
    path = R.make_peft_lora_file(tempfile.mkdtemp(prefix="jlora-bench-step-"), [ref], rank=rank, alpha=rank * 2,
                                 pipeline="sd")
    adapter = jlora.load_lora(path, ref.flax_params, "unet")
    ref.torch_model = None  # only the jax side runs here: free the torch weights before compiling
    fn, inputs = R.flax_apply_fn(ref), _step_inputs(ref)
    params = jax.device_put(ref.flax_params)
    base_step = jax.jit(lambda p, inp: fn(p, **inp))
    runs = {"base": lambda: jax.block_until_ready(base_step(params, inputs))}
    out = {"modules": sum(leaf is not None for leaf in jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf))}
    if variant == "fused":
        fused = jax.jit(jlora.fuse)(params, adapter, 0.8)
        runs[variant] = lambda: jax.block_until_ready(base_step(fused, inputs))
    else:
        step = jax.jit(lambda p, a, s, inp: jlora.apply(p, a, s, strategy=variant, apply_fn=fn)(**inp))
        runs[variant] = lambda: jax.block_until_ready(step(params, adapter, 0.8, inputs))
        plan = jlora.strategy_plan(fn, params, adapter, **inputs, strategy=variant)
        out["unmerged"] = sum(d.strategy == "unmerged" for d in plan.values())
    times = _time_interleaved(runs, repeat)
    return dict(out, base_ms=times["base"], ms=times[variant], platform=jax.devices()[0].platform)


def _run_side(flag: str, value: str, size: str, rank: int, repeat: int, extra: tuple = (), env=None) -> dict:
    """`bench.py --<flag> <value>` in a fresh interpreter; its result line as a dict (stderr passes through)."""
    cmd = [sys.executable, os.path.abspath(__file__), f"--{flag}", value, "--size", size, "--rank", str(rank),
           "--repeat", str(repeat), "--clock", CLOCK[0], *extra]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    raise RuntimeError(f"--{flag} {value} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")


def _step_rows(size: str, rank: int, repeat: int):
    """Rows: the jitted step with the LoRA per call (merge / unmerged / auto strategy) and on fused params,
    each against the base step measured interleaved with it in its own process (one variant per process:
    at SD-1.5 size all of them compiled in one process exceed 24 GB of host memory).
    Returns the rows and the auto-strategy step time."""
    res = {v: _run_side("step-side", v, size, rank, repeat) for v in STEP_VARIANTS}
    notes = {"merge": "strategy='merge' (the default)", "unmerged": "strategy='unmerged'",
             "auto": "target <= 1.05; {unmerged} unmerged, {merged} merged", "fused": "fused params"}
    names = {"merge": "LoRA merged per call", "unmerged": "LoRA unmerged beside layers",
             "auto": "LoRA strategy='auto'", "fused": "fused params"}
    rows = []
    for v in STEP_VARIANTS:
        r = res[v]
        note = notes[v].format(unmerged=r.get("unmerged"), merged=r["modules"] - (r.get("unmerged") or 0))
        rows.append((f"jitted step: {names[v]} / base", r["ms"], r["base_ms"], note))
    rows[-1] = rows[-1][:3] + (rows[-1][3] + f"; each row: own process, best of {repeat} interleaved rounds "
                               f"with its base, {CLOCK[0]} clock",)
    return rows, res["auto"]["ms"]


def _serving_files(ref, rank: int, k: int) -> list:
    """K PEFT LoRA files on every target module; ranks alternate rank, rank/2 (so padding matters)."""
    tmp = tempfile.mkdtemp(prefix="jlora-bench-serving-")
    return [
        R.make_peft_lora_file(os.path.join(tmp, str(i)), [ref], rank=max(1, rank >> (i % 2)), alpha=rank, seed=i, pipeline="sd")
        for i in range(k)
    ]


def _tile_batch(inputs: dict, times: int) -> dict:
    return {name: np.concatenate([x] * times) for name, x in inputs.items()}


def _bench_hotswap(ref, paths, rank, repeat) -> list:
    """Rows: swap a new LoRA into a warm jitted step vs the first call, and vs diffusers' hotswap."""
    from jlora import hotswap_template, pad_adapter

    params, fn, inputs = ref.flax_params, R.flax_apply_fn(ref), ref.inputs
    step = jax.jit(lambda p, a, s, inp: fn(jlora.apply(p, a, s), **inp))
    t = time.perf_counter()
    template = hotswap_template(params, rank, targets=[jlora.load_lora(paths[0], params, "unet")])
    jax.block_until_ready(step(params, pad_adapter(jlora.load_lora(paths[0], params, "unet"), template), 0.8, inputs))
    first = (time.perf_counter() - t) * 1e3
    turn = iter(range(10**9))

    def load_pad():
        return pad_adapter(jlora.load_lora(paths[next(turn) % len(paths)], params, "unet"), template)

    swap = _time(lambda: jax.block_until_ready(step(params, load_pad(), 0.8, inputs)), repeat)
    jl = _time(lambda: jax.block_until_ready(load_pad()), repeat)
    current = [jax.tree.map(jax.numpy.copy, template)]

    def load_pad_donate():  # padded on the device into the previous adapter's buffers
        current[0] = pad_adapter(jlora.load_lora(paths[next(turn) % len(paths)], params, "unet"), current[0], donate=True)
        return current[0]

    jd = _time(lambda: jax.block_until_ready(load_pad_donate()), repeat)

    def swap_in_place():  # the file straight into the previous adapter's buffers
        current[0] = jlora.hotswap_lora(paths[next(turn) % len(paths)], params, current[0], "unet")
        return current[0]

    for _ in paths:  # one compilation per rank layout
        swap_in_place()
    jh = _time(lambda: jax.block_until_ready(swap_in_place()), repeat)
    raw = _time(lambda: safetensors.numpy.load_file(paths[0]), repeat)
    warm = _time(lambda: jax.block_until_ready(step(params, template, 0.8, inputs)), repeat)
    compiles = step._cache_size()

    model = copy.deepcopy(ref.torch_model)
    model.enable_lora_hotswap(target_rank=rank)
    name = R.LORA_WEIGHT_NAME
    model.load_lora_adapter(os.path.dirname(paths[0]), weight_name=name, prefix="unet", adapter_name="default")

    def diffusers_swap():
        path = paths[next(turn) % len(paths)]
        model.load_lora_adapter(os.path.dirname(path), weight_name=name, prefix="unet", adapter_name="default", hotswap=True)

    dl = _time(diffusers_swap, repeat)
    dstep = _time(lambda: R.torch_forward(model, ref, scale=0.8), repeat)
    return [
        ("hotswap: load+pad+step (warm) / first call (load+pad+compile+step)", swap, first, f"{compiles} compilation(s) for {len(paths)} LoRAs"),
        ("hotswap: load+pad+step / warm step alone", swap, warm, "what a swap adds to a step"),
        ("hotswap: jlora load+pad / diffusers load_lora_adapter(hotswap=True)", jl, dl, "file -> ready adapter"),
        ("hotswap: jlora load+pad(donate) / diffusers hotswap", jd, dl, "target <= 0.5; into the previous buffers"),
        ("hotswap: jlora load+pad(donate) / safetensors.numpy read", jd, raw, "target <= 2"),
        ("hotswap: jlora hotswap_lora / diffusers hotswap", jh, dl, "target <= 0.5; file -> previous buffers"),
        ("hotswap: jlora hotswap_lora / safetensors.numpy read", jh, raw, "target <= 2"),
        ("hotswap + step: jlora / diffusers hotswap + torch step", swap, dl + dstep, "same CPU, different frameworks"),
    ]


def _bench_per_sample(ref, paths, repeat) -> list:
    """Rows: K LoRAs per sample in one call vs K merged calls, and the unmerged step vs the base step."""
    import jax.numpy as jnp

    from jlora import hotswap_template, pad_adapter, per_sample_apply, stack_adapters

    params, fn, k = ref.flax_params, R.flax_apply_fn(ref), len(paths)
    adapters = [jlora.load_lora(p, params, "unet") for p in paths]
    template = hotswap_template(params, max(_max_rank(a) for a in adapters), targets=adapters)
    padded = [pad_adapter(a, template) for a in adapters]
    stacked = stack_adapters(adapters, template)
    group = ref.inputs  # the samples of one LoRA
    batch = _tile_batch(group, k)  # K groups: sample i uses LoRA i // len(group)
    ids = jnp.repeat(jnp.arange(k), len(next(iter(group.values()))))
    scales = jnp.full(ids.shape, 0.8, jnp.float32)
    merged = jax.jit(lambda p, a, s, inp: fn(jlora.apply(p, a, s), **inp))
    base = jax.jit(lambda p, inp: fn(p, **inp))
    rows, times = [], {}
    for method in ("concat", "gather"):
        step = jax.jit(per_sample_apply(lambda p, inp: fn(p, **inp), method=method))
        times[method] = _time(lambda: jax.block_until_ready(step(stacked, ids, scales, params, batch)), repeat)
    separate = _time(lambda: jax.block_until_ready([merged(params, a, 0.8, group) for a in padded]), repeat)
    one_lora = _time(lambda: jax.block_until_ready(merged(params, padded[0], 0.8, batch)), repeat)
    plain = _time(lambda: jax.block_until_ready(base(params, batch)), repeat)
    n = len(ids)
    rows.append((f"per-sample: {k} LoRAs in one call (concat) / {k} merged calls", times["concat"], separate, f"batch {n} vs {k} x {n // k}"))
    rows.append(("per-sample: gather / concat", times["gather"], times["concat"], f"K*R = {k * _max_rank(template)}"))
    rows.append(("per-sample step (unmerged, concat) / base step", times["concat"], plain, f"same batch of {n}"))
    rows.append(("per-sample step (concat) / one merged LoRA, same batch", times["concat"], one_lora, "cost of serving K LoRAs at once"))
    return rows


def _max_rank(adapter) -> int:
    """The largest rank in an adapter tree."""
    return max(leaf.rank for leaf in jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf) if leaf is not None)


def bench_serving(size: str, rank: int, repeat: int, k: int) -> None:
    """Hotswap and per-sample LoRA serving on one UNet, as ratios measured in this run."""
    ref = R._unet_ref(f"bench_{size}", _config(size), 0, lambda rng: {})
    paths = _serving_files(ref, rank, k)
    rows = _bench_hotswap(ref, paths, rank, repeat) + _bench_per_sample(ref, paths, repeat)
    n_params = sum(x.size for x in jax.tree.leaves(ref.flax_params))
    _print(
        f"\nServing on UNet {size}: {n_params / 1e6:.1f} M params, {k} LoRAs of rank {rank} / {max(1, rank // 2)} on every "
        f"target module; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}",
        rows,
    )


def _diffusers_load(model, path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    state_dict, alphas, metadata = M.lora_state_dict(os.path.dirname(path), weight_name=os.path.basename(path), return_lora_metadata=True)
    M.load_lora_into_unet(state_dict, alphas, model, metadata=metadata)



def bench_generate(n: int, k: int, batch: int, steps: int, size: int, repeat: int) -> None:
    """Images/s for `n` prompts over `k` LoRAs: per-sample batches, LoRA-grouped batches, diffusers."""
    import pipelines_ref as P

    from jlora.pipelines import Lora, Request, load_pipeline
    from jlora.pipelines.common import LoraCache

    directory = P.pipeline_dir("sd")
    loras = [P.lora_file("sd", seed=i) for i in range(k)]
    requests = [Request(f"a photo of a cat {i}", loras=(Lora(loras[i % k]),), seed=i, steps=steps, width=size,
                        height=size, guidance=5.0) for i in range(n)]
    pipe = load_pipeline(directory)
    cache = LoraCache(pipe.lora_params, pipe.family)  # files loaded once, as a serving loop keeps them

    def mixed():
        for i in range(0, n, batch):
            jax.block_until_ready(pipe.generate(requests[i : i + batch], cache, lora_mode="per_sample"))

    groups = [[r for r in requests if r.loras[0].path == path] for path in loras]

    def grouped():
        for g in groups:
            for i in range(0, len(g), batch):
                jax.block_until_ready(pipe.generate(g[i : i + batch], cache, lora_mode="merged"))

    torch_pipe = P.torch_pipeline("sd")
    for i, path in enumerate(loras):
        torch_pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=f"l{i}")

    def diffusers_grouped():
        for j, g in enumerate(groups):
            torch_pipe.set_adapters([f"l{j}"])
            for i in range(0, len(g), batch):
                torch_pipe([r.prompt for r in g[i : i + batch]], height=size, width=size, num_inference_steps=steps,
                           guidance_scale=5.0, output_type="np")

    t_mixed, t_grouped, t_torch = (_time(f, repeat) for f in (mixed, grouped, diffusers_grouped))
    rate = lambda ms: n / (ms / 1e3)  # noqa: E731
    print(f"\ntext-to-image, tiny SD pipeline ({size}x{size}, {steps} steps, CFG): {n} prompts over {k} LoRAs, "
          f"batch {batch}; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}\n")
    rows = [("jlora per-sample LoRAs (mixed batches)", t_mixed), ("jlora grouped by LoRA (merged, hotswap)", t_grouped),
            ("diffusers torch grouped by LoRA (set_adapters)", t_torch)]
    w = max(len(r[0]) for r in rows)
    print(f"{'run':<{w}}  {'ms':>9}  {'images/s':>9}  {'vs diffusers':>12}")
    for name, ms in rows:
        print(f"{name:<{w}}  {ms:9.1f}  {rate(ms):9.2f}  {t_torch / ms:12.2f}")



# ------------------------------------------------------------------------------------------ --train

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)  # train_text_to_image_lora.py defaults
TEXT_TOKENS = 77
_RESULT = "bench-side-result: "


def _proc_status_kb(field: str) -> int | None:
    """A `/proc/self/status` figure in kB (`VmRSS`, `VmHWM`), None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _HostPeak:
    """Peak resident memory of this process above its level at `start()`, in MB.

    On Linux the kernel's high-water mark is reset at `start()` (`/proc/self/clear_refs`), so the figure is the
    growth over what was resident then. Elsewhere it is `ru_maxrss`, the peak since the process began.
    """

    def start(self) -> "_HostPeak":
        import resource

        self.base = _proc_status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "RSS growth over the loaded model"
        except OSError:
            self.base, self.method = None, "ru_maxrss of the process"
        self._resource = resource
        return self

    def mb(self) -> float:
        if self.base is not None:
            hwm = _proc_status_kb("VmHWM")
            if hwm is not None:
                return max(0, hwm - self.base) / 1024
        maxrss = self._resource.getrusage(self._resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, kB on Linux


def _progress(message: str) -> None:
    print(f"[bench --train] {message}", file=sys.stderr, flush=True)


def _overall(first: _HostPeak, first_mb: float, warm: _HostPeak) -> float:
    """Peak growth over `first.start()` across both windows: up to `warm.start()`, then `warm`'s own."""
    if first.base is None or warm.base is None:
        return warm.mb()  # ru_maxrss: already the peak of the whole process
    return max(first_mb, (warm.base - first.base) / 1024 + warm.mb())


def _warm_mb(warm: _HostPeak) -> float | None:
    """Growth over the warm steps alone; None where only the process-wide `ru_maxrss` is known."""
    return warm.mb() if warm.base is not None else None


def _train_setup(size: str, rank: int, batch: int):
    """The UNet, a PEFT LoRA file (rank, alpha = rank, diffusers' targets) and one seeded training batch."""
    cfg = _config(size)
    ref = R._unet_ref(f"bench_{size}", cfg, 0, lambda rng: {})
    path = R.make_peft_lora_file(tempfile.mkdtemp(prefix="jlora-bench-train-"), [ref], rank=rank, alpha=rank,
                                 pipeline="sd")
    rng = np.random.default_rng(1)
    shape = (batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    data = {
        "latents": rng.standard_normal(shape).astype(np.float32),
        "noise": rng.standard_normal(shape).astype(np.float32),
        "timesteps": rng.integers(0, SD_SCHEDULER["num_train_timesteps"], batch),
        "encoder_hidden_states": rng.standard_normal((batch, TEXT_TOKENS, cfg["cross_attention_dim"])).astype(np.float32),
    }
    return ref, path, data


def _train_side_jax(size: str, rank: int, batch: int, steps: int, repeat: int, base: bool) -> dict:
    """jlora: `diffusion_loss` + `make_train_step` with AdamW on the LoRA factors."""
    import warnings

    import optax

    from jlora import objectives, training

    ref, path, data = _train_setup(size, rank, batch)
    _progress(f"jlora: UNet {size} and LoRA built")
    device = jax.devices()[0]
    fn = R.flax_apply_fn(ref)
    ac = jax.device_put(objectives.alphas_cumprod(SD_SCHEDULER))

    def loss_fn(p, b):
        return objectives.diffusion_loss(lambda x, t: fn(p, x, t, b["encoder_hidden_states"]), b["latents"],
                                         b["noise"], b["timesteps"], ac)

    params = jax.device_put(ref.flax_params, device)
    adapter = jlora.load_lora(path, params, "unet")
    leaves = [x for x in jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf) if x is not None]
    trainable = sum(leaf.a.size + leaf.b.size for leaf in leaves)
    b = jax.device_put(data, device)
    jax.block_until_ready((params, adapter, b))
    host = _HostPeak().start()

    tx = training.optimizer(optax.adamw(ADAMW["lr"], b1=ADAMW["betas"][0], b2=ADAMW["betas"][1], eps=ADAMW["eps"],
                                        weight_decay=ADAMW["weight_decay"]))
    opt_state = training.init_opt_state(tx, adapter)
    step = training.make_train_step(loss_fn, tx, donate=True)
    t = time.perf_counter()
    compiled = step.lower(adapter, opt_state, params, b).compile()
    compile_ms = (time.perf_counter() - t) * 1e3
    _progress(f"jlora: train step compiled in {compile_ms / 1e3:.1f} s")
    analysis = compiled.memory_analysis()
    plan_mb = None if analysis is None else analysis.temp_size_in_bytes / 2**20
    state = [jax.tree.map(jax.numpy.copy, x) for x in (adapter, opt_state)]  # donated: no buffer shared twice

    def run(k):
        a, s = state
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # backends that cannot donate say so on every call
            for _ in range(k):
                a, s, metrics = compiled(a, s, params, b)
            jax.block_until_ready((a, s, metrics))
        state[:] = a, s
        return float(metrics["loss"])

    t = time.perf_counter()
    loss = run(1)
    first_ms = compile_ms + (time.perf_counter() - t) * 1e3
    first_mb, warm = host.mb(), _HostPeak().start()
    step_ms = _time(lambda: run(steps), repeat) / steps
    _progress(f"jlora: {step_ms:.1f} ms per step")
    stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        peak_mb, steps_mb, method = stats["peak_bytes_in_use"] / 2**20, None, f"{device.platform} peak_bytes_in_use"
    else:
        peak_mb, steps_mb, method = _overall(host, first_mb, warm), _warm_mb(warm), host.method
    out = dict(step_ms=step_ms, first_ms=first_ms, compile_ms=compile_ms, peak_mb=peak_mb, steps_mb=steps_mb,
               memory=method,
               plan_mb=plan_mb, loss=loss, trainable=int(trainable), modules=len(leaves),
               n_params=int(sum(x.size for x in jax.tree.leaves(params))), platform=device.platform,
               device=getattr(device, "device_kind", device.platform), version=jax.__version__)
    if base:
        grad = jax.jit(jax.value_and_grad(loss_fn))
        out["base_ms"] = _time(lambda: jax.block_until_ready(grad(params, b)), repeat)
    return out


def _train_side_torch(size: str, rank: int, batch: int, steps: int, repeat: int, base: bool) -> dict:
    """diffusers + PEFT: the LoRA file loaded into the torch UNet, autograd, `torch.optim.AdamW` on the factors."""
    from diffusers import DDPMScheduler

    torch.set_grad_enabled(True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ref, path, data = _train_setup(size, rank, batch)
    _progress(f"torch: UNet {size} and LoRA built")
    model = R.torch_model_with_lora(ref, path)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    model.to(device).train()
    lora_params = [p for p in model.parameters() if p.requires_grad]
    t = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in data.items()}
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    sync()
    host = _HostPeak().start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    optimizer = torch.optim.AdamW(lora_params, **ADAMW)

    def loss_of(m):
        noisy = scheduler.add_noise(t["latents"], t["noise"], t["timesteps"])
        pred = m(noisy, t["timesteps"], t["encoder_hidden_states"], return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), t["noise"].float(), reduction="mean")

    def run(k):
        for _ in range(k):
            loss = loss_of(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        sync()
        return float(loss.detach())

    start = time.perf_counter()
    loss = run(1)
    first_ms = (time.perf_counter() - start) * 1e3
    _progress(f"torch: first step {first_ms / 1e3:.1f} s")
    first_mb, warm = host.mb(), _HostPeak().start()
    step_ms = _time(lambda: run(steps), repeat) / steps
    _progress(f"torch: {step_ms:.1f} ms per step")
    if device.type == "cuda":
        peak_mb, steps_mb, method = torch.cuda.max_memory_allocated() / 2**20, None, "cuda max_memory_allocated"
    else:
        peak_mb, steps_mb, method = _overall(host, first_mb, warm), _warm_mb(warm), host.method
    out = dict(step_ms=step_ms, first_ms=first_ms, peak_mb=peak_mb, steps_mb=steps_mb, memory=method, loss=loss,
               trainable=int(sum(p.numel() for p in lora_params)), device=device.type, version=torch.__version__,
               modules=sum(1 for n, _ in model.named_parameters() if n.endswith(".lora_A.default.weight")))
    if base:
        plain = copy.deepcopy(ref.torch_model).to(device).train().requires_grad_(True)

        def forward_backward():
            loss_of(plain).backward()
            plain.zero_grad(set_to_none=True)
            sync()

        out["base_ms"] = _time(forward_backward, repeat)
    return out


def _run_train_side(side: str, size: str, rank: int, batch: int, steps: int, repeat: int, base: bool) -> dict:
    """One side in a fresh interpreter (its own peak memory; jax and torch never share a GPU process)."""
    env = dict(os.environ)
    if side == "torch":
        env["JAX_PLATFORMS"] = "cpu"  # the torch side builds its weights with jax's converters: keep jax off the GPU
    extra = ("--batch", str(batch), "--steps", str(steps)) + (() if base else ("--no-base",))
    return _run_side("train-side", side, size, rank, repeat, extra, env=env)


def bench_train(size: str, rank: int, batch: int, steps: int, repeat: int, base: bool = True) -> None:
    """LoRA training step time and peak memory: jlora vs diffusers + PEFT, same UNet, LoRA, batch and objective."""
    j = _run_train_side("jax", size, rank, batch, steps, repeat, base)
    t = _run_train_side("torch", size, rank, batch, steps, repeat, base)
    if (j["modules"], j["trainable"]) != (t["modules"], t["trainable"]):
        raise RuntimeError(f"the two sides train different LoRAs: jlora {j['modules']} modules / {j['trainable']} "
                           f"factor entries, PEFT {t['modules']} / {t['trainable']}")
    plan = "" if j["plan_mb"] is None else f"; XLA temp buffers {j['plan_mb']:.0f} MB"
    first_note = ", incl. compile + first step" if j["steps_mb"] is not None else ""
    compile_note = f"jlora: XLA compile {j['compile_ms'] / 1e3:.1f} s + 1 step"
    rows = [
        ("train step jlora / diffusers+PEFT (ms)", j["step_ms"], t["step_ms"], f"median of {repeat} x {steps} steps"),
        ("first step jlora / diffusers+PEFT (ms)", j["first_ms"], t["first_ms"], compile_note),
        ("peak memory jlora / torch (MB)", j["peak_mb"], t["peak_mb"],
         (j["memory"] if j["memory"] == t["memory"] else f"{j['memory']} / {t['memory']}") + first_note + plan),
        ("peak memory, warm steps only: jlora / torch (MB)", j["steps_mb"], t["steps_mb"],
         "growth over the level after the first step" if j["steps_mb"] is not None else "host RSS only"),
        ("steps/s jlora / diffusers+PEFT", 1e3 / j["step_ms"], 1e3 / t["step_ms"], "higher is better"),
    ]
    if base:
        rows.append(("LoRA step / base-weights forward+backward: jlora (ms)", j["step_ms"], j["base_ms"],
                     "base: grads of every UNet weight, no update"))
        rows.append(("LoRA step / base-weights forward+backward: torch (ms)", t["step_ms"], t["base_ms"], ""))
    _print(
        f"\nLoRA training, UNet {size}: {j['n_params'] / 1e6:.1f} M params, rank {rank} on {j['modules']} modules "
        f"({j['trainable'] / 1e6:.2f} M trainable), batch {batch} x 4x{_config(size)['sample_size']}^2 latents, "
        f"{TEXT_TOKENS}-token context, epsilon MSE, AdamW lr {ADAMW['lr']:g}; first loss {j['loss']:.4f} (jlora) / "
        f"{t['loss']:.4f} (torch)\njax {j['version']} on {j['platform']} ({j['device']}), torch {t['version']} on "
        f"{t['device']}",
        rows,
        head=("A", "B"),
    )



def _synthetic(n: int, unplaceable: int = 0):
    """Abstract params with `n` Dense kernels (8, 8) and a PEFT state dict for them (+ `unplaceable` keys)."""
    index = {("blocks", str(i), "proj", "kernel"): ((8, 8), np.float32) for i in range(n)}
    params = jlora.abstract_params(index)
    a, b = np.ones((1, 8), np.float32), np.ones((8, 1), np.float32)
    sd = {}
    for i in range(n):
        sd[f"unet.blocks.{i}.proj.lora_A.weight"], sd[f"unet.blocks.{i}.proj.lora_B.weight"] = a, b
    for i in range(unplaceable):
        sd[f"unet.elsewhere_{i}.proj.lora_A.weight"], sd[f"unet.elsewhere_{i}.proj.lora_B.weight"] = a, b
    return params, sd


def bench_keys(repeat: int) -> None:
    """Load time per module at 1,000 vs 32,000 modules, and with 8,000 unplaceable keys (non-strict)."""
    import warnings

    rows = []
    small, large = _synthetic(1000), _synthetic(32000)
    t_small = _time(lambda: jlora.load_lora(small[1], small[0], "unet"), max(1, repeat // 3))
    t_large = _time(lambda: jlora.load_lora(large[1], large[0], "unet"), 1)
    rows.append(("load 32,000 modules / 1,000 modules (x32 = linear)", t_large, t_small, "per-module cost ratio = A/B/32"))
    bad = _synthetic(1000, unplaceable=8000)

    def non_strict():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return jlora.load_lora(bad[1], bad[0], "unet", strict=False)

    t_bad = _time(non_strict, 1)
    rows.append(("load 1,000 modules + 8,000 unplaceable / 1,000 modules", t_bad, t_small, "(9,000 keys / 1,000)"))
    key = "unet." + "a." * 500_000 + "lora_A.weight"
    t_key = _time(lambda: _expect_error(lambda: jlora.load_lora({key: np.ones((1, 8), np.float32)}, small[0], "unet")), 1)
    rows.append(("1 MB key rejected / 1,000-module load", t_key, t_small, "a typed error"))
    _print("\nkey scaling (synthetic abstract params, Dense (8, 8) kernels, rank 1)", rows)


def _expect_error(fn):
    try:
        fn()
    except jlora.JloraError:
        return
    raise AssertionError("expected a JloraError")


if __name__ == "__main__":
    main()
