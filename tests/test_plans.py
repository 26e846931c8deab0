"""Conversion plans: a file of a structure converted before is bound to that conversion's plan.

Reference: diffusers + PEFT in PyTorch. PEFT files are written by diffusers' `save_lora_weights`
and fused by diffusers' `fuse_lora`; kohya files hold PEFT's factors under kohya names and are
checked against `W + alpha / r * up @ down` formed in torch (tests/sd_formats.py). Each check
loads a file after others of the same keys, shapes and dtypes, so it replays the plan they left,
and compares the result with the reference for that file. (A structure's first conversion only
marks it seen, its second one keeps the plan, later ones replay it.)
"""

import importlib
import os
import warnings

import jax
import numpy as np
import pytest

import jlora
import reference as R
import sd_formats as F
from converters import plans

convert_module = importlib.import_module("converters.convert")


@pytest.fixture
def fresh_conversions(monkeypatch):
    """The number of conversions run through the rule tables (not replayed) since the test began."""
    plans.clear()
    calls = []
    fresh = convert_module._convert_fresh

    def counted(*args):
        calls.append(args[-2])  # origin
        return fresh(*args)

    monkeypatch.setattr(convert_module, "_convert_fresh", counted)
    yield calls
    plans.clear()


def _fused(ref, adapter):
    return jax.tree_util.tree_map(np.asarray, jlora.fuse(ref.flax_params, adapter))


def _assert_close(got, want, base, what):
    flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(base)[0])
    changed = 0
    for k, w in flat_w.items():
        err = np.abs(flat_g[k] - w).max()
        assert err <= 1e-5 * max(np.abs(w).max(), 1e-6), (what, jax.tree_util.keystr(k), err)
        changed += not np.array_equal(np.asarray(flat_b[k]), w)
    assert changed > 0, what


def _same(a, b):
    la = jax.tree.leaves(a, is_leaf=jlora.is_adapter_leaf)
    lb = jax.tree.leaves(b, is_leaf=jlora.is_adapter_leaf)
    assert len(la) == len(lb)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_peft_files_of_one_structure_replay_and_match_diffusers(unet, tmp_path, fresh_conversions):
    paths = [R.make_peft_lora_file(tmp_path / str(seed), [unet], rank=4, alpha=8, seed=seed) for seed in (1, 2, 3)]
    adapters = [jlora.load_lora(p, unet.flax_params, "unet") for p in paths]
    assert fresh_conversions == paths[:2]  # the third was bound to the plan the second one kept
    for path, adapter in zip(paths, adapters):
        _assert_close(_fused(unet, adapter), R.torch_fused_flax_params(unet, path), unet.flax_params, path)
    plans.clear()
    _same(jlora.load_lora(paths[2], unet.flax_params, "unet"), adapters[2])
    assert len(fresh_conversions) == 3


def test_other_alphas_or_metadata_are_another_plan(unet, tmp_path, fresh_conversions):
    factors = [F.peft_factors(unet, rank=4, alpha=8, seed=s) for s in (1, 2)]
    halved = {m: F.Factor(f.down, f.up, f.alpha / 2 if i % 2 else f.alpha) for i, (m, f) in enumerate(factors[1].items())}
    kohya = [F.write_kohya(tmp_path / f"k{i}.safetensors", {"unet": f}, "sd") for i, f in enumerate((factors[0], factors[1], halved))]
    got = [jlora.load_lora(p, unet.flax_params, "unet") for p in (kohya[0], kohya[0], kohya[1], kohya[2])][1:]
    assert fresh_conversions == [kohya[0], kohya[0], kohya[2]]  # the alphas' values are part of a plan's signature
    for adapter, f in zip(got, (factors[0], factors[1], halved)):
        _assert_close(_fused(unet, adapter), F.flax_params_with_deltas(unet, f), unet.flax_params, "kohya")

    peft = [R.make_peft_lora_file(tmp_path / f"p{a}", [unet], rank=4, alpha=a, seed=1) for a in (8, 2)]
    adapters = [jlora.load_lora(p, unet.flax_params, "unet") for p in (peft[0], peft[0], peft[1])][1:]
    assert fresh_conversions[3:] == [peft[0], peft[0], peft[1]]  # the same tensors under another header
    for path, adapter in zip(peft, adapters):
        _assert_close(_fused(unet, adapter), R.torch_fused_flax_params(unet, path), unet.flax_params, path)


def test_a_replayed_file_is_read_again(unet, tmp_path, fresh_conversions):
    """A plan holds where each array lies in its tensor, never the tensors: a file replaced under the same
    name reads its new values."""
    path = R.make_peft_lora_file(tmp_path / "a", [unet], rank=4, alpha=8, seed=1)
    jlora.load_lora(path, unet.flax_params, "unet")
    first = jlora.load_lora(path, unet.flax_params, "unet")
    other = R.make_peft_lora_file(tmp_path / "b", [unet], rank=4, alpha=8, seed=2)
    os.replace(other, path)
    second = jlora.load_lora(path, unet.flax_params, "unet")
    assert len(fresh_conversions) == 2
    _assert_close(_fused(unet, second), R.torch_fused_flax_params(unet, path), unet.flax_params, "replaced")
    assert not np.allclose(np.asarray(jax.tree.leaves(first)[0]), np.asarray(jax.tree.leaves(second)[0]))


