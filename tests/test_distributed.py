"""`load_component` with FSDP shardings in a 2-process `jax.distributed` run (localhost, CPU).

Two worker processes (tests/distributed_worker.py), 4 CPU devices each, form one (2, 4) mesh
("data", "model") whose model axis spans both processes, so each process holds half of every
split weight. Each loads a tiny SD-1.5 UNet saved by diffusers, runs the jitted forward (CPU
collectives over gloo) and gathers the output. The test checks, against a single-process load:

* every shard a process holds equals the single-process params at its index;
* both processes' gathered outputs equal the single-process forward;
* each process reads exactly the bytes of the distinct blocks its devices hold: all of each
  replicated leaf and half of each split leaf, together more than the checkpoint once and each
  well under it.
"""

import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh

import distributed_worker as W
import reference as R
from jlora import models
from multiprocess import free_port, tail

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 240


def _run_workers(workdir) -> list[dict]:
    """Start both workers, wait for them (TIMEOUT_S in all), kill both if either fails or hangs."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={W.LOCAL_DEVICES}",
        PYTHONPATH=os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
        HF_HUB_OFFLINE="1",
    )
    procs, logs = [], []
    try:
        for i in range(W.NUM_PROCESSES):
            log = [str(workdir / f"worker_{i}.{s}") for s in ("out", "err")]
            with open(log[0], "w") as out, open(log[1], "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "distributed_worker.py"), str(port), str(i), str(workdir)],
                    env=env, cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL))
            logs.append(log)
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until its own timeouts
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    if codes != [0] * W.NUM_PROCESSES:
        why = "timed out" if None in codes else f"exit codes {codes}"
        detail = "\n".join(f"--- worker {i} stderr ---\n{tail(err)}\n--- worker {i} stdout ---\n{tail(out)}"
                           for i, (out, err) in enumerate(logs))
        pytest.fail(f"distributed workers {why} (limit {TIMEOUT_S} s):\n{detail}")
    return [dict(np.load(workdir / f"result_{i}.npz")) for i in range(W.NUM_PROCESSES)]


def _expected_bytes(shapes, itemsize) -> list[int]:
    """Bytes of the distinct blocks each process's devices hold, from the shardings on an 8-device
    mesh of this process laid out as the workers' (local devices 4p..4p+3 stand for process p)."""
    local = jax.devices()[: W.NUM_PROCESSES * W.LOCAL_DEVICES]
    place = {(p, i): local[p * W.LOCAL_DEVICES + i] for p in range(W.NUM_PROCESSES) for i in range(W.LOCAL_DEVICES)}
    process_of = {d: p for (p, _), d in place.items()}
    mesh = Mesh(W.mesh_devices(place), ("data", "model"))
    shardings = models.fsdp_shardings(shapes, mesh, "model", min_size=W.MIN_SIZE)
    out = [0] * W.NUM_PROCESSES
    for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        blocks = [set() for _ in out]
        for device, index in s.devices_indices_map(tuple(x.shape)).items():
            spans = tuple(sl.indices(n)[:2] for sl, n in zip(index, x.shape))
            blocks[process_of[device]].add(spans)
        for p, held in enumerate(blocks):
            out[p] += sum(int(np.prod([b - a for a, b in spans])) * itemsize for spans in held)
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The saved UNet folder, with the single-process params, forward and byte counts."""
    workdir = tmp_path_factory.mktemp("distributed")
    ref = R.build_sd15_unet()
    ref.torch_model.save_pretrained(workdir / "unet")
    stats = {}
    _, params = models.load_component(workdir, "unet", stats=stats)
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    np.savez(workdir / "reference_params.npz", **flat)
    np.savez(workdir / "inputs.npz", **ref.inputs)
    want = R.flax_forward(ref, params)
    spec = models.component_spec(workdir, "unet")
    return dict(workdir=workdir, flat=flat, want=want, stats=stats, spec=spec)


def test_two_process_fsdp_load_reads_own_shards_and_matches(single_process):
    workdir, flat, want = single_process["workdir"], single_process["flat"], single_process["want"]
    total = sum(v.nbytes for v in flat.values())
    assert single_process["stats"]["bytes_read"] == total
    assert {v.dtype for v in flat.values()} == {np.dtype(np.float32)}

    split = {k for k, v in flat.items() if any(a is not None for a in models.checkpoint.fsdp_spec(
        v.shape, W.MESH_SHAPE[1], "model", min_size=W.MIN_SIZE))}
    split_bytes = sum(flat[k].nbytes for k in split)
    replicated_bytes = total - split_bytes
    assert len(split) > 50 and split_bytes > 0.9 * total
    expected = _expected_bytes(single_process["spec"].shapes, 4)
    assert expected == [replicated_bytes + split_bytes // 2] * W.NUM_PROCESSES

    t0 = time.perf_counter()
    results = _run_workers(workdir)
    elapsed = time.perf_counter() - t0

    scale = np.abs(want).max()
    assert scale > 0.1
    for p, r in enumerate(results):
        assert bool(r["sharding_ok"]), p
        assert int(r["split_leaves"]) == len(split), p
        assert int(r["shards_checked"]) == len(flat) * W.LOCAL_DEVICES, p
        assert float(r["max_shard_diff"]) == 0.0, p
        assert not bool(r["out_fully_addressable"]), p  # the forward ran across both processes
        assert r["output"].shape == want.shape, p
        np.testing.assert_allclose(r["output"], want, atol=1e-5 * scale, rtol=0, err_msg=f"process {p}")
    read = [int(r["bytes_read"]) for r in results]
    assert read == expected, (read, expected, total)
    assert all(b <= 0.75 * total for b in read) and sum(read) >= total
    diff = max(float(np.abs(r["output"] - want).max()) for r in results) / scale
    print(f"\nbytes read per process {read} of {total} total "
          f"({[round(b / total, 3) for b in read]}); workers {elapsed:.1f} s, "
          f"load {[round(float(r['load_s']), 2) for r in results]} s, "
          f"forward {[round(float(r['forward_s']), 2) for r in results]} s; output max diff {diff:.1e} of max")
