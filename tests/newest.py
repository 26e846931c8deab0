"""Run reference computations in the second reference environment (the newest diffusers, no Flax).

diffusers 0.42.1 reads layouts (Flux.2, Z-Image, LTX-2, ...) that the main test environment's diffusers
0.35.2 does not, but it cannot be installed beside it. `.ci/run` builds it as `.venv-ref/` at the
repository root (torch 2.13.0 CPU, then `tests/requirements-newest.txt`); set `JLORA_NEWEST_PYTHON` to
use another interpreter. Tests call :func:`fused` (or :func:`call`), which runs `tests/newest_ref.py`
with that interpreter in a subprocess and returns its arrays.

Outside CI a missing environment skips the test with the reason; under `CI=true` it fails.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = pathlib.Path(__file__).resolve().parent / "newest_ref.py"


def python() -> pathlib.Path:
    """The interpreter of the second reference environment."""
    return pathlib.Path(os.environ.get("JLORA_NEWEST_PYTHON", ROOT / ".venv-ref" / "bin" / "python"))


def require() -> pathlib.Path:
    """The interpreter, or skip (fail under CI) when the environment is absent."""
    exe = python()
    if not exe.exists():
        message = (f"the newest-diffusers reference environment is absent ({exe}); build it with "
                   "`python3 -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 && "
                   ".venv-ref/bin/pip install -r tests/requirements-newest.txt`")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def call(op: str, **spec: Any) -> tuple[dict[str, np.ndarray], dict]:
    """Run `op` of tests/newest_ref.py with `spec` (JSON); returns (arrays, info)."""
    exe = require()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "out.npz"
        spec_file = pathlib.Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps({"op": op, "out": str(out), **spec}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
        env.update(HF_HUB_OFFLINE="1", DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error",
                   OMP_NUM_THREADS="1")
        proc = subprocess.run([str(exe), str(SCRIPT), str(spec_file)], capture_output=True, text=True,
                              env=env, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"reference script failed ({op}):\n{proc.stderr[-6000:]}")
        info = json.loads((pathlib.Path(tmp) / "out.json").read_text())
        with np.load(out) as data:
            arrays = {k: data[k] for k in data.files}
    return arrays, info


def fused(model: str, config: dict, lora: str | os.PathLike, *, mixin: str, seed: int = 0,
          scale: float = 1.0, component: str = "transformer", dtype: str = "float32") -> tuple[dict, dict, dict]:
    """Build diffusers' `model` from `config` (seeded), load `lora` with `mixin`, fuse at `scale`.

    Returns (base state dict, fused state dict, info) as numpy arrays in torch layout; `info` has
    `loaded` (the module names PEFT wrapped) and `warnings` (what diffusers logged).
    """
    arrays, info = call("fused", model=model, config=config, lora=str(lora), mixin=mixin, seed=seed,
                        scale=scale, component=component, dtype=dtype)
    base = {k[5:]: v for k, v in arrays.items() if k.startswith("base/")}
    out = {k[6:]: v for k, v in arrays.items() if k.startswith("fused/")}
    return base, out, info


def state_dict(model: str, config: dict, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The seeded initial state dict of diffusers' `model` built from `config`."""
    arrays, _ = call("state_dict", model=model, config=config, seed=seed)
    return arrays


def fused_many(cases: list[dict]) -> list[tuple[dict, dict, dict]]:
    """:func:`fused` for several cases in one subprocess; each case holds `fused`'s keyword arguments."""
    specs = [{"op": "fused", "seed": 0, "scale": 1.0, "component": "transformer", "dtype": "float32",
              **{k: (str(v) if k == "lora" else v) for k, v in c.items()}} for c in cases]
    arrays, info = call("batch", cases=specs)
    out = []
    for i, case_info in enumerate(info["cases"]):
        base = {k[len(f"{i}/base/"):]: v for k, v in arrays.items() if k.startswith(f"{i}/base/")}
        fused_sd = {k[len(f"{i}/fused/"):]: v for k, v in arrays.items() if k.startswith(f"{i}/fused/")}
        out.append((base, fused_sd, case_info))
    return out
