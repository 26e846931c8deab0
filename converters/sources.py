"""Find a LoRA file (local path, directory, Hub repo or HF cache) and read its tensors.

safetensors is read with jlora's own validating reader. Pickled `.bin`/`.pt`
files are read only when the caller passes `allow_pickle=True`, and then only
through `torch.load(weights_only=True)`, which refuses pickles that run code.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np

from converters import safetensors_io
from converters.errors import (CorruptFileError, HubTimeoutError, JloraError, LoraFileNotFoundError, ShapeMismatchError,
                               UnsafeFileError)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LEGACY_WEIGHT_NAME = "pytorch_lora_weights.bin"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _pick_in_directory(directory: str, weight_name: str | None, allow_pickle: bool) -> str:
    if weight_name is not None:
        path = os.path.join(directory, weight_name)
        if not os.path.isfile(path):
            raise LoraFileNotFoundError(f"{path}: no such file (weight_name={weight_name!r} in {directory}).")
        return path
    if not os.path.isdir(directory):
        raise LoraFileNotFoundError(f"{directory}: no such directory; check subfolder=.")
    for name in (WEIGHT_NAME, LEGACY_WEIGHT_NAME if allow_pickle else None):
        if name and os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files and allow_pickle:
        files = sorted(f for f in os.listdir(directory) if f.endswith(_PICKLE_SUFFIXES))
    if len(files) == 1:
        return os.path.join(directory, files[0])
    if not files:
        raise LoraFileNotFoundError(
            f"{directory}: no .safetensors file in this directory; pass weight_name= to name the file "
            "(pickled .bin files also need allow_pickle=True)."
        )
    raise LoraFileNotFoundError(f"{directory}: several weight files {files}; pass weight_name= to pick one.")


HUB_TIMEOUT_ENV = "JLORA_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 120.0


def hub_timeout() -> float:
    """Seconds a Hub lookup may take in all (`JLORA_HUB_TIMEOUT`, default 120)."""
    try:
        value = float(os.environ.get(HUB_TIMEOUT_ENV, DEFAULT_HUB_TIMEOUT))
    except ValueError:
        return DEFAULT_HUB_TIMEOUT
    return value if value > 0 else DEFAULT_HUB_TIMEOUT


def _bounded(fn, seconds: float, what: str):
    """`fn()` in a daemon thread, waited for at most `seconds`: a server that accepts connections and
    never answers cannot hang the caller (or the interpreter's exit)."""
    import threading

    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=run, name="jlora-hub", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise HubTimeoutError(f"{what}: the Hugging Face Hub did not answer within {seconds:g} s (network, or a "
                              f"stalled endpoint); set {HUB_TIMEOUT_ENV} to wait longer, or pass a local path.")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _from_hub(repo_id: str, weight_name, subfolder, allow_pickle, **hub_kwargs) -> str:
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    timeout = hub_timeout()
    download = dict(hub_kwargs, etag_timeout=min(10.0, timeout))

    def fetch():
        if weight_name is not None:
            return huggingface_hub.hf_hub_download(repo_id, weight_name, subfolder=subfolder, **download)
        try:
            return huggingface_hub.hf_hub_download(repo_id, WEIGHT_NAME, subfolder=subfolder, **download)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            patterns = ["*.safetensors"] + ([f"*{s}" for s in _PICKLE_SUFFIXES] if allow_pickle else [])
            if subfolder:
                patterns = [f"{subfolder}/{p}" for p in patterns]
            root = huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=min(10.0, timeout),
                                                     **hub_kwargs)
            return _pick_in_directory(os.path.join(root, subfolder or ""), None, allow_pickle)

    name = f"{weight_name or WEIGHT_NAME!r}{f' in {subfolder!r}' if subfolder else ''}"
    try:
        return _bounded(fetch, timeout, repr(repo_id))
    except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, OSError, ValueError) as e:
        if isinstance(e, JloraError):
            raise
        offline = bool(hub_kwargs.get("local_files_only")) or huggingface_hub.constants.HF_HUB_OFFLINE
        if offline:
            why = ("offline (HF_HUB_OFFLINE or local_files_only) and the local Hugging Face cache does not hold "
                   f"{name}")
        elif isinstance(e, (EntryNotFoundError,)):
            why = f"the Hub repo has no {name}"
        elif isinstance(e, HfHubHTTPError) and getattr(getattr(e, "response", None), "status_code", None) in (401, 403, 404):
            why = f"the Hub has no such repo, or it is private or gated (HTTP {e.response.status_code})"
        elif isinstance(e, (LocalEntryNotFoundError, OSError)):
            why = f"the Hub could not be reached ({type(e).__name__}) and the cache does not hold {name}"
        else:
            why = f"the Hub gave no {name} ({type(e).__name__})"
        raise LoraFileNotFoundError(
            f"{repo_id!r}: not a local file or directory, and {why}. Check the path, repo id, weight_name and subfolder."
        ) from None


