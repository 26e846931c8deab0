"""Fine-tuning adapters (jlora.training): gradients, optimizer steps, sharded runs, orbax checkpoints.

References are independent of jlora: the same LoRA file loaded by diffusers into the torch UNet
(PEFT layers), autograd gradients of its `lora_A` / `lora_B` weights, `torch.optim.AdamW` on them,
and diffusers loading the file jlora saves after training.
"""

import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jlora
import reference as R
from jlora import training

SCALE = 0.7
# eps near the typical gradient (~1e-3) keeps Adam's update smooth in the gradient: with eps=1e-8 an entry
# whose gradient is ~0 steps by +-lr on the sign of a 1e-5 difference, which compares nothing
ADAMW = dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.1)
ROW_PARALLEL = ("to_out_0", "proj_out", "net_2", "conv2")  # split the input axis, the rest the output axis
K_STEPS, M_STEPS = 3, 3  # checkpoint after K steps, then M more
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # halves XLA:CPU compile time of the UNet steps


# ------------------------------------------------------------------------------------------ helpers


def _batch(n=8, seed=5):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((n, 4, 16, 16)).astype(np.float32),
        "timesteps": rng.uniform(0, 1000, n).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((n, 7, 32)).astype(np.float32),
    }


def _torch_out(model, inputs, scale=SCALE):
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    kwargs = {"scale": scale}
    return model(t["sample"], t["timesteps"], t["encoder_hidden_states"], cross_attention_kwargs=kwargs).sample


def _torch_lora_model(ref, path, tanh_gelu):
    """diffusers' model with the LoRA at `path`, LoRA weights trainable.

    `tanh_gelu`: diffusers' Flax GEGLU uses flax's default tanh GELU where the torch GEGLU uses the
    exact one (a port difference worth 5e-5 on the outputs); with it the torch reference computes the
    same function as the Flax UNet, so gradient and optimizer comparisons measure jlora, not the port.
    """
    from diffusers.models.activations import GEGLU

    model = R.torch_model_with_lora(ref, path)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    if tanh_gelu:
        for m in model.modules():
            if isinstance(m, GEGLU):
                m.gelu = types.MethodType(lambda self, g: torch.nn.functional.gelu(g, approximate="tanh"), m)
    return model


def _flax_layout(down, up):
    """torch lora_A (r, in[, kh, kw]) / lora_B (out, r[, 1, 1]) -> Flax a (in, r) | (kh, kw, in, r), b (r, out)."""
    down, up = np.asarray(down), np.asarray(up)
    if down.ndim == 4:
        return down.transpose(2, 3, 1, 0), up[:, :, 0, 0].T
    return down.T, up.T


def _torch_factors(model, placed, attr="data"):
    """{flax path: (a, b)} of every LoRA module of a PEFT model, as Flax-layout numpy arrays."""
    named = dict(model.named_parameters())
    out = {}
    for pm in placed:
        down = getattr(named[f"{pm.module}.lora_A.default.weight"], attr)
        up = getattr(named[f"{pm.module}.lora_B.default.weight"], attr)
        out[pm.path] = _flax_layout(down.detach().numpy(), up.detach().numpy())
    return out


def _leaf(adapter, path):
    node = adapter
    for key in path.split("/"):
        node = node[key]
    return node


def _leaves(adapter):
    return [l for l in jax.tree.leaves(adapter, is_leaf=jlora.is_adapter_leaf) if l is not None]


def _param_specs(params):
    def spec(path, x):
        if x.ndim < 2:
            return P()
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axis = x.ndim - 2 if any(r in name for r in ROW_PARALLEL) else x.ndim - 1
        entries = [None] * x.ndim
        if x.shape[axis] % 2 == 0:
            entries[axis] = "model"
        return P(*entries)

    return jax.tree_util.tree_map_with_path(spec, params)


