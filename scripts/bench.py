"""jlora vs diffusers + PEFT on the same SD-shaped UNet and LoRA file, and LoRA vs base.

Every figure is a ratio measured in this one run, on this machine:

    python scripts/bench.py                 # SD-1.5-shaped UNet at reduced width (default)
    python scripts/bench.py --size tiny     # the test-suite UNet, seconds
    python scripts/bench.py --size sd15     # full SD-1.5 width (needs ~16 GB RAM, minutes on CPU)
    python scripts/bench.py --kohya-sdxl    # loading a real-size SDXL kohya file (~190 MB fp16, ~10 GB RAM)
    python scripts/bench.py --serving       # hotswap into a warm jitted step; K LoRAs per sample in one call
    python scripts/bench.py --generate      # images/s, N prompts over K LoRAs: per-sample vs grouped vs diffusers
    python scripts/bench.py --keys          # load time vs number of modules / unplaceable keys (linear?)

Rows: file -> adapters (jlora) vs diffusers' lora_state_dict + load_lora_into_unet, and vs a raw
safetensors read; the jitted step with the LoRA applied vs the base step (and vs the fused
params); fusing (jlora.fuse, jitted) vs diffusers' fuse_lora; the torch step with LoRA vs without.
--serving: swapping a new LoRA into a warm jitted step (jlora.pad_adapter) vs the first call and vs
diffusers' load_lora_adapter(hotswap=True); K LoRAs per sample in one call (jlora.per_sample) vs K
merged calls and vs the base step.
--generate: text-to-image on a tiny saved SD pipeline (tests/pipelines_ref.py), N prompts spread over K
LoRA files: jlora with per-sample LoRAs in mixed batches, jlora with batches grouped by LoRA (merged,
one compiled step reused across LoRAs), and diffusers' torch pipeline grouped by LoRA (`set_adapters`).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
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


def _print(title: str, rows) -> None:
    print(title + "\n")
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'A ms':>9}  {'B ms':>9}  {'A/B':>6}  note")
    for name, x, y, note in rows:
        print(f"{name:<{w}}  {x:9.2f}  {y:9.2f}  {x / y:6.2f}  {note}")


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

    from converters.architectures import SDXL_UNET, family_indexes

    tmp = tempfile.mkdtemp(prefix="jlora-bench-")
    path = os.path.join(tmp, "sdxl_kohya.safetensors")
    n_modules = write_sdxl_kohya(path)
    indexes = family_indexes("sdxl")
    params = {c: jlora.abstract_params(indexes[c]) for c in ("unet", "text_encoder")}
    jl = _time(lambda: jax.block_until_ready(jlora.load_lora_weights(path, params, family="sdxl")), repeat)
    raw_np = _time(lambda: safetensors.numpy.load_file(path), repeat)
    raw_jax = _time(lambda: jax.block_until_ready(safetensors.flax.load_file(path)), repeat)
    floor = _time(lambda: jax.block_until_ready(_read_and_transfer(path)), repeat)

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
            ("file -> adapters: jlora / safetensors.numpy read", jl, raw_np, "target <= 2"),
            ("file -> adapters: jlora / safetensors.flax read", jl, raw_jax, "both end in device arrays"),
            ("file -> adapters: jlora / read + device_put floor", jl, floor, "conversion overhead"),
            ("read + device_put floor / safetensors.numpy read", floor, raw_np, "no conversion at all"),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--kohya-sdxl", action="store_true", help="only the real-size SDXL kohya loading benchmark")
    parser.add_argument("--serving", action="store_true", help="only the serving benchmark (hotswap, per-sample LoRAs)")
    parser.add_argument("--loras", type=int, default=4, help="--serving/--generate: number of LoRAs K")
    parser.add_argument("--generate", action="store_true", help="only the image-generation benchmark")
    parser.add_argument("--keys", action="store_true", help="only the key-count scaling benchmark")
    parser.add_argument("--prompts", type=int, default=16, help="--generate: number of prompts N")
    parser.add_argument("--batch", type=int, default=8, help="--generate: batch size")
    parser.add_argument("--steps", type=int, default=10, help="--generate: denoising steps")
    parser.add_argument("--resolution", type=int, default=64, help="--generate: image height and width")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.keys:
        bench_keys(args.repeat)
        return
    if args.generate:
        bench_generate(args.prompts, args.loras, args.batch, args.steps, args.resolution, max(1, args.repeat // 3))
        return
    if args.kohya_sdxl:
        bench_kohya_sdxl(args.repeat)
        return
    if args.serving:
        bench_serving(args.size, args.rank, args.repeat, args.loras)
        return

    ref = R._unet_ref(f"bench_{args.size}", _config(args.size), 0, lambda rng: {})
    tmp = tempfile.mkdtemp(prefix="jlora-bench-")
    path = R.make_peft_lora_file(tmp, [ref], rank=args.rank, alpha=args.rank * 2, pipeline="sd")
    n_modules = len({k.rsplit(".lora_", 1)[0] for k in safetensors.numpy.load_file(path)})
    rows: list[tuple[str, float, float, str]] = []

    # 1. Loading the file.
    jl = _time(lambda: jax.block_until_ready(jlora.load_lora(path, ref.flax_params, "unet")), args.repeat)
    raw = _time(lambda: safetensors.numpy.load_file(path), args.repeat)

    def diffusers_load():
        model = copy.deepcopy(ref.torch_model)
        t = time.perf_counter()
        _diffusers_load(model, path)
        return time.perf_counter() - t

    dl = statistics.median(diffusers_load() for _ in range(max(2, args.repeat // 2))) * 1e3
    rows.append(("load file -> adapter (jlora / diffusers)", jl, dl, "lower is better"))
    rows.append(("load file -> adapter (jlora / raw safetensors read)", jl, raw, ""))

    # 2. The jitted step: LoRA applied per call vs base vs fused.
    adapter = jlora.load_lora(path, ref.flax_params, "unet")
    fn = R.flax_apply_fn(ref)
    base_step = jax.jit(lambda p, inp: fn(p, **inp))
    lora_step = jax.jit(lambda p, a, s, inp: fn(jlora.apply(p, a, s), **inp))
    inputs = ref.inputs
    b = _time(lambda: jax.block_until_ready(base_step(ref.flax_params, inputs)), args.repeat)
    a = _time(lambda: jax.block_until_ready(lora_step(ref.flax_params, adapter, 0.8, inputs)), args.repeat)
    fused = jax.jit(jlora.fuse)(ref.flax_params, adapter, 0.8)
    f = _time(lambda: jax.block_until_ready(base_step(fused, inputs)), args.repeat)
    rows.append(("jitted step: LoRA applied per call / base", a, b, "merge inside the jitted step"))
    rows.append(("jitted step: fused params / base", f, b, "fused params, no per-call merge"))

    # 3. Fusing.
    fuse = jax.jit(jlora.fuse)
    jf = _time(lambda: jax.block_until_ready(fuse(ref.flax_params, adapter, 0.8)), args.repeat)
    model = R.torch_model_with_lora(ref, path)

    def diffusers_fuse():
        model.fuse_lora(lora_scale=0.8)
        model.unfuse_lora()

    df = _time(diffusers_fuse, args.repeat)
    rows.append(("fuse (jlora, jitted / diffusers fuse+unfuse)", jf, df, "diffusers figure includes unfuse"))

    # 4. Torch reference steps, for context.
    tb = _time(lambda: R.torch_forward(ref.torch_model, ref), args.repeat)
    tl = _time(lambda: R.torch_forward(model, ref, scale=0.8), args.repeat)
    rows.append(("torch step: diffusers+PEFT LoRA / base", tl, tb, "PEFT's unfused overhead"))
    rows.append(("step: jlora LoRA (jax) / diffusers LoRA (torch)", a, tl, "same CPU, different frameworks"))

    n_params = sum(x.size for x in jax.tree.leaves(ref.flax_params))
    _print(
        f"\nUNet {args.size}: {n_params / 1e6:.1f} M params, LoRA rank {args.rank} on {n_modules} modules, "
        f"file {os.path.getsize(path) / 1e6:.1f} MB; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}",
        rows,
    )


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
