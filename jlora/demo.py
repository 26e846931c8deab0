"""`jlora demo`: a tiny Flax UNet and a generated LoRA through load -> apply -> fuse -> save.

Needs diffusers' Flax UNet (installed with the `test` extra); jlora itself does not.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
from jlora.models.random_init import random_params

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
)
TARGETS = r"to_[qkv]|to_out_0|ff/net|proj_in|proj_out|resnets_\d+/conv[12]"


def _progress(stage: str) -> None:
    """The stage being run, on stderr (the figures come at the end, on stdout)."""
    import sys

    print(f"... {stage}", file=sys.stderr, flush=True)


def _timeit(fn, *args, repeat=5):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeat * 1e3


def _shardings(params, mesh):
    """Split every kernel's output axis over the mesh where it divides; replicate the rest."""
    n = mesh.devices.size

    def spec(x):
        if x.ndim >= 2 and x.shape[-1] % n == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, params)


def _flux_rows(out: str) -> list[tuple[str, str]]:
    """A diffusers-format Flux LoRA (per-projection q/k/v) on jlora's Flax Flux (stacked, fused kernels)."""
    from converters.safetensors_io import save_file
    from jlora.models import flux

    config = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    params = flux.init_params(config, jax.random.key(2))
    rng = np.random.default_rng(3)
    tensors = {}
    for module, n_out in [(f"transformer_blocks.{i}.attn.to_{p}", 32) for i in range(2) for p in "qkv"] + [
        (f"single_transformer_blocks.{i}.proj_mlp", 128) for i in range(2)
    ]:
        tensors[f"transformer.{module}.lora_A.weight"] = rng.standard_normal((4, 32)).astype(np.float32)
        tensors[f"transformer.{module}.lora_B.weight"] = (0.2 * rng.standard_normal((n_out, 4))).astype(np.float32)
    path = os.path.join(out, "flux_lora.safetensors")
    save_file(tensors, path)
    adapters, report = jlora.load_lora_weights(path, {"transformer": params}, family="flux", return_report=True)
    apply_fn = flux.make_apply(config)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 16)), jnp.float32)
    txt, pooled = jnp.ones((2, 8, 32)) * 0.1, jnp.ones((2, 32)) * 0.1
    ids = jnp.zeros((16, 3)).at[:, 1].set(jnp.arange(16) // 4).at[:, 2].set(jnp.arange(16) % 4)
    step = jax.jit(lambda p, a, s: apply_fn(jlora.apply(p, a, s), x, txt, pooled, jnp.array([0.5, 0.5]), ids, jnp.zeros((8, 3))))
    effect = float(jnp.abs(step(params, adapters["transformer"], 1.0) - step(params, adapters["transformer"], 0.0)).max())
    qkv = adapters["transformer"]["double_blocks"]["img_attn"]["qkv"]["kernel"]
    return [
        ("Flux: LoRA modules -> fused/stacked kernels", f"{len(report.placed)} -> {jlora.count(adapters['transformer'])}"),
        ("Flux: img qkv leaf a / b (layers, in|rank, rank|out)", f"{tuple(qkv.a.shape)} / {tuple(qkv.b.shape)}"),
        ("Flux: max |y(scale 1) - y(scale 0)|", f"{effect:.3f}"),
    ]


def _serving_rows(unet, params, adapter, y_unpadded, inputs) -> list[tuple[str, str]]:
    """Hotswap three LoRAs of ranks 2, 4, 6 into one compiled step; then all three per sample in one batch."""
    others = [jlora.init_adapter(params, jax.random.key(10 + r), rank=r, alpha=2.0 * r, targets=TARGETS, b_std=0.05) for r in (2, 6)]
    loras = [others[0], adapter, others[1]]
    template = jlora.hotswap_template(params, rank=8, targets=TARGETS)
    step = jax.jit(lambda p, a, s, x, t, c: unet.apply({"params": jlora.apply(p, a, s)}, x, t, c).sample)
    merged = [step(params, jlora.pad_adapter(lora, template), 1.0, *inputs) for lora in loras]
    base = step(params, template, 0.0, *inputs)
    ids = jnp.array([0, 1, 2, jlora.NO_LORA, 2, 1, 0, 1])
    per_sample = jax.jit(jlora.per_sample_apply(lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample))
    y = per_sample(jlora.stack_adapters(loras), ids, jnp.ones(8), params, *inputs)
    want = jnp.stack([base[i] if k < 0 else merged[k][i] for i, k in enumerate(ids.tolist())])
    return [
        ("hotswap: compilations for LoRAs of rank 2, 4, 6", str(step._cache_size())),
        ("hotswap: max |padded rank-8 - unpadded| (rank 4)", f"{float(jnp.abs(merged[1] - y_unpadded).max()):.2e}"),
        ("per sample: 3 LoRAs + none in one batch, max |d| vs merged", f"{float(jnp.abs(y - want).max()):.2e}"),
    ]


def _training_rows(unet, params, y_teacher, out: str, inputs) -> list[tuple[str, str]]:
    """Fit a fresh rank-4 adapter to a LoRA's outputs for a few Adam steps; checkpoint and restore it."""
    import optax

    from jlora import training

    x, t, c = (v[:2] for v in inputs)
    batch = {"x": x, "t": t, "c": c, "y": y_teacher[:2]}

    def loss_fn(p, b):
        return jnp.mean((unet.apply({"params": p}, b["x"], b["t"], b["c"]).sample - b["y"]) ** 2)

    adapter = jlora.init_adapter(params, jax.random.key(5), rank=4, targets=TARGETS)
    tx = training.optimizer(optax.adam(3e-3))
    opt_state = training.init_opt_state(tx, adapter)
    step = training.make_train_step(loss_fn, tx)
    losses = []
    for _ in range(8):
        adapter, opt_state, metrics = step(adapter, opt_state, params, batch)
        losses.append(float(metrics["loss"]))
    ckpt = os.path.join(out, "checkpoints")
    training.save_checkpoint(ckpt, 8, {"adapter": adapter, "opt_state": opt_state})
    back = training.restore_checkpoint(ckpt, {"adapter": adapter, "opt_state": opt_state})
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves({"adapter": adapter, "opt_state": opt_state})))
    return [
        ("fine-tune 8 Adam steps: loss first -> last", f"{losses[0]:.4f} -> {losses[-1]:.4f}"),
        ("orbax checkpoint restores the same state", str(same)),
    ]


