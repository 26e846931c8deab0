"""Where LoRA tensors come from: files, directories, the local Hugging Face cache, pickles, dicts.

The reference tensors are read with the `safetensors` library from a PEFT LoRA written by
diffusers for the tiny SD-1.5 UNet + CLIP text encoder (tests/reference.py). The Hub cache is
laid out by hand (no network) and checked against `huggingface_hub.try_to_load_from_cache`.
"""

import hashlib
import json
import os
import pickle
import shutil

import huggingface_hub
import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch

import jlora
import reference as R
from jlora import errors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


def assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, np.ndarray), (k, type(g))
        assert g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w), k


def assert_same_adapters(got, want):
    assert got.keys() == want.keys()
    for component in want:
        g_leaves, g_def = jax.tree_util.tree_flatten(got[component], is_leaf=jlora.is_adapter_leaf)
        w_leaves, w_def = jax.tree_util.tree_flatten(want[component], is_leaf=jlora.is_adapter_leaf)
        assert g_def == w_def, component
        assert sum(w is not None for w in w_leaves) > 0
        for g, w in zip(g_leaves, w_leaves):
            assert (g is None) == (w is None)
            if w is not None:
                for x, y in ((g.a, w.a), (g.b, w.b), (g.alpha, w.alpha)):
                    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save(path, tensors, metadata=None):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.fixture(scope="module")
def refs():
    return [R.build_sd15_unet(), R.build_clip_text()]


@pytest.fixture(scope="module")
def params(refs):
    return {ref.component: ref.flax_params for ref in refs}


@pytest.fixture(scope="module")
def lora(tmp_path_factory, refs):
    """(path, tensors, header) of the SD LoRA; tensors and header read with safetensors."""
    path = R.make_peft_lora_file(tmp_path_factory.mktemp("lora"), refs, rank=4, alpha=8, pipeline="sd")
    tensors, header = R.read_lora_file(path)
    return path, tensors, header


@pytest.fixture(scope="module")
def doubled(tmp_path_factory, lora):
    """(path, tensors) of a second LoRA: every factor of the first times 2, same header."""
    _, tensors, header = lora
    twice = {k: v * 2 for k, v in tensors.items()}
    return _save(tmp_path_factory.mktemp("doubled") / "doubled.safetensors", twice, header), twice


@pytest.fixture(scope="module")
def file_adapters(lora, params):
    return jlora.load_lora_weights(lora[0], params, family="sd")


# --------------------------------------------------------------------------------------------
# 1. directories
# --------------------------------------------------------------------------------------------


def test_directory_prefers_default_name(tmp_path, lora, doubled):
    shutil.copy(lora[0], tmp_path / WEIGHT_NAME)
    shutil.copy(doubled[0], tmp_path / "a_first_alphabetically.safetensors")
    assert_same_tensors(jlora.lora_state_dict(str(tmp_path)), lora[1])


def test_directory_with_one_other_safetensors(tmp_path, doubled):
    shutil.copy(doubled[0], tmp_path / "my_style.safetensors")
    (tmp_path / "README.md").write_text("not a weight file")
    assert_same_tensors(jlora.lora_state_dict(str(tmp_path)), doubled[1])


def test_directory_with_two_files_asks_for_weight_name(tmp_path, lora, doubled):
    shutil.copy(lora[0], tmp_path / "one.safetensors")
    shutil.copy(doubled[0], tmp_path / "two.safetensors")
    with pytest.raises(errors.LoraFileNotFoundError) as e:
        jlora.lora_state_dict(str(tmp_path))
    msg = str(e.value)
    assert "weight_name" in msg and "one.safetensors" in msg and "two.safetensors" in msg, msg
    assert_same_tensors(jlora.lora_state_dict(str(tmp_path), weight_name="two.safetensors"), doubled[1])
    assert_same_tensors(jlora.lora_state_dict(str(tmp_path), weight_name="one.safetensors"), lora[1])
    with pytest.raises(errors.LoraFileNotFoundError, match="three.safetensors"):
        jlora.lora_state_dict(str(tmp_path), weight_name="three.safetensors")


def test_subfolder_selects_the_file(tmp_path, lora, doubled):
    shutil.copy(lora[0], tmp_path / WEIGHT_NAME)
    os.makedirs(tmp_path / "sub")
    shutil.copy(doubled[0], tmp_path / "sub" / WEIGHT_NAME)
    shutil.copy(lora[0], tmp_path / "sub" / "plain.safetensors")
    assert_same_tensors(jlora.lora_state_dict(str(tmp_path)), lora[1])
    assert_same_tensors(jlora.lora_state_dict(str(tmp_path), subfolder="sub"), doubled[1])
    got = jlora.lora_state_dict(str(tmp_path), subfolder="sub", weight_name="plain.safetensors")
    assert_same_tensors(got, lora[1])


