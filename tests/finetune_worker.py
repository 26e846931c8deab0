"""One process of the `scripts/finetune.py` runs of tests/test_distributed_training.py.

    python tests/finetune_worker.py PORT PROCESS_ID RECORD_JSON -- FINETUNE_ARGS... [-- FINETUNE_ARGS...]

With a PORT, the process joins a 2-process CPU cluster on localhost:PORT (4 devices per process):
`jax.distributed.initialize()` without arguments finds the cluster only on the environments jax
detects (SLURM, Open MPI, Kubernetes, Cloud TPU), so the worker points the script's
`initialize()` call at localhost:PORT and runs `finetune.main(FINETUNE_ARGS + ["--distributed"])`
unchanged (the cluster is formed once: later argument groups run without `--distributed`).
With PORT `-`, it is a single process on the devices it has (the reference), each group run as is.

An audit hook records every file the process opens for writing, or renames, outside each run's
checkpoint folder; RECORD_JSON gets those paths per run, the process index and the device counts.
"""

import functools
import json
import os
import sys

NUM_PROCESSES = 2
LOCAL_DEVICES = 4

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "scripts")

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _value_of(option: str, argv: list[str]) -> str:
    return argv[argv.index(option) + 1]


def _recorder(out_dir: str, written: list[str]):
    """An audit hook collecting the paths under `out_dir` (not under its checkpoints/) that are
    opened for writing, or that a rename or replace moves a file to or from."""
    out_dir = os.path.realpath(out_dir)
    checkpoints = os.path.join(out_dir, "checkpoints")

    def keep(path) -> None:
        if isinstance(path, int) or path is None:
            return
        try:
            path = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if (path == out_dir or path.startswith(out_dir + os.sep)) and not (
                path == checkpoints or path.startswith(checkpoints + os.sep)):
            written.append(path)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _WRITE_FLAGS):
                keep(path)
        elif event in ("os.rename", "os.replace", "shutil.move", "shutil.copyfile"):
            keep(args[0])
            keep(args[1])

    return hook


def main(port: str, process_id: int, record: str, runs: list[list[str]]) -> None:
    import jax

    distributed = port != "-"
    if distributed:
        jax.distributed.initialize = functools.partial(
            jax.distributed.initialize,
            coordinator_address=f"localhost:{port}",
            num_processes=NUM_PROCESSES,
            process_id=process_id,
            initialization_timeout=90,
            heartbeat_timeout_seconds=30,
            shutdown_timeout_seconds=60,
        )
    sys.path.insert(0, SCRIPTS)
    import finetune

    recorders, written = [], []  # the current run's audit hook; the paths each run wrote

    def hook(event, args):
        if recorders:
            recorders[-1](event, args)

    sys.addaudithook(hook)
    codes = []
    try:
        for i, args in enumerate(runs):
            written.append([])
            recorders.append(_recorder(_value_of("--out", args), written[-1]))
            extra = ["--distributed"] if distributed and i == 0 else []
            codes.append(finetune.main(list(args) + extra))
        info = {
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "local_device_count": jax.local_device_count(),
            "device_count": jax.device_count(),
        }
        if distributed:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jlora_finetune_worker_done")
    finally:
        if distributed:
            jax.distributed.shutdown()
    with open(record, "w") as f:
        json.dump({"exit": codes, "written": [sorted(set(w)) for w in written], **info}, f)


def _groups(argv: list[str]) -> list[list[str]]:
    """The argument groups after each `--`."""
    groups = []
    for arg in argv:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    return groups


if __name__ == "__main__":
    from multiprocess import cpu_worker_environment

    cpu_worker_environment(LOCAL_DEVICES)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], _groups(sys.argv[4:]))