def resolve_path(
    source: str | os.PathLike,
    *,
    weight_name: str | None = None,
    subfolder: str | None = None,
    allow_pickle: bool = False,
    local_files_only: bool | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> str:
    """Turn a file path, a directory or a Hub repo id into the path of one weight file."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        return _pick_in_directory(os.path.join(source, subfolder or ""), weight_name, allow_pickle)
    if os.path.lexists(source):  # a FIFO, device, socket or symlink loop: say what it is, never open it
        safetensors_io.check_regular_file(source)
    looks_like_repo = source.count("/") == 1 and not source.startswith((".", "/")) and not os.path.splitext(source)[1]
    if not looks_like_repo:
        raise LoraFileNotFoundError(f"{source}: no such file or directory.")
    hub_kwargs = {"cache_dir": cache_dir, "revision": revision, "token": token}
    if local_files_only is not None:
        hub_kwargs["local_files_only"] = local_files_only
    return _from_hub(source, weight_name, subfolder, allow_pickle, **hub_kwargs)


def _load_pickle(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise JloraError(f"{path}: reading a pickled checkpoint needs torch; pip install torch, or convert it to safetensors.") from None
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"{path}: refused to unpickle: the file asks to run code or build objects that are not tensors "
            f"({str(e).splitlines()[0] if str(e) else 'weights_only'}). Get a safetensors version of this LoRA."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CorruptFileError(f"{path}: not a readable torch checkpoint ({e}).") from None
    if not isinstance(obj, Mapping):
        raise CorruptFileError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a dict of tensors.")
    return dict(obj)


def to_numpy(value: Any, key: str = "?") -> np.ndarray:
    """Convert a numpy / jax / torch tensor to a numpy array (bfloat16 kept as ml_dtypes)."""
    try:
        if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
            t = value.detach().cpu()
            if str(t.dtype) == "torch.bfloat16":
                import ml_dtypes
                import torch

                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad tensor
        raise CorruptFileError(
            f"value of key {key!r} is a {type(value).__name__} that cannot be read as a dense array "
            f"({type(e).__name__}: {e})."
        ) from None


def check_size(key: str, shape, max_elements: int | None, origin: str) -> None:
    """Refuse a tensor with more elements than `max_elements` (the largest weight it could adapt)."""
    if max_elements is None:
        return
    n = math.prod(int(d) for d in shape)
    if n > max_elements:
        raise ShapeMismatchError(
            f"{origin}: tensor {key} of shape {tuple(int(d) for d in shape)} ({n} elements) is far larger than any "
            f"weight of the model it is loaded onto (the bound is {max_elements}); the file is for a larger model, or "
            "corrupt. It was not read."
        )


def _read_safetensors(path: str, max_elements: int | None, mapped: bool = False):
    with safetensors_io.SafetensorsFile(path, mapped=mapped) as f:
        for key in f.keys():  # every shape checked before any tensor is read
            check_size(key, f.shape(key), max_elements, path)
        read = f.view if mapped else f.read
        return {k: read(k) for k in f.keys()}, dict(f.metadata)


def read_state_dict(source: Any, *, allow_pickle: bool = False, max_elements: int | None = None,
                    mapped: bool = False, **resolve_kwargs) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Read `(tensors, metadata, origin)` from a dict, a file, a directory or a Hub repo.

    A dict is copied, never modified. `origin` names where the tensors came from for messages.
    `max_elements`: refuse (`ShapeMismatchError`) any tensor with more elements, before reading it.
    `mapped`: a safetensors file's tensors are read-only views into its memory map
    (`safetensors_io.map_file`), for a caller that copies what it keeps.
    """
    if isinstance(source, Mapping):
        tensors = {}
        for k, v in source.items():
            if not isinstance(k, str):
                raise CorruptFileError(f"state dict keys must be strings, got {k!r}.")
            shape = getattr(v, "shape", None)
            if shape is not None:  # arrays and tensors: refused before any copy
                check_size(k, tuple(shape), max_elements, "<state dict>")
            tensors[k] = to_numpy(v, k)
            check_size(k, tensors[k].shape, max_elements, "<state dict>")
        return tensors, {}, "<state dict>"
    path = resolve_path(source, allow_pickle=allow_pickle, **resolve_kwargs)
    if path.endswith(".safetensors"):
        tensors, metadata = _read_safetensors(path, max_elements, mapped)
        return tensors, metadata, path
    if path.endswith(_PICKLE_SUFFIXES):
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: pickled checkpoints can run code when loaded; pass allow_pickle=True to read it with "
                "torch.load(weights_only=True), or use a .safetensors file."
            )
        raw = _load_pickle(path)
        for k, v in raw.items():
            check_size(k, tuple(getattr(v, "shape", ())), max_elements, path)
        return {k: to_numpy(v, k) for k, v in raw.items()}, {}, path
    # Unknown suffix: try safetensors, the only format read without asking.
    tensors, metadata = _read_safetensors(path, max_elements, mapped)
    return tensors, metadata, path