def test_missing_subfolder_or_empty_directory(tmp_path, lora):
    shutil.copy(lora[0], tmp_path / WEIGHT_NAME)
    with pytest.raises(errors.LoraFileNotFoundError, match="missing"):
        jlora.lora_state_dict(str(tmp_path), subfolder="missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(errors.LoraFileNotFoundError, match="weight_name"):
        jlora.lora_state_dict(str(tmp_path / "empty"))


def test_directory_with_only_a_legacy_bin(tmp_path, lora):
    torch.save({k: torch.from_numpy(v.copy()) for k, v in lora[1].items()}, tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(errors.LoraFileNotFoundError, match="allow_pickle"):
        jlora.lora_state_dict(str(tmp_path))
    assert_same_tensors(jlora.lora_state_dict(str(tmp_path), allow_pickle=True), lora[1])


# --------------------------------------------------------------------------------------------
# 2. the local Hugging Face cache
# --------------------------------------------------------------------------------------------

COMMIT = hashlib.sha1(b"jlora test snapshot").hexdigest()


def _cache_repo(cache_dir, repo_id, files):
    """Lay out `models--org--name/{refs/main, snapshots/<commit>/...}` as huggingface_hub does."""
    repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for name, src in files.items():
        dst = os.path.join(repo_dir, "snapshots", COMMIT, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(src, dst)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, lora, doubled):
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    _cache_repo(
        cache,
        "org/name",
        {WEIGHT_NAME: lora[0], "other.safetensors": doubled[0], f"sub/{WEIGHT_NAME}": doubled[0]},
    )
    _cache_repo(cache, "org/single", {"style.safetensors": doubled[0]})
    found = huggingface_hub.try_to_load_from_cache("org/name", WEIGHT_NAME, cache_dir=cache)
    assert isinstance(found, str) and found.endswith(os.path.join(COMMIT, WEIGHT_NAME)), found
    return cache


def test_hub_cache_default_file(hub_cache, lora):
    got = jlora.lora_state_dict("org/name", cache_dir=hub_cache, local_files_only=True)
    assert_same_tensors(got, lora[1])
    got = jlora.lora_state_dict("org/name", cache_dir=hub_cache, local_files_only=True, revision=COMMIT)
    assert_same_tensors(got, lora[1])


def test_hub_cache_weight_name_and_subfolder(hub_cache, doubled):
    kw = dict(cache_dir=hub_cache, local_files_only=True)
    assert_same_tensors(jlora.lora_state_dict("org/name", weight_name="other.safetensors", **kw), doubled[1])
    assert_same_tensors(jlora.lora_state_dict("org/name", subfolder="sub", **kw), doubled[1])


def test_hub_cache_single_non_default_file(hub_cache, doubled):
    got = jlora.lora_state_dict("org/single", cache_dir=hub_cache, local_files_only=True)
    assert_same_tensors(got, doubled[1])


def test_hub_cache_unknown_repo_or_file(hub_cache):
    with pytest.raises(errors.LoraFileNotFoundError, match="org/unknown") as e:
        jlora.lora_state_dict("org/unknown", cache_dir=hub_cache, local_files_only=True)
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(errors.LoraFileNotFoundError, match="nope.safetensors"):
        jlora.lora_state_dict("org/name", cache_dir=hub_cache, local_files_only=True, weight_name="nope.safetensors")


def test_hub_cache_load_lora_weights_matches_file(hub_cache, params, file_adapters):
    adapters = jlora.load_lora_weights("org/name", params, family="sd", cache_dir=hub_cache, local_files_only=True)
    assert_same_adapters(adapters, file_adapters)


# --------------------------------------------------------------------------------------------
# 3. legacy pickles
# --------------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_needs_allow_pickle(tmp_path, lora):
    path = str(tmp_path / "lora.bin")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in lora[1].items()}, path)
    with pytest.raises(errors.UnsafeFileError, match="allow_pickle") as e:
        jlora.lora_state_dict(path)
    assert path in str(e.value)
    assert_same_tensors(jlora.lora_state_dict(path, allow_pickle=True), lora[1])


def test_bin_loads_like_safetensors(tmp_path, lora, params, file_adapters):
    path = str(tmp_path / "lora.bin")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in lora[1].items()}, path)
    metadata = json.loads(lora[2]["lora_adapter_metadata"])
    adapters = jlora.load_lora_weights(path, params, family="sd", allow_pickle=True, metadata=metadata)
    assert_same_adapters(adapters, file_adapters)


