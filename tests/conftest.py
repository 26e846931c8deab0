"""Test setup: 8 host CPU devices so sharding, shard_map and pmap run anywhere.

Compiled programs go to a persistent XLA cache for this run only (a fresh temporary folder, shared
with the worker processes some tests start): the suite compiles the same tiny models many times.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jlora-tests-xla-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def unet():
    """The tiny SD-1.5-shaped reference UNet (tests/reference.py)."""
    import reference

    return reference.build_sd15_unet()


@pytest.fixture(scope="session")
def clip():
    """The tiny CLIP text encoder reference."""
    import reference

    return reference.build_clip_text()


@pytest.fixture(scope="session")
def sd_file(tmp_path_factory, unet, clip):
    """A diffusers/PEFT SD LoRA file (UNet + text encoder, r=4, alpha=8) written by diffusers."""
    import reference

    return reference.make_peft_lora_file(tmp_path_factory.mktemp("sd"), [unet, clip], rank=4, alpha=8, pipeline="sd")
