"""Helpers of the tests that start several jax processes on localhost (CPU devices, gloo collectives)."""

import os
import socket


def free_port() -> int:
    """A localhost TCP port nobody listens on (for the jax.distributed coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def tail(path, n: int = 6000) -> str:
    """The last `n` characters of a worker's log, for a failure message."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "<none>"


def cpu_worker_environment(local_devices: int) -> None:
    """In a worker's `__main__`: CPU only, `local_devices` host devices, offline and quiet libraries."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={local_devices}")
    for key, value in (("HF_HUB_OFFLINE", "1"), ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(key, value)