@pytest.mark.parametrize("writer", ["pickle.dump", "torch.save"])
def test_malicious_pickle_is_refused(tmp_path, params, writer):
    marker = tmp_path / "pwned"
    payload = {"unet.x.lora_A.weight": _RunsCode(marker)}
    path = str(tmp_path / "evil.bin")
    if writer == "pickle.dump":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    for kwargs in ({}, {"allow_pickle": True}):
        with pytest.raises(errors.UnsafeFileError) as e:
            jlora.lora_state_dict(path, **kwargs)
        assert path in str(e.value)
        with pytest.raises(errors.UnsafeFileError):
            jlora.load_lora_weights(path, params, family="sd", **kwargs)
        assert not marker.exists()


def test_malicious_payload_is_live(tmp_path):
    """The payload used above does run code when unpickled naively (so refusing it means something)."""
    marker = tmp_path / "armed"
    with open(tmp_path / "twin.bin", "wb") as f:
        pickle.dump({"k": _RunsCode(marker)}, f)
    with open(tmp_path / "twin.bin", "rb") as f:
        pickle.load(f)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# 4. state dicts and metadata
# --------------------------------------------------------------------------------------------


def _dict_snapshot(sd):
    return [(k, id(v), np.array(v.numpy() if hasattr(v, "numpy") else v, copy=True)) for k, v in sd.items()]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_state_dict_loads_like_the_file_and_is_not_mutated(lora, params, file_adapters, kind):
    _, tensors, header = lora
    if kind == "numpy":
        sd = {k: v.copy() for k, v in tensors.items()}
    else:
        sd = {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}
    before = _dict_snapshot(sd)
    metadata = json.loads(header["lora_adapter_metadata"])
    adapters = jlora.load_lora_weights(sd, params, family="sd", metadata=metadata)
    assert_same_adapters(adapters, file_adapters)
    got = jlora.lora_state_dict(sd)
    assert got is not sd
    assert_same_tensors(got, tensors)
    after = _dict_snapshot(sd)
    assert [(k, i) for k, i, _ in after] == [(k, i) for k, i, _ in before]
    for (k, _, v), (_, _, w) in zip(after, before):
        assert np.array_equal(v, w), k


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_adapters_share_no_memory_with_the_state_dict(tmp_path, refs, params, kind, rank):
    """Changing the caller's tensors after a load leaves the adapter as loaded. Rank 1 makes the Flax-layout
    factors contiguous views of the caller's memory, which a device transfer could take over in place;
    rank 4 makes them transposed views."""
    tensors, header = R.read_lora_file(R.make_peft_lora_file(tmp_path, refs, rank=rank, alpha=rank, pipeline="sd"))
    sd = {k: torch.from_numpy(v.copy()) if kind == "torch" else v.copy() for k, v in tensors.items()}
    adapters = jlora.load_lora_weights(sd, params, family="sd", metadata=json.loads(header["lora_adapter_metadata"]))
    leaves = [x for x in jax.tree.leaves(adapters, is_leaf=jlora.is_adapter_leaf) if x is not None]
    before = [(np.array(x.a), np.array(x.b)) for x in leaves]
    for v in sd.values():
        v[...] = 7
    assert len(leaves) > 0
    for x, (a, b) in zip(leaves, before):
        np.testing.assert_array_equal(np.asarray(x.a), a)
        np.testing.assert_array_equal(np.asarray(x.b), b)


def test_dtype_casts_every_factor(lora, params, file_adapters):
    """`dtype=` casts the factors as numpy casts the file's tensors; alphas stay float32."""
    cast = jlora.load_lora_weights(lora[0], params, family="sd", dtype=ml_dtypes.bfloat16)
    pairs = [(g, w) for c in params
             for g, w in zip(jax.tree.leaves(cast[c], is_leaf=jlora.is_adapter_leaf),
                             jax.tree.leaves(file_adapters[c], is_leaf=jlora.is_adapter_leaf)) if w is not None]
    assert pairs
    for g, w in pairs:
        for x, y in ((g.a, w.a), (g.b, w.b)):
            assert x.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(ml_dtypes.bfloat16))
        assert g.alpha.dtype == np.float32 and float(g.alpha) == float(w.alpha)