def _image_rows(out: str) -> tuple[list[tuple[str, str]], str]:
    """A tiny random SD pipeline makes one image per LoRA set, all in one per-sample batch; PNGs in out/images."""
    from jlora.pipelines import Lora, Request, common, images, tiny

    pipe = tiny.tiny_sd(os.path.join(out, "tiny_sd"))
    files = []
    for i, name in enumerate(("style_a", "style_b")):
        unet_lora = jlora.init_adapter(pipe.params["unet"], jax.random.key(20 + i), rank=4, alpha=4.0, targets=TARGETS,
                                       b_std=0.3)
        te_lora = jlora.init_adapter(pipe.params["text_encoder"], jax.random.key(30 + i), rank=4, alpha=4.0,
                                     targets=r"(q|k|v|out)_proj|fc[12]", b_std=0.3)
        files.append(jlora.save_lora_weights(os.path.join(out, name), {"unet": unet_lora, "text_encoder": te_lora}))
    sets = {"no_lora": (), "style_a": (Lora(files[0]),), "style_b": (Lora(files[1]),),
            "a_0.5+b_0.5": (Lora(files[0], 0.5), Lora(files[1], 0.5))}
    requests = [Request("a painting of a red cat", loras=v, seed=0, steps=8, guidance=5.0) for v in sets.values()]
    batch = common.to_uint8(pipe.generate(requests, lora_mode="per_sample"))
    alone = common.to_uint8(np.concatenate([pipe.generate([r], lora_mode="merged") for r in requests]))
    folder = os.path.join(out, "images")
    os.makedirs(folder, exist_ok=True)
    for name, image in zip(sets, batch):
        images.write_png(os.path.join(folder, f"{name}.png"), image)
    sheet = os.path.join(folder, "contact_sheet.png")
    images.write_png(sheet, images.contact_sheet(list(batch), columns=len(batch), cell=128))
    change = [int(np.abs(batch[i].astype(int) - batch[0].astype(int)).max()) for i in range(1, len(batch))]
    diff = int(np.abs(batch.astype(int) - alone.astype(int)).max())
    h, w = batch.shape[1:3]
    return [
        (f"images: {len(batch)} LoRA sets, one per-sample batch, {h}x{w} PNGs", ", ".join(sets)),
        ("images: max pixel change vs no LoRA (of 255)", ", ".join(map(str, change))),
        ("images: per-sample batch vs each set merged alone, max |d|", f"{diff} of 255"),
    ], sheet


