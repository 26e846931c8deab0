"""One process of the 2-process `jax.distributed` run of tests/test_distributed.py.

    python tests/distributed_worker.py PORT PROCESS_ID WORKDIR

Joins a 2-process CPU cluster on localhost:PORT (4 devices per process), loads WORKDIR/unet with
FSDP shardings over a ("data", "model") mesh whose model axis spans both processes, checks every
shard it holds against WORKDIR/reference_params.npz, runs the jitted forward on
WORKDIR/inputs.npz and writes WORKDIR/result_{PROCESS_ID}.npz (bytes read, shard check, output).
"""

import os
import sys
import time

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
MESH_SHAPE = (2, 4)  # ("data", "model")
MIN_SIZE = 64


def mesh_devices(devices):
    """The (2, 4) device grid: model positions 0-1 on process 0, 2-3 on process 1, both data rows each.

    `devices` is `{(process_index, local_position): device}`.
    """
    import numpy as np

    grid = np.empty(MESH_SHAPE, dtype=object)
    for data in range(MESH_SHAPE[0]):
        for model in range(MESH_SHAPE[1]):
            process, half = divmod(model, MESH_SHAPE[1] // NUM_PROCESSES)
            grid[data, model] = devices[(process, data * (MESH_SHAPE[1] // NUM_PROCESSES) + half)]
    return grid


def main(port: int, process_id: int, workdir: str) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=90,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=60,
    )
    try:
        run(process_id, workdir)
    finally:
        jax.distributed.shutdown()


def run(process_id: int, workdir: str) -> None:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jlora import models

    assert jax.process_count() == NUM_PROCESSES and jax.process_index() == process_id
    assert jax.local_device_count() == LOCAL_DEVICES and jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
    by_place = {}
    for p in range(NUM_PROCESSES):
        local = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        by_place.update({(p, i): d for i, d in enumerate(local)})
    mesh = Mesh(mesh_devices(by_place), ("data", "model"))

    path = os.path.join(workdir, "unet")
    spec = models.component_spec(path)
    shardings = models.fsdp_shardings(spec.shapes, mesh, "model", min_size=MIN_SIZE)
    stats = {}
    t0 = time.perf_counter()
    model, params = models.load_component(path, shardings=shardings, stats=stats)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0

    # Every shard this process holds equals the single-process params at that index.
    want = np.load(os.path.join(workdir, "reference_params.npz"))
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    flat_shardings = jax.tree.leaves(shardings)
    shards = split_leaves = 0
    max_diff = 0.0
    sharding_ok = True
    for (kp, x), s in zip(flat, flat_shardings):
        name = "/".join(k.key for k in kp)
        split = any(a is not None for a in x.sharding.spec)
        split_leaves += split
        # The leaf spans both processes; this one holds half of a split leaf, all of a replicated one.
        blocks = {tuple(sl.indices(n)[:2] for sl, n in zip(sh.index, x.shape)) for sh in x.addressable_shards}
        held = sum(int(np.prod([b - a for a, b in spans])) for spans in blocks)
        sharding_ok &= x.sharding == s and not x.is_fully_addressable and held * (2 if split else 1) == x.size
        full = want[name]
        for shard in x.addressable_shards:
            assert shard.device.process_index == process_id
            diff = np.abs(np.asarray(shard.data, np.float64) - full[shard.index]).max(initial=0.0)
            max_diff = max(max_diff, float(diff))
            shards += 1

    inputs = dict(np.load(os.path.join(workdir, "inputs.npz")))
    batch = NamedSharding(mesh, P("data"))
    global_inputs = {k: jax.make_array_from_callback(v.shape, batch, lambda idx, v=v: v[idx])
                     for k, v in inputs.items()}

    @jax.jit
    def forward(params, sample, timesteps, encoder_hidden_states):
        return model.apply({"params": params}, sample, timesteps, encoder_hidden_states, None, train=False).sample

    t0 = time.perf_counter()
    out = forward(params, **global_inputs)
    gathered = np.asarray(multihost_utils.process_allgather(out, tiled=True))
    forward_s = time.perf_counter() - t0
    multihost_utils.sync_global_devices("jlora_distributed_test_done")

    np.savez(
        os.path.join(workdir, f"result_{process_id}.npz"),
        bytes_read=np.int64(stats["bytes_read"]),
        shards_checked=np.int64(shards),
        split_leaves=np.int64(split_leaves),
        max_shard_diff=np.float64(max_diff),
        sharding_ok=np.bool_(sharding_ok),
        output=gathered,
        out_fully_addressable=np.bool_(out.is_fully_addressable),
        load_s=np.float64(load_s),
        forward_s=np.float64(forward_s),
    )


if __name__ == "__main__":
    from multiprocess import cpu_worker_environment

    cpu_worker_environment(LOCAL_DEVICES)
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
