"""`scripts/train_lora.py --distributed` on 2 processes (localhost, CPU, 4 devices each) against 1 process
with 8: the tiny SD pipeline, a UNet + text-encoder LoRA on a mesh of data 4 x model 2 that spans both
processes. The written LoRA file and the final checkpoint must equal the single-process run's, and only
process 0 writes the LoRA file.
"""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import pipelines_ref as P
from converters.safetensors_io import load_file
from multiprocess import free_port, tail

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 300


def _photos(folder):
    rng = np.random.default_rng(1)
    for i, caption in enumerate(["a red cat", "a blue dog", "a green river", "a cat in the city"]):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    return str(folder)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def test_two_processes_train_the_single_process_lora(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    args = ["--model", P.pipeline_dir("sd"), "--data", _photos(photos), "--resolution", "32", "--batch", "4",
            "--rank", "4", "--lr", "5e-3", "--steps", "2", "--save-every", "2", "--no-progress",
            "--train-text-encoder", "--model-parallel", "2", "--seed", "2"]
    port = free_port()
    runs = {"single": (8, ["--out", str(tmp_path / "single")])}
    for i in range(2):
        runs[f"worker_{i}"] = (4, ["--out", str(tmp_path / "multi"), "--distributed", "--coordinator",
                                   f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)])
    procs, logs = {}, {}
    try:
        for name, (devices, extra) in runs.items():
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "train_lora_worker.py"), str(devices), "--", *args, *extra],
                    env=_env(devices), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.2)
        codes = {name: p.poll() for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    if any(c != 0 for c in codes.values()):
        pytest.fail(f"train_lora runs: exit codes {codes} (limit {TIMEOUT_S} s)\n"
                    + "\n".join(f"--- {n} ---\n{tail(path)}" for n, path in logs.items()))
    single = load_file(tmp_path / "single" / "pytorch_lora_weights.safetensors")[0]
    multi = load_file(tmp_path / "multi" / "pytorch_lora_weights.safetensors")[0]
    assert single.keys() == multi.keys() and any(k.startswith("text_encoder.") for k in single)
    for k in single:  # cross-process reductions sum in another order: 0.2% of one AdamW step (lr 5e-3)
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert "wrote" in logs["worker_0"].read_text() and "wrote" not in logs["worker_1"].read_text()
    from jlora import training

    assert training.committed_steps(tmp_path / "multi" / "checkpoints") == [2]
