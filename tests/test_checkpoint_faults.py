"""Training checkpoints under faults: typed `CheckpointError`s, committed steps only, no hang at exit."""

import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jlora import errors, training


def _state(v=1.0):
    return {"adapter": {"a": jnp.full((4, 3), v), "b": jnp.arange(6.0)}, "step": 0}


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    training.save_checkpoint(d, 2, _state(2.0))
    training.save_checkpoint(d, 4, _state(4.0))
    return d


def test_a_stray_numbered_folder_is_not_a_step(ckpt):
    os.mkdir(ckpt / "7")
    (ckpt / "9.orbax-checkpoint-tmp-123").mkdir()
    assert training.committed_steps(ckpt) == [2, 4] and training.latest_step(ckpt) == 4
    got = training.restore_checkpoint(ckpt, _state())
    np.testing.assert_array_equal(np.asarray(got["adapter"]["a"]), np.full((4, 3), 4.0))
    with pytest.raises(errors.CheckpointNotFoundError, match=r"step 7.*\[2, 4\]"):
        training.restore_checkpoint(ckpt, _state(), step=7)


def test_truncated_data_is_a_typed_error(ckpt):
    files = [os.path.join(r, f) for r, _, fs in os.walk(ckpt / "4" / "default") for f in fs if "/d/" in os.path.join(r, f)]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(max(0, os.path.getsize(f) // 3))
    with pytest.raises(errors.CheckpointError, match="checkpoint 4"):
        training.restore_checkpoint(ckpt, _state())


def test_deleted_metadata_is_a_typed_error(ckpt):
    os.remove(ckpt / "4" / "default" / "_METADATA")
    with pytest.raises(errors.CheckpointError, match="checkpoint 4"):
        training.restore_checkpoint(ckpt, _state())


def test_a_deleted_step_folder_leaves_the_earlier_ones(ckpt):
    shutil.rmtree(ckpt / "4" / "default")
    with pytest.raises(errors.CheckpointError):
        training.restore_checkpoint(ckpt, _state())
    got = training.restore_checkpoint(ckpt, _state(), step=2)
    np.testing.assert_array_equal(np.asarray(got["adapter"]["a"]), np.full((4, 3), 2.0))


def test_a_second_writer_gets_a_typed_error(ckpt):
    with training._Lock(ckpt):
        with pytest.raises(errors.CheckpointLockedError, match="another process"):
            training.save_checkpoint(ckpt, 6, _state())
    training.save_checkpoint(ckpt, 6, _state(6.0))  # the lock is released
    assert training.latest_step(ckpt) == 6


@pytest.mark.parametrize("step", [-1, True, 2.5, "3"])
def test_bad_step_numbers(ckpt, step):
    with pytest.raises(errors.CheckpointError, match="step"):
        training.save_checkpoint(ckpt, step, _state())


def test_restore_step_must_be_an_integer(ckpt):
    with pytest.raises(errors.CheckpointError, match="step"):
        training.restore_checkpoint(ckpt, _state(), step="latest")


def test_an_earlier_step_is_refused(ckpt):
    with pytest.raises(errors.CheckpointError, match="already holds step 4"):
        training.save_checkpoint(ckpt, 3, _state())


_SAVE_INTO_A_FILE = """
import sys
sys.path.insert(0, {root!r})
import jax.numpy as jnp
from jlora import errors, training
try:
    training.save_checkpoint({path!r}, 1, {{"a": jnp.ones(3)}})
except errors.CheckpointError as e:
    print("CheckpointError", str(e)[:60])
"""


def test_saving_into_a_file_fails_and_the_process_exits(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SAVE_INTO_A_FILE.format(root=root, path=str(path))],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stdout.startswith("CheckpointError"), (out.stdout, out.stderr[-1000:])
    assert path.read_text() == "not a directory"
