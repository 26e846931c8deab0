"""`scripts/finetune.py --distributed` on 2 processes (localhost, CPU, 4 devices each) against 1 process with 8.

Two workers (tests/finetune_worker.py) form one 8-device cluster and train the script's tiny
random UNet LoRA together for 4 steps, checkpointing every 2, into one shared output folder per
run; the reference runs the same arguments in a single process with 8 CPU devices. Both see the
same mesh shape and the same synthetic batches. For pure data parallelism (`--model-parallel 1`:
gradients reduced across the processes) and for a model axis spanning both processes
(`--model-parallel 8`: kernels, LoRA factors and their optimizer state split over the hosts, the
LoRA file gathered from both) the test checks:

* every checkpoint (adapter, AdamW state, step) restores to the reference's values, and process 1
  wrote its shards into it exactly when it holds state of its own (`--model-parallel 8`);
* the written `pytorch_lora_weights.safetensors` has the reference's keys, tensors and header;
* the printed losses match the reference's;
* only process 0 printed and wrote the LoRA file; process 1 wrote nothing outside checkpoints/.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import finetune_worker as W
import jlora
from converters import safetensors_io
from jlora import training
from multiprocess import free_port, tail

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPTS = os.path.join(ROOT, "scripts")
TIMEOUT_S = 240
STEPS, SAVE_EVERY = 4, 2
LORA = "pytorch_lora_weights.safetensors"
# Cross-process reductions sum in another order; where a gradient is near AdamW's eps the step
# (about lr = 1e-3 wherever |g| >> eps) carries that rounding, so atol is 0.2% of one step.
RTOL, ATOL = 1e-5, 2e-6
ARGS = ["--channels", "32", "--sample-size", "8", "--batch", "8", "--targets", "attn1/to_[qv]|resnets_0/conv1",
        "--rank", "4", "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--log-every", "1", "--seed", "3"]


MODEL_PARALLEL = (1, 8)
NAMES = ("single", "worker_0", "worker_1")


def _env(devices: int, cache) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        PYTHONPATH=os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        HF_HUB_OFFLINE="1",
        DIFFUSERS_VERBOSITY="error",
        TRANSFORMERS_VERBOSITY="error",
        JAX_COMPILATION_CACHE_DIR=str(cache),  # the second run of a process reuses the first's UNet init
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return env


def _out(workdir, name: str, model_parallel: int):
    return workdir / f"{'single' if name == 'single' else 'multi'}_mp{model_parallel}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The single-process reference and both workers side by side, each running every
    `MODEL_PARALLEL` in turn (TIMEOUT_S in all); all are killed if one fails or hangs.
    Returns the work folder, each process's script output per run, the worker records and the time."""
    workdir = tmp_path_factory.mktemp("distributed_training")
    port = free_port()
    procs, logs = {}, {}
    t0 = time.perf_counter()
    try:
        for p, name in enumerate(NAMES):
            groups = []
            for mp in MODEL_PARALLEL:
                groups += ["--", "--out", str(_out(workdir, name, mp)), *ARGS, "--model-parallel", str(mp)]
            single = name == "single"
            cmd = [sys.executable, os.path.join(HERE, "finetune_worker.py"), "-" if single else str(port),
                   str(max(p - 1, 0)), str(workdir / f"record_{name}.json"), *groups]
            env = _env(W.NUM_PROCESSES * W.LOCAL_DEVICES if single else W.LOCAL_DEVICES, workdir / f"cache_{name}")
            logs[name] = [str(workdir / f"{name}.{s}") for s in ("out", "err")]
            with open(logs[name][0], "w") as out, open(logs[name][1], "w") as err:
                procs[name] = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=err,
                                               stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs.values()):
            if any(p.returncode not in (None, 0) for p in procs.values()):
                break  # one failed: a worker would wait for its peer until its own timeouts
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        codes = {name: p.poll() for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    elapsed = time.perf_counter() - t0
    if any(c != 0 for c in codes.values()):
        why = "timed out" if None in codes.values() else f"exit codes {codes}"
        detail = "\n".join(f"--- {name} stderr ---\n{tail(err)}\n--- {name} stdout ---\n{tail(out)}"
                           for name, (out, err) in logs.items())
        pytest.fail(f"finetune runs {why} (limit {TIMEOUT_S} s):\n{detail}")
    stdout = {name: _split_runs(_script_lines(tail(out, 10**7))) for name, (out, _) in logs.items()}
    records = {name: json.loads((workdir / f"record_{name}.json").read_text()) for name in NAMES}
    return dict(workdir=workdir, stdout=stdout, records=records, elapsed=elapsed)


def _script_lines(text: str) -> list[str]:
    """The script's own stdout lines (gloo's C++ connection messages left out)."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("[Gloo]")]


def _split_runs(lines) -> list[list[str]]:
    """The output of each `finetune.main` call; each begins with the device and mesh line."""
    runs = []
    for line in lines:
        if " cpu devices, mesh " in line:
            runs.append([])
        if runs:
            runs[-1].append(line)
    return runs


def _losses(lines) -> dict[int, float]:
    rows = [line.split() for line in lines]
    return {int(r[0]): float(r[1]) for r in rows if len(r) == 3 and r[0].isdigit()}


def _template():
    """The abstract training state the script saves (numpy on restore): adapter, AdamW state, step."""
    sys.path.insert(0, SCRIPTS)
    import finetune

    args = finetune.parse_args(ARGS + ["--out", "unused"])
    module = finetune.tiny_unet(args)
    tx = training.optimizer(optax.adamw(args.lr, weight_decay=args.weight_decay))

    def build():
        params = module.init_weights(jax.random.key(args.seed))
        adapter = jlora.init_adapter(params, jax.random.key(args.seed + 1), rank=args.rank, alpha=args.alpha,
                                     targets=args.targets)
        return {"adapter": adapter, "opt_state": training.init_opt_state(tx, adapter)}

    state = jax.eval_shape(build)
    state["step"] = 0
    return state


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _max_diff(got: dict, want: dict) -> float:
    return max(float(np.abs(np.asarray(got[k], np.float64) - np.asarray(want[k], np.float64)).max(initial=0.0))
               for k in want)


@pytest.mark.parametrize("model_parallel", MODEL_PARALLEL, ids=["data-parallel", "model-axis-across-hosts"])
def test_two_process_finetune_matches_single_process(runs, model_parallel):
    run = MODEL_PARALLEL.index(model_parallel)
    single, multi = _out(runs["workdir"], "single", model_parallel), _out(runs["workdir"], "worker_0", model_parallel)
    records = runs["records"]

    # the workers formed one 8-device cluster of 2 processes and finished the script; the reference had 8 devices
    assert records["single"]["exit"] == [0] * len(MODEL_PARALLEL)
    assert (records["single"]["process_count"], records["single"]["device_count"]) == (1, 8)
    for p in range(W.NUM_PROCESSES):
        record = records[f"worker_{p}"]
        assert record["exit"] == [0] * len(MODEL_PARALLEL), p
        assert (record["process_index"], record["process_count"]) == (p, W.NUM_PROCESSES)
        assert (record["local_device_count"], record["device_count"]) == (W.LOCAL_DEVICES, 8)

    # only process 0 printed: the reference's table, with the same losses
    mesh = f"8 cpu devices, mesh {{'data': {8 // model_parallel}, 'model': {model_parallel}}}"
    stdout = runs["stdout"]
    assert len(stdout["single"]) == len(stdout["worker_0"]) == len(MODEL_PARALLEL), stdout
    assert stdout["worker_1"] == [], stdout["worker_1"]
    out_single, out_0 = stdout["single"][run], stdout["worker_0"][run]
    assert out_0[0].startswith(mesh) and out_0[0] == out_single[0], (out_0[0], out_single[0])
    assert out_0[-1] == f"wrote {multi / LORA}" and out_single[-1] == f"wrote {single / LORA}"
    losses, want_losses = _losses(out_0), _losses(out_single)
    assert sorted(losses) == sorted(want_losses) == list(range(1, STEPS + 1))
    for step, loss in want_losses.items():
        assert np.isfinite(loss) and abs(losses[step] - loss) <= 2e-5 * max(1.0, abs(loss)), (step, losses, want_losses)

    # only process 0 wrote the LoRA file (through a temporary file beside it); process 1 nothing outside checkpoints/
    written = [records[f"worker_{p}"]["written"][run] for p in range(W.NUM_PROCESSES)]
    lora = os.path.realpath(multi / LORA)
    assert os.path.realpath(single / LORA) in records["single"]["written"][run]
    assert lora in written[0], written
    assert all(os.path.dirname(w) == os.path.dirname(lora) and LORA in os.path.basename(w) for w in written[0]), written
    assert written[1] == [], written
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single)) == ["checkpoints", LORA]

    # the checkpoints hold the reference's adapter, optimizer state and step
    steps = list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert training.committed_steps(multi / "checkpoints") == training.committed_steps(single / "checkpoints") == steps
    for step in steps:
        # orbax writes each array from the processes holding it: state split over the hosts from both,
        # state replicated over them once, from process 0 (primary replica)
        shards = {p: multi / "checkpoints" / str(step) / "default" / f"ocdbt.process_{p}" for p in range(2)}
        assert any((shards[0] / "d").iterdir())
        if model_parallel == 8:
            assert any((shards[1] / "d").iterdir()), step
        else:
            assert not shards[1].exists(), step
    template = _template()
    ckpt_diff = b_diff = 0.0
    for step in steps:
        got = _flat(training.restore_checkpoint(multi / "checkpoints", template, step=step))
        want = _flat(training.restore_checkpoint(single / "checkpoints", template, step=step))
        assert sorted(got) == sorted(want) and len(want) > 50
        assert int(got["['step']"]) == int(want["['step']"]) == step
        for key, value in want.items():
            assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
            np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=f"step {step} {key}")
        ckpt_diff = max(ckpt_diff, _max_diff(got, want))
        b_diff = max(b_diff, _max_diff(got, {k: v for k, v in want.items() if k.startswith("['adapter']") and k.endswith(".b")}))
    b = [v for k, v in want.items() if k.startswith("['adapter']") and k.endswith(".b")]
    trained = max(float(np.abs(x).max()) for x in b)
    assert len(b) >= 6 and trained > 1e-3  # B starts at zero: the run trained, so the comparison can fail

    # the LoRA file: same keys, header and tensors
    got, got_header = safetensors_io.load_file(multi / LORA)
    want, want_header = safetensors_io.load_file(single / LORA)
    assert sorted(got) == sorted(want) and len(want) == 2 * len(b)
    for key, value in want.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        np.testing.assert_allclose(got[key], value, rtol=RTOL, atol=ATOL, err_msg=key)
    assert got_header == want_header and "lora_adapter_metadata" in want_header
    file_diff = _max_diff(got, want)
    print(f"\n--model-parallel {model_parallel}: 3 processes side by side {runs['elapsed']:.1f} s (all runs); "
          f"max |diff| checkpoints "
          f"{ckpt_diff:.1e} (adapter B {b_diff:.1e}, largest B {trained:.1e}), LoRA file {file_diff:.1e}; losses {losses}")