@pytest.mark.parametrize("rank", [1, 4])
def test_adapters_do_not_read_the_file_after_loading(tmp_path, refs, params, rank):
    """The file is read through a memory map; overwriting it in place afterwards leaves the adapter as loaded."""
    path = R.make_peft_lora_file(tmp_path, refs, rank=rank, alpha=rank, pipeline="sd")
    adapters = jlora.load_lora_weights(path, params, family="sd")
    leaves = [x for x in jax.tree.leaves(adapters, is_leaf=jlora.is_adapter_leaf) if x is not None]
    before = [(np.array(x.a), np.array(x.b)) for x in leaves]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # same file, same length: only the data section changes
        (n,) = np.frombuffer(f.read(8), "<u8")
        f.seek(8 + int(n))
        f.write(b"\x7f" * (size - 8 - int(n)))
    assert len(leaves) > 0
    for x, (a, b) in zip(leaves, before):
        np.testing.assert_array_equal(np.asarray(x.a), a)
        np.testing.assert_array_equal(np.asarray(x.b), b)


def test_loading_leaves_the_garbage_collector_as_it_found_it(tmp_path, refs, params):
    """The collector is paused while a load runs and restored after it, also when the load raises; a caller
    that turned it off keeps it off."""
    import gc
    import threading

    path = R.make_peft_lora_file(tmp_path, refs, rank=2, alpha=2, pipeline="sd")
    seen = []
    real = jlora.loading._load_unpaused

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    assert gc.isenabled()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jlora.loading, "_load_unpaused", spy)
        jlora.load_lora_weights(path, params, family="sd")
        with pytest.raises(errors.JloraError):
            jlora.load_lora_weights(str(tmp_path / "missing.safetensors"), params, family="sd")
        assert gc.isenabled() and seen == [False, False]
        threads = [threading.Thread(target=jlora.load_lora_weights, args=(path, params), kwargs=dict(family="sd")) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert gc.isenabled() and len(seen) == 6
        gc.disable()
        try:
            jlora.load_lora_weights(path, params, family="sd")
            assert not gc.isenabled()
        finally:
            gc.enable()


def test_state_dict_without_metadata_uses_alpha_equal_rank(lora, params):
    """No header and no `.alpha` keys: alpha = rank (scale 1), as diffusers does for such files."""
    adapters, report = jlora.load_lora_weights(dict(lora[1]), params, family="sd", return_report=True)
    leaves = [l for l in jax.tree.leaves(adapters, is_leaf=jlora.is_adapter_leaf) if l is not None]
    assert len(leaves) == len(report.placed) > 0
    assert all(float(l.alpha) == l.rank == 4 for l in leaves)
    assert report.origin == "<state dict>"


def test_bfloat16_torch_state_dict(lora):
    sd = {k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in lora[1].items()}
    got = jlora.lora_state_dict(sd)
    assert sorted(got) == sorted(sd)
    for k, t in sd.items():
        assert got[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[k].astype(np.float32), t.to(torch.float32).numpy())


def test_return_lora_metadata(lora):
    path, tensors, header = lora
    got, metadata = jlora.lora_state_dict(path, return_lora_metadata=True)
    assert_same_tensors(got, tensors)
    assert metadata == json.loads(header["lora_adapter_metadata"])
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8
    assert metadata["text_encoder.r"] == 4 and metadata["text_encoder.lora_alpha"] == 8
    assert "q_proj" in metadata["text_encoder.target_modules"]
    _, empty = jlora.lora_state_dict(dict(tensors), return_lora_metadata=True)
    assert empty == {}


_STALLED_CLIENT = """
import sys, time
sys.path.insert(0, {root!r})
from converters import sources
from converters.errors import HubTimeoutError
start = time.perf_counter()
try:
    sources.resolve_path("someorg/somerepo")
    print("resolved")
except HubTimeoutError as e:
    print("HubTimeoutError", round(time.perf_counter() - start, 1), str(e)[:80])
"""


def test_a_stalled_hub_endpoint_times_out_with_a_typed_error(tmp_path):
    """A server that accepts connections and never answers: the lookup gives up after
    JLORA_HUB_TIMEOUT seconds with HubTimeoutError, and the process exits."""
    import socket
    import subprocess
    import sys

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "JLORA_HUB_TIMEOUT": "3",
           "HF_HOME": str(tmp_path / "hf")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run([sys.executable, "-c", _STALLED_CLIENT.format(root=root)], capture_output=True, text=True,
                             timeout=60, env=env)
    finally:
        server.close()
    assert out.returncode == 0, out.stderr[-2000:]
    word, seconds, *_ = out.stdout.split()
    assert word == "HubTimeoutError" and float(seconds) < 10, out.stdout


def test_offline_hub_lookup_says_it_is_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(errors.LoraFileNotFoundError, match="offline"):
        jlora.lora_state_dict("someorg/somerepo", local_files_only=True)