def _mse_with_output(fn):
    def loss(params, batch):
        inputs = {k: batch[k] for k in ("sample", "timesteps", "encoder_hidden_states")}
        out = fn(params, **inputs)
        return jnp.mean((out - batch["target"]) ** 2), out

    return loss


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory, unet):
    d = tmp_path_factory.mktemp("train")
    return {
        "lora": R.make_peft_lora_file(d / "lora", [unet], rank=4, alpha=8, pipeline="sd", seed=0),
        "teacher": R.make_peft_lora_file(d / "teacher", [unet], rank=4, alpha=8, pipeline="sd", seed=1),
        "dir": d,
    }


@pytest.fixture(scope="module")
def run(files, unet):
    """A sharded AdamW fine-tune of the seed-0 LoRA towards the seed-1 LoRA's torch outputs.

    Mesh (data 4, model 2): params split over `model`, the batch of 8 over `data`. Checkpoint
    after K_STEPS, then M_STEPS more; then M_STEPS from the restored checkpoint.
    """
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), _param_specs(unet.flax_params))
    params = jax.device_put(unet.flax_params, param_shardings)
    loaded, report = jlora.load_lora(files["lora"], unet.flax_params, "unet", return_report=True)
    # adapter shardings have the form jit gives its outputs, so every step reuses the first compilation
    adapter = jax.device_put(loaded, jlora.adapter_shardings(loaded, param_shardings))

    inputs = _batch()
    with torch.no_grad():
        target = _torch_out(R.torch_model_with_lora(unet, files["teacher"]), inputs).numpy()
    batch = jax.device_put({**inputs, "target": target}, NamedSharding(mesh, P("data")))

    tx = training.optimizer(optax.adamw(**ADAMW))
    opt_state = training.init_opt_state(tx, adapter)
    step = training.make_train_step(
        _mse_with_output(R.flax_apply_fn(unet)), tx, scale=SCALE, has_aux=True,
        state_shardings=jax.tree.map(lambda x: x.sharding, (adapter, opt_state)),
        compiler_options=FAST_COMPILE,
    )

    states, losses = [(adapter, opt_state)], []
    for _ in range(K_STEPS + M_STEPS):
        a, s, metrics = step(*states[-1], params, batch)
        states.append((a, s))
        losses.append(float(metrics["loss"]))
    ckpt = files["dir"] / "ckpt"
    adapter_k, opt_state_k = states[K_STEPS]
    training.save_checkpoint(ckpt, K_STEPS, {"adapter": adapter_k, "opt_state": opt_state_k, "step": K_STEPS})
    *_, final_metrics = step(*states[-1], params, batch)  # aux: the Flax output of the final adapter
    return types.SimpleNamespace(
        mesh=mesh, params=params, report=report, inputs=inputs, batch=batch, tx=tx, step=step, states=states,
        losses=losses + [float(final_metrics["loss"])], final_output=np.asarray(final_metrics["aux"]), ckpt=ckpt,
    )


# ------------------------------------------------------------------------------------------ masks and optimizer