def run(out: str | None = None) -> int:
    try:
        from diffusers import FlaxUNet2DConditionModel
    except ImportError:
        print("jlora demo needs diffusers' Flax UNet: pip install 'diffusers==0.35.2' (or the jlora[test] extra).")
        return 1
    out = out or tempfile.mkdtemp(prefix="jlora-demo-")
    rows = []
    print(f"jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} devices; files in {out}\n")

    unet = FlaxUNet2DConditionModel(**UNET_CONFIG)
    params = dict(random_params(dict(jax.eval_shape(unet.init_weights, jax.random.key(0))), seed=0))
    n_params = sum(x.size for x in jax.tree.leaves(params))

    # 1. A LoRA file, as diffusers writes them, generated from random factors.
    generated = jlora.init_adapter(params, jax.random.key(1), rank=4, alpha=8.0, targets=TARGETS, b_std=0.05)
    src = jlora.save_lora_weights(os.path.join(out, "generated"), {"unet": generated})
    print(f"1. generated {src} ({os.path.getsize(src) / 1e3:.1f} kB, {jlora.count(generated)} LoRA modules)")

    # 2. Load it onto the params tree.
    t = time.perf_counter()
    adapters, report = jlora.load_lora_weights(src, {"unet": params}, family="sd", return_report=True)
    rows.append(("load file -> adapter pytree", f"{(time.perf_counter() - t) * 1e3:.1f} ms"))
    print("2. loaded:\n" + report.summary())
    _progress("apply inside jit, sharded apply, fuse / unfuse, save")
    adapter = adapters["unet"]

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 4, 16, 16)), jnp.float32)
    t_ = jnp.asarray(rng.integers(0, 1000, (8,)))
    c = jnp.asarray(rng.standard_normal((8, 7, 32)), jnp.float32)

    # 3. Apply inside jit; the scale is traced, so new scales reuse the compiled step.
    step = jax.jit(lambda p, a, s, x, t, c: unet.apply({"params": jlora.apply(p, a, s)}, x, t, c).sample)
    base_step = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample)
    y_base = base_step(params, x, t_, c)
    ys = {s: step(params, adapter, s, x, t_, c) for s in (0.0, 0.5, 1.0)}
    rows.append(("compilations for scales 0.0, 0.5, 1.0", str(step._cache_size())))
    rows.append(("max |y(scale 0) - y(base)|", f"{float(jnp.abs(ys[0.0] - y_base).max()):.2e}"))
    rows.append(("max |y(scale 1) - y(base)| (LoRA effect)", f"{float(jnp.abs(ys[1.0] - y_base).max()):.3f}"))
    ms_base, ms_lora = _timeit(base_step, params, x, t_, c), _timeit(step, params, adapter, 1.0, x, t_, c)
    rows.append(("step time, LoRA applied / base", f"{ms_lora:.1f} / {ms_base:.1f} ms = {ms_lora / ms_base:.2f}x"))

    # 4. Sharded: kernels split over a mesh, adapter factors placed next to them.
    mesh = Mesh(np.array(jax.devices()), ("model",))
    sharded_params = jax.device_put(params, _shardings(params, mesh))
    sharded_adapter = jlora.shard_adapter(adapter, sharded_params)
    y_sharded = step(sharded_params, sharded_adapter, 1.0, x, t_, c)
    rows.append((f"max |sharded({mesh.devices.size} devices) - single|", f"{float(jnp.abs(y_sharded - ys[1.0]).max()):.2e}"))

    # 5. Fuse once for serving; unfuse gives the base weights back.
    fused = jax.jit(jlora.fuse)(params, adapter, 0.8)
    restored = jax.jit(jlora.unfuse)(fused, adapter, 0.8)
    y_fused = base_step(fused, x, t_, c)
    rows.append(("max |fused forward - applied forward| (scale 0.8)", f"{float(jnp.abs(y_fused - step(params, adapter, 0.8, x, t_, c)).max()):.2e}"))
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
    rows.append(("max |unfuse(fuse(W)) - W|", f"{err:.2e}"))

    # 6. Save back to diffusers format and reload.
    saved = jlora.save_lora_weights(os.path.join(out, "saved"), adapters)
    again = jlora.load_lora_weights(saved, {"unet": params})["unet"]
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(adapter)))
    rows.append(("saved file reloads to the same factors", str(same)))

    _progress("hotswap and per-sample LoRAs")
    rows += _serving_rows(unet, params, adapter, ys[1.0], (x, t_, c))
    _progress("fine-tune and orbax checkpoint")
    rows += _training_rows(unet, params, ys[1.0], out, (x, t_, c))
    _progress("a Flux LoRA on jlora's Flax Flux")
    rows += _flux_rows(out)
    _progress("images from a tiny SD pipeline, one per LoRA set")
    image_rows, sheet = _image_rows(out)
    rows += image_rows

    print(f"\nUNet: {n_params / 1e6:.2f} M params; adapter: {jlora.count(adapter)} modules\n")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"\nsaved: {saved}")
    print(f"images: {sheet} (one PNG per LoRA beside it)")
    return 0