def test_state_dicts_sharing_arrays_are_not_kept(unet, tmp_path, fresh_conversions):
    """Two keys naming one array cannot say which key a view came from: no plan is kept for them, so the next
    dict (distinct arrays) is converted afresh and gets its own values."""
    path = R.make_peft_lora_file(tmp_path / "a", [unet], rank=4, alpha=4, seed=1, with_metadata=False)
    tensors, _ = R.read_lora_file(path)
    down = sorted(k for k in tensors if k.endswith("attn1.to_k.lora_A.weight"))[0]
    tied = dict(tensors)
    tied[down.replace("to_k", "to_v")] = tied[down]
    jlora.load_lora(tied, unet.flax_params, "unet")
    jlora.load_lora(tied, unet.flax_params, "unet")
    own = {k: v.copy() for k, v in tensors.items()}
    got = jlora.load_lora(own, unet.flax_params, "unet")
    assert len(fresh_conversions) == 3
    _assert_close(_fused(unet, got), R.torch_fused_flax_params(unet, path), unet.flax_params, "own arrays")

    # distinct arrays: the plan is kept, and a dict changed in place afterwards is read as it is now
    for v in own.values():
        v *= 2
    doubled = jlora.load_lora(own, unet.flax_params, "unet")
    assert len(fresh_conversions) == 3
    for x, y in zip(jax.tree.leaves(doubled), jax.tree.leaves(got)):
        if np.ndim(x) == 2:
            np.testing.assert_allclose(np.asarray(x), 2 * np.asarray(y), rtol=1e-6)


def test_replayed_reports_are_the_new_files_and_warn_again(unet, tmp_path, fresh_conversions):
    reports, paths = [], []
    for seed in (1, 2):
        original = R.make_peft_lora_file(tmp_path / str(seed), [unet], rank=4, alpha=8, seed=seed)
        tensors, header = R.read_lora_file(original)
        tensors["unet.no_such_block.to_q.lora_A.weight"] = np.zeros((4, 8), np.float32)
        tensors["unet.no_such_block.to_q.lora_B.weight"] = np.zeros((8, 4), np.float32)
        paths.append(_save_with_header(str(tmp_path / f"extra{seed}.safetensors"), tensors, header))
        with pytest.warns(UserWarning, match="2 keys not loaded"):
            adapter, report = jlora.load_lora(paths[-1], unet.flax_params, "unet", strict=False, return_report=True)
        reports.append(report)
        _assert_close(_fused(unet, adapter), R.torch_fused_flax_params(unet, original), unet.flax_params, original)
    with pytest.warns(UserWarning, match="2 keys not loaded"):
        third = jlora.load_lora(paths[0], unet.flax_params, "unet", strict=False, return_report=True)[1]
    assert fresh_conversions == paths  # the third load replayed the plan the second one kept
    assert [r.origin for r in reports + [third]] == paths + paths[:1]
    assert sorted(reports[1].unplaced) == sorted(third.unplaced) and len(third.unplaced) == 2
    reports[1].placed.clear()
    reports[1].metadata.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fourth = jlora.load_lora(paths[1], unet.flax_params, "unet", strict=False, return_report=True)[1]
    assert fourth.placed == third.placed and fourth.metadata == third.metadata and fourth.placed


def _save_with_header(path, tensors, header):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=header)
    return path


def test_stacked_or_computed_conversions_are_not_kept(unet, tmp_path, fresh_conversions):
    """A conversion that computes arrays (a Tucker core folded into the down factor) keeps no plan."""
    factors = F.peft_factors(unet, rank=4, alpha=8, seed=1)
    conv = next(m for m in factors if m.endswith("resnets.0.conv1"))
    f = factors[conv]
    rng = np.random.default_rng(0)
    name = F.kohya_module_name("unet", conv, "sd")
    tucker = {
        f"{name}.lora_down.weight": rng.standard_normal(f.down.shape[:2] + (1, 1)).astype(np.float32) * 0.1,
        f"{name}.lora_mid.weight": rng.standard_normal((f.rank, f.rank) + f.down.shape[2:]).astype(np.float32) * 0.1,
        f"{name}.lora_up.weight": rng.standard_normal(f.up.shape).astype(np.float32) * 0.1,
        f"{name}.alpha": np.asarray(f.rank, np.float32),
    }
    path = F._save(tmp_path / "tucker.safetensors", tucker)
    first = jlora.load_lora(path, unet.flax_params, "unet")
    jlora.load_lora(path, unet.flax_params, "unet")
    third = jlora.load_lora(path, unet.flax_params, "unet")
    assert fresh_conversions == [path] * 3
    _same(first, third)


def test_other_target_shapes_are_another_plan(unet, tmp_path, fresh_conversions):
    """The params' shapes are part of the signature: a kernel of another shape is refused as a fresh load
    refuses it, after the same file was replayed onto the right params."""
    path = R.make_peft_lora_file(tmp_path / "a", [unet], rank=4, alpha=8, seed=1)
    for _ in range(3):
        adapter = jlora.load_lora(path, unet.flax_params, "unet")
    assert len(fresh_conversions) == 2
    _assert_close(_fused(unet, adapter), R.torch_fused_flax_params(unet, path), unet.flax_params, path)
    flat = jax.tree_util.tree_flatten_with_path(unet.flax_params)[0]
    target = next(kp for kp, x in flat if jax.tree_util.keystr(kp).endswith("['to_q']['kernel']"))
    wider = jax.tree_util.tree_map_with_path(
        lambda kp, x: jax.ShapeDtypeStruct((x.shape[0], x.shape[1] + 1), x.dtype) if kp == target else x,
        unet.flax_params)
    with pytest.raises(jlora.errors.ShapeMismatchError, match="to_q"):
        jlora.load_lora(path, wider, "unet")
    assert len(fresh_conversions) == 3