def test_trainable_mask_and_optimizer_never_touch_alpha():
    params = {"dense": {"kernel": jnp.ones((6, 8)), "bias": jnp.zeros(8)}, "conv": {"kernel": jnp.ones((3, 3, 4, 8))}}
    key = jax.random.key(0)
    adapter = jlora.init_adapter(params, key, rank=2, alpha=3.0, targets="dense", b_std=0.1)
    k1, k2 = jax.random.split(key)
    adapter["conv"]["kernel"] = jlora.DoraLeaf(
        a=jax.random.normal(k1, (3, 3, 4, 2)), b=jax.random.normal(k2, (2, 8)) * 0.1,
        alpha=jnp.float32(2.0), magnitude=jnp.ones((1, 1, 1, 8)),
    )
    mask = training.trainable_mask(adapter)
    assert mask["dense"]["kernel"] == jlora.LoraLeaf(a=True, b=True, alpha=False)
    assert mask["dense"]["bias"] is None
    assert jax.tree.leaves(mask["conv"]) == [True, True, False, True]  # a, b, alpha, magnitude
    a, b = jnp.ones((6, 2)), jnp.ones((2, 8))
    loha = jlora.LohaLeaf(a1=a, b1=b, a2=a, b2=b, alpha=jnp.float32(1))
    lokr = jlora.LokrLeaf(w1=jnp.ones((2, 2)), w2=jnp.ones((3, 4)), factor=jnp.float32(1))
    assert jax.tree.leaves(training.trainable_mask({"x": loha, "y": lokr})) == [True] * 4 + [False] + [True, True, False]

    def loss(p, x):
        h = x @ p["dense"]["kernel"] + p["dense"]["bias"]
        y = jax.lax.conv_general_dilated(jnp.ones((1, 5, 5, 4)), p["conv"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(h ** 2) + jnp.sum(y ** 2)

    x = jnp.ones((3, 6))
    # wrapped: no optimizer state for alpha; plain adamw (weight decay on every leaf): the step keeps alpha anyway
    wrapped, plain = training.optimizer(optax.adamw(0.1, weight_decay=0.5)), optax.adamw(0.1, weight_decay=0.5)
    for tx, donate in ((wrapped, False), (plain, True)):
        trained = jax.tree.map(jnp.copy, adapter)  # a donated input is gone after the call
        state = training.init_opt_state(tx, trained)
        step = training.make_train_step(loss, tx, donate=donate, compiler_options=FAST_COMPILE)
        for _ in range(4):
            trained, state, metrics = step(trained, state, params, x)
        for name in ("dense", "conv"):
            before, after = adapter[name]["kernel"], trained[name]["kernel"]
            np.testing.assert_array_equal(np.asarray(after.alpha), np.asarray(before.alpha))
            assert np.asarray(after.alpha).tobytes() == np.asarray(before.alpha).tobytes()
            assert not np.allclose(np.asarray(after.a), np.asarray(before.a))
            assert not np.allclose(np.asarray(after.b), np.asarray(before.b))
        assert float(metrics["grad_norm"]) > 0

    # the plain optax loop with the wrapped optimizer leaves alpha bit-identical too
    tx = training.optimizer(optax.adamw(0.1, weight_decay=0.5))
    state, trained = tx.init(adapter), adapter
    grad_fn = jax.jit(jax.grad(lambda a: loss(jlora.apply(params, a), x)))
    for _ in range(3):
        grads = grad_fn(trained)
        updates, state = tx.update(grads, state, trained)
        trained = optax.apply_updates(trained, updates)
    alphas = [np.asarray(t["dense"]["kernel"].alpha).tobytes() for t in (trained, adapter)]
    assert alphas[0] == alphas[1]

    with pytest.raises(jlora.errors.InvalidAdapterError, match="dense/bias"):
        training.trainable_mask({"dense": {"kernel": adapter["dense"]["kernel"], "bias": jnp.zeros(8)}})


# ------------------------------------------------------------------------------------------ parity with PEFT


def test_gradients_match_peft_autograd(unet, files):
    adapter, report = jlora.load_lora(files["lora"], unet.flax_params, "unet", return_report=True)
    inputs = _batch(n=2, seed=7)
    target = np.random.default_rng(8).standard_normal((2, 4, 16, 16)).astype(np.float32)

    model = _torch_lora_model(unet, files["lora"], tanh_gelu=True)
    loss_t = torch.mean((_torch_out(model, inputs) - torch.from_numpy(target)) ** 2)
    loss_t.backward()
    want = _torch_factors(model, report.placed, attr="grad")

    fn = R.flax_apply_fn(unet)
    loss = _mse_with_output(fn)
    batch = {**{k: jnp.asarray(v) for k, v in inputs.items()}, "target": jnp.asarray(target)}
    value_and_grad = jax.value_and_grad(lambda a: loss(jlora.apply(unet.flax_params, a, SCALE), batch)[0])
    loss_j, grads = jax.jit(value_and_grad, compiler_options=FAST_COMPILE)(adapter)
    np.testing.assert_allclose(float(loss_j), float(loss_t), rtol=1e-4)

    kinds = {"conv": 0, "linear": 0}
    diff2 = norm2 = 0.0
    worst = []
    for path, (a_t, b_t) in want.items():
        leaf = _leaf(grads, path)
        a_j, b_j = np.asarray(leaf.a), np.asarray(leaf.b)
        assert a_j.shape == a_t.shape and b_j.shape == b_t.shape, path
        kinds["conv" if a_t.ndim == 4 else "linear"] += 1
        d = np.concatenate([(a_j - a_t).ravel(), (b_j - b_t).ravel()])
        g = np.concatenate([a_t.ravel(), b_t.ravel()])
        diff2, norm2 = diff2 + float(d @ d), norm2 + float(g @ g)
        worst.append((float(np.linalg.norm(d)), path))
    total = np.sqrt(norm2)
    assert kinds["conv"] >= 10 and kinds["linear"] >= 10
    assert sum(kinds.values()) == jlora.count(adapter) == len(report.placed)
    assert total > 1e-3, "gradients must be non-trivial for the comparison to mean anything"
    assert np.sqrt(diff2) <= 1e-4 * total, np.sqrt(diff2) / total
    assert max(worst)[0] <= 1e-4 * total, (max(worst)[0] / total, max(worst)[1])


def test_adamw_steps_match_torch_adamw(unet, files, run):
    """K_STEPS of the sharded step equal torch AdamW on the PEFT weights (same lr, betas, eps, decay)."""
    model = _torch_lora_model(unet, files["lora"], tanh_gelu=True)
    target = torch.from_numpy(np.asarray(run.batch["target"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ADAMW["learning_rate"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    for _ in range(K_STEPS):
        opt.zero_grad()
        torch.mean((_torch_out(model, run.inputs) - target) ** 2).backward()
        opt.step()
    want = _torch_factors(model, run.report.placed)
    start, got = run.states[0][0], run.states[K_STEPS][0]

    rel_values, rel_change, moved = [], [], []
    for path, (a_t, b_t) in want.items():
        leaf, leaf0 = _leaf(got, path), _leaf(start, path)
        for x_j, x_t, x_0 in ((leaf.a, a_t, leaf0.a), (leaf.b, b_t, leaf0.b)):
            x_j, x_0 = np.asarray(x_j), np.asarray(x_0)
            rel_values.append(np.abs(x_j - x_t).max() / np.abs(x_t).max())
            rel_change.append(np.linalg.norm(x_j - x_t) / np.linalg.norm(x_t - x_0))
            moved.append(np.abs(x_t - x_0).max())
        assert np.asarray(leaf.alpha).tobytes() == np.asarray(leaf0.alpha).tobytes() == np.float32(8).tobytes()
    assert max(moved) > K_STEPS * 0.5 * ADAMW["learning_rate"], "Adam moves factors by about lr per step"
    assert max(rel_values) <= 1e-4, max(rel_values)  # per module, relative to the largest factor entry
    assert max(rel_change) <= 1e-3, max(rel_change)  # per module, relative to how far the factors moved


# ------------------------------------------------------------------------------------------ sharded training


def test_sharded_run_reduces_loss_and_keeps_shardings(run):
    assert run.losses[-1] < 0.7 * run.losses[0], run.losses
    assert all(b < a for a, b in zip(run.losses, run.losses[1:])), run.losses
    start, end = run.states[0], run.states[-1]
    for x, y in zip(jax.tree.leaves(start[0]), jax.tree.leaves(end[0])):
        assert isinstance(y.sharding, NamedSharding) and y.sharding == x.sharding
    split = [l for l in _leaves(end[0]) if any(s is not None for s in (*l.a.sharding.spec, *l.b.sharding.spec))]
    assert len(split) > 20, "factors are split over the model axis"
    for x, y in zip(jax.tree.leaves(start[1]), jax.tree.leaves(end[1])):
        assert isinstance(y.sharding, NamedSharding) and y.sharding.is_equivalent_to(x.sharding, y.ndim)
    assert run.step._cache_size() == 1  # each step's outputs feed the next without a new compilation


# ------------------------------------------------------------------------------------------ orbax


def _state(i, run):
    return {"adapter": run.states[i][0], "opt_state": run.states[i][1], "step": i}


def test_checkpoint_restores_exactly_and_resumes(run):
    assert training.latest_step(run.ckpt) == K_STEPS
    restored = training.restore_checkpoint(run.ckpt, _state(0, run))  # a fresh state as target
    saved = _state(K_STEPS, run)
    assert jax.tree.structure(restored) == jax.tree.structure(saved) and restored["step"] == K_STEPS
    target_leaves = jax.tree.leaves(_state(0, run))
    for got, want, tgt in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), target_leaves):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        if isinstance(tgt, jax.Array):
            assert got.sharding == tgt.sharding
    n_none = sum(l is None for l in jax.tree.leaves(restored["adapter"], is_leaf=jlora.is_adapter_leaf))
    assert n_none == sum(l is None for l in jax.tree.leaves(saved["adapter"], is_leaf=jlora.is_adapter_leaf)) > 0

    adapter, opt_state = restored["adapter"], restored["opt_state"]
    for _ in range(M_STEPS):
        adapter, opt_state, _ = run.step(adapter, opt_state, run.params, run.batch)
    uninterrupted = run.states[K_STEPS + M_STEPS]
    for got, want in zip(jax.tree.leaves((adapter, opt_state)), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_checkpoint_errors_are_typed(run, tmp_path):
    start = _state(0, run)
    leaves, treedef = jax.tree_util.tree_flatten(start["adapter"], is_leaf=jlora.is_adapter_leaf)
    i = next(i for i, l in enumerate(leaves) if l is not None)
    path = jax.tree_util.tree_flatten_with_path(start["adapter"], is_leaf=jlora.is_adapter_leaf)[0][i][0]
    name = "/".join(str(k.key) for k in path)

    def abstract_state(adapter):  # ShapeDtypeStructs: the structure check runs before anything is read
        return jax.eval_shape(lambda a: {"adapter": a, "opt_state": run.tx.init(a), "step": 0}, adapter)

    missing = jax.tree_util.tree_unflatten(treedef, leaves[:i] + [None] + leaves[i + 1 :])
    with pytest.raises(training.CheckpointMismatchError, match=f"{name}/a") as err:
        training.restore_checkpoint(run.ckpt, abstract_state(missing))
    assert isinstance(err.value, jlora.JloraError)

    def rank8(leaf):
        if leaf is None:
            return None
        return jlora.LoraLeaf(a=jnp.zeros(leaf.a.shape[:-1] + (8,)), b=jnp.zeros((8,) + leaf.b.shape[1:]), alpha=leaf.alpha)

    wider = jax.eval_shape(lambda a: jax.tree.map(rank8, a, is_leaf=jlora.is_adapter_leaf), start["adapter"])
    with pytest.raises(training.CheckpointMismatchError, match=r"saved \(\d+, 4\), target \(\d+, 8\)"):
        training.restore_checkpoint(run.ckpt, abstract_state(wider))

    with pytest.raises(training.CheckpointError, match=f"already holds step {K_STEPS}"):  # orbax would skip it
        training.save_checkpoint(run.ckpt, K_STEPS - 1, start)
    with pytest.raises(training.CheckpointNotFoundError, match="step 99"):
        training.restore_checkpoint(run.ckpt, start, step=99)
    with pytest.raises(jlora.JloraError, match="no such checkpoint directory"):
        training.restore_checkpoint(tmp_path / "nothing", start)
    assert training.latest_step(tmp_path / "nothing") is None


# ------------------------------------------------------------------------------------------ save for diffusers


def test_fine_tuned_adapter_saves_for_diffusers(run, unet, tmp_path):
    trained = run.states[-1][0]
    path = jlora.save_lora_weights(tmp_path, {"unet": trained})
    with torch.no_grad():
        want = _torch_out(R.torch_model_with_lora(unet, path), run.inputs).numpy()
        base = _torch_out(unet.torch_model, run.inputs).numpy()
    effect = np.abs(want - base).max()
    assert effect > 0.3 * np.abs(base).max(), "the fine-tuned LoRA must change the output"
    assert np.abs(run.final_output - want).max() <= 1e-3 * effect, (np.abs(run.final_output - want).max(), effect)

    again = jlora.load_lora(path, unet.flax_params, "unet")
    for x, y in zip(_leaves(again), _leaves(trained)):
        np.testing.assert_array_equal(np.asarray(x.a), np.asarray(y.a))
        np.testing.assert_array_equal(np.asarray(x.b), np.asarray(y.b))
        assert float(x.alpha) == float(y.alpha) == 8.0


# ------------------------------------------------------------------------------------------ scripts/finetune.py

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")


def _finetune(args, env):
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "finetune.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _loss_table(stdout):
    """{step: loss} from the script's table rows `step loss ms/step`."""
    rows = [line.split() for line in stdout.splitlines()]
    return {int(r[0]): r[1] for r in rows if len(r) == 3 and r[0].isdigit()}


def test_finetune_script_trains_checkpoints_resumes_and_saves(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"),  # the second run reuses the first's compilation
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    out = tmp_path / "run"
    args = ["--out", str(out), "--channels", "32", "--sample-size", "8", "--batch", "8", "--model-parallel", "2",
            "--targets", "attn1/to_[qv]|resnets_0/conv1", "--rank", "4", "--steps", "4", "--save-every", "2",
            "--log-every", "1"]
    first = _finetune(args, env)
    assert "8 cpu devices, mesh {'data': 4, 'model': 2}" in first
    losses = _loss_table(first)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(float(v)) for v in losses.values())
    assert sorted(f for f in os.listdir(out / "checkpoints") if not f.startswith(".")) == ["2", "4"]
    lora = out / "pytorch_lora_weights.safetensors"
    uninterrupted, header = R.read_lora_file(lora)

    # resume from step 2 (the newest checkpoint once step 4 is gone) and redo steps 3 and 4
    shutil.rmtree(out / "checkpoints" / "4")
    second = _finetune(args + ["--resume"], env)
    assert "resumed from step 2" in second
    assert _loss_table(second) == {3: losses[3], 4: losses[4]}
    resumed, _ = R.read_lora_file(lora)
    assert sorted(resumed) == sorted(uninterrupted)
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)

    # the file is a diffusers LoRA of the script's UNet, trained (non-zero B) with alpha = rank
    sys.path.insert(0, SCRIPTS)
    import finetune

    shapes = jax.eval_shape(finetune.tiny_unet(finetune.parse_args(args)).init_weights, jax.random.key(0))
    adapter = jlora.load_lora(lora, shapes, "unet")
    n_targets = int(first.split(" LoRA targets")[0].rsplit(" ", 1)[1])
    assert jlora.count(adapter) == n_targets == len({k.rsplit(".lora_", 1)[0] for k in uninterrupted}) >= 6
    assert {l.a.ndim for l in _leaves(adapter)} == {2, 4}  # linear and conv targets
    assert all(np.abs(np.asarray(l.b)).max() > 0 and float(l.alpha) == 4.0 for l in _leaves(adapter))
