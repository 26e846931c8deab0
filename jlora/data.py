"""Image folders, preprocessing, latent caches and batches for LoRA fine-tuning.

The preprocessing is that of diffusers' training scripts (`train_text_to_image_lora.py`,
`train_dreambooth_lora_sdxl.py`, `train_dreambooth_lora_flux.py`): EXIF transpose, RGB,
torchvision's `Resize(resolution, BILINEAR)` (shorter side to `resolution`),
`CenterCrop` or `RandomCrop`, `RandomHorizontalFlip`, `ToTensor` and
`Normalize([0.5], [0.5])`, done here with Pillow and numpy. SDXL's micro-conditioning
inputs come with every image: `original_size` (h, w) before the resize and
`crop_top_left` (top, left) of the crop.

>>> examples = jlora.data.read_folder("photos/", instance_prompt="a photo of sks dog")
>>> cache = jlora.data.cache_latents(examples, encode_images, encode_captions, "cache.safetensors", resolution=512)
>>> for idx in jlora.data.batches(len(examples), 8, seed=0, epoch=epoch, drop_last=True):
...     batch = jlora.data.shard_batch({"latents": cache["latents"][idx]}, mesh)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps

from converters import safetensors_io
from jlora.errors import CorruptFileError, JloraError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
CACHE_VERSION = "1"
_PREPROCESS_OPTIONS = frozenset({"center_crop", "random_flip", "flip_before_crop", "exif_transpose",
                                 "vae_scale_factor"})
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(JloraError):
    """A training folder, image or preprocessing option that cannot be used as given."""


class UnreadableImageWarning(UserWarning):
    """An image file in a training folder that Pillow cannot decode; it is left out."""


class Example(NamedTuple):
    """One training example: the image file and its caption."""

    image_path: str
    caption: str


class Preprocessed(NamedTuple):
    """`pixels` (3, H, W) float32 in [-1, 1]; `original_size` (h, w); `crop_top_left` (top, left)."""

    pixels: np.ndarray
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


# ----------------------------------------------------------------------------- folders


def _read_metadata(path: str, image_column: str, caption_column: str) -> dict[str, Any]:
    """{absolute image path: caption or None} from one `metadata.jsonl`."""
    out: dict[str, Any] = {}
    root = os.path.dirname(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DatasetError(f"{path}:{n}: not a JSON object ({e}).") from None
            if not isinstance(record, dict) or not isinstance(record.get(image_column), str):
                raise DatasetError(f"{path}:{n}: needs a {image_column!r} string naming an image file.")
            caption = record.get(caption_column)
            if caption is not None and not isinstance(caption, str):
                raise DatasetError(f"{path}:{n}: {caption_column!r} must be a string, not {type(caption).__name__}.")
            image = os.path.normpath(os.path.join(root, record[image_column]))
            if not os.path.isfile(image):
                raise DatasetError(f"{path}:{n}: {record[image_column]!r} is not a file in {root}.")
            out[image] = caption
    return out


def _unreadable_reason(path: str) -> str | None:
    try:
        with Image.open(path) as im:
            im.load()
    except _UNREADABLE as e:
        return str(e) or type(e).__name__
    return None


def read_folder(path: str | os.PathLike, *, caption_column: str = "text", image_column: str = "file_name",
                instance_prompt: str | None = None, check_images: bool = True) -> list[Example]:
    """The (image, caption) examples of an image folder, sorted by path.

    Captions come from a `metadata.jsonl` (diffusers' imagefolder layout: one JSON object
    a line with `image_column`, relative to that file's folder, and `caption_column`), else
    from a `.txt` file of the same stem beside the image. An image with neither, or with an
    empty caption, takes `instance_prompt` (DreamBooth); with no `instance_prompt` a missing
    caption is an error and an empty one stays empty. Images (.png .jpg .jpeg .webp .bmp) are
    found in every subfolder. With `check_images`, each image is decoded once and one that
    Pillow cannot read is left out with an `UnreadableImageWarning` naming it.

    >>> read_folder("dog/", instance_prompt="a photo of sks dog")[0]
    Example(image_path='dog/0.jpg', caption='a photo of sks dog')
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: not a folder of training images.")
    captions: dict[str, Any] = {}
    images: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if METADATA_FILE in files:
            captions.update(_read_metadata(os.path.join(folder, METADATA_FILE), image_column, caption_column))
        images += [os.path.normpath(os.path.join(folder, f)) for f in files
                   if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    examples = []
    for image in sorted(set(images) | set(captions)):
        if check_images and (why := _unreadable_reason(image)) is not None:
            warnings.warn(f"{image}: skipped, not a readable image ({why}).", UnreadableImageWarning, stacklevel=2)
            continue
        caption = captions.get(image)
        sidecar = os.path.splitext(image)[0] + ".txt"
        if caption is None and os.path.isfile(sidecar):
            try:
                with open(sidecar, encoding="utf-8") as f:
                    caption = f.read().strip()
            except UnicodeDecodeError as e:
                raise DatasetError(f"{sidecar}: the caption is not UTF-8 text ({e.reason} at byte {e.start})."
                                   ) from None
        if not caption and instance_prompt is not None:
            caption = instance_prompt
        if caption is None:
            raise DatasetError(f"{image}: no caption (no {caption_column!r} in {METADATA_FILE}, no "
                               f"{os.path.basename(sidecar)}); add one or pass instance_prompt.")
        examples.append(Example(image, caption))
    if not examples:
        raise DatasetError(f"{root}: no readable images ({', '.join(IMAGE_EXTENSIONS)}).")
    return examples


def load_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image at `path` (file closed, EXIF kept), or a `DatasetError` naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except _UNREADABLE as e:
        raise DatasetError(f"{os.fspath(path)}: not a readable image ({e or type(e).__name__}).") from None


# ----------------------------------------------------------------------------- preprocessing


def check_resolution(resolution: int, vae_scale_factor: int = 8) -> int:
    """`resolution` if it is a positive multiple of `vae_scale_factor`, else a `DatasetError`."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise DatasetError(f"resolution must be a positive integer, not {resolution!r}.")
    if resolution % vae_scale_factor:
        lo = resolution // vae_scale_factor * vae_scale_factor
        raise DatasetError(f"resolution {resolution} is not a multiple of the VAE factor {vae_scale_factor}; "
                           f"use {lo or vae_scale_factor} or {lo + vae_scale_factor}.")
    return int(resolution)


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(h, w) after torchvision's `Resize(resolution)`: shorter side to `resolution`, the other truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resolution * long / short)
    return (new_long, resolution) if width <= height else (resolution, new_long)


def preprocess(image: Image.Image, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
               rng: np.random.Generator | None = None, flip_before_crop: bool = False,
               exif_transpose: bool = True, vae_scale_factor: int = 8) -> Preprocessed:
    """Pixels of one image as diffusers' training scripts make them.

    EXIF transpose (SDXL/Flux DreamBooth), `convert("RGB")`, resize of the shorter side to
    `resolution` with Pillow's bilinear filter (what torchvision does on PIL images), a
    center crop (top = round((h - res) / 2)) or a random one, a horizontal flip with
    probability 1/2 when `random_flip`, then `x / 255` and `(x - 0.5) / 0.5`. The
    text-to-image script flips after the crop, the DreamBooth scripts before it
    (`flip_before_crop=True`). `rng` draws the crop's top, then its left, then the flip.

    >>> pixels, original_size, crop_top_left = preprocess(Image.open("dog.jpg"), 512)
    """
    check_resolution(resolution, vae_scale_factor)
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    original_size = (image.height, image.width)
    size = resized_size(image.height, image.width, resolution)
    if size != original_size:
        image = image.resize(size[::-1], Image.Resampling.BILINEAR)
    rng = np.random.default_rng() if rng is None and (random_flip or not center_crop) else rng
    h, w = image.height, image.width
    if center_crop:
        top, left = int(round((h - resolution) / 2.0)), int(round((w - resolution) / 2.0))
    else:
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    flip = bool(random_flip and rng.random() < 0.5)
    if flip and flip_before_crop:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and not flip_before_crop:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    pixels = (pixels - np.float32(0.5)) / np.float32(0.5)
    return Preprocessed(pixels, original_size, (top, left))


def sdxl_time_ids(original_sizes, crop_top_lefts, resolution: int) -> np.ndarray:
    """SDXL's `add_time_ids` (B, 6): original (h, w) + crop (top, left) + target (res, res)."""
    o = np.asarray(original_sizes, np.float32).reshape(-1, 2)
    c = np.asarray(crop_top_lefts, np.float32).reshape(-1, 2)
    return np.concatenate([o, c, np.full_like(o, resolution)], axis=1)


def load_examples(examples: Sequence[Example], resolution: int, *, seed: int = 0, start: int = 0,
                  **options) -> dict[str, np.ndarray]:
    """Preprocessed examples stacked: `pixels` (N, 3, R, R), `original_size` and `crop_top_left` (N, 2) int32.

    Example `i` (counted from `start`, its index in the whole list) takes its random crop and
    flip from `np.random.default_rng([seed, start + i])`, so they do not depend on batching.
    `options` are `preprocess`'s keywords.
    """
    if not examples:
        raise DatasetError("no examples to load.")
    out = [preprocess(load_image(e.image_path), resolution, rng=np.random.default_rng([seed, start + i]),
                      **options)
           for i, e in enumerate(examples)]
    return {"pixels": np.stack([p.pixels for p in out]),
            "original_size": np.asarray([p.original_size for p in out], np.int32).reshape(-1, 2),
            "crop_top_left": np.asarray([p.crop_top_left for p in out], np.int32).reshape(-1, 2)}


# ----------------------------------------------------------------------------- latent cache


def fingerprint(examples: Sequence[Example], resolution: int, **options) -> str:
    """A sha256 of the examples' bytes and captions, the resolution and the options."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "resolution": resolution, "count": len(examples),
                         "options": {k: options[k] for k in sorted(options)}}, sort_keys=True, default=str).encode())
    for e in examples:
        h.update(json.dumps([os.path.basename(e.image_path), e.caption]).encode())
        with open(e.image_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _as_arrays(out, prefix: str) -> dict[str, np.ndarray]:
    if isinstance(out, Mapping):
        return {f"{prefix}/{k}": np.asarray(v) for k, v in out.items()}
    return {prefix: np.asarray(out)}


def cache_latents(examples: Sequence[Example], encode_images: Callable[[np.ndarray], Any],
                  encode_captions: Callable[[list[str]], Any] | None, path: str | os.PathLike, *, resolution: int,
                  batch_size: int = 8, seed: int = 0, key: str = "", **options) -> dict[str, np.ndarray]:
    """Latents and caption embeddings of `examples`, computed once and kept in a safetensors file.

    `encode_images` maps pixels (B, 3, R, R) float32 to latents (B, ...), or to a dict of
    arrays such as a latent distribution's `mean` and `logvar` (the Flux script caches the
    distribution and samples it every step); `encode_captions` maps a list of B captions to
    an array (B, ...) or a dict of them (`prompt_embeds`, `pooled_prompt_embeds`). The
    result has `latents` (or `latents/<name>`), `original_size`, `crop_top_left` (N, 2) and
    `captions` (or `captions/<name>`), one row per example in the order given.

    The file's metadata holds a `fingerprint` of the image bytes, captions, resolution,
    `seed`, `key` (name the encoders and their weights there) and `options` (`preprocess`'s
    keywords); a file whose fingerprint matches is read back, any other (or an unreadable
    one, or one without captions when `encode_captions` is given) is rebuilt. A random crop
    or flip is drawn once per example (`seed`) and cached with it.
    """
    unknown = sorted(set(options) - _PREPROCESS_OPTIONS)
    if unknown:
        raise DatasetError(f"cache_latents: unknown option {unknown[0]!r}; options are {sorted(_PREPROCESS_OPTIONS)}.")
    check_resolution(resolution, options.get("vae_scale_factor", 8))
    if not examples:
        raise DatasetError("cache_latents needs at least one example.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer, not {batch_size!r}.")
    path = os.fspath(path)
    fp = fingerprint(examples, resolution, seed=seed, key=key, **options)
    if os.path.isfile(path):
        try:
            tensors, metadata = safetensors_io.load_file(path)
        except CorruptFileError:
            tensors, metadata = {}, {}
        has_captions = any(k == "captions" or k.startswith("captions/") for k in tensors)
        if metadata.get("jlora.data.fingerprint") == fp and (has_captions or encode_captions is None):
            return tensors
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = load_examples(chunk, resolution, seed=seed, start=start, **options)
        arrays = {"original_size": batch["original_size"], "crop_top_left": batch["crop_top_left"],
                  **_as_arrays(encode_images(batch["pixels"]), "latents")}
        if encode_captions is not None:
            arrays.update(_as_arrays(encode_captions([e.caption for e in chunk]), "captions"))
        for k, v in arrays.items():
            if v.shape[:1] != (len(chunk),):
                raise DatasetError(f"cache_latents: {k} of a batch of {len(chunk)} has shape {v.shape}; "
                                   "encoders must keep the batch axis first.")
            parts.setdefault(k, []).append(v)
    tensors = {k: np.concatenate(v) for k, v in parts.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors_io.save_file(tensors, path, {"jlora.data.fingerprint": fp, "jlora.data.count": str(len(examples)),
                                             "jlora.data.resolution": str(resolution)})
    return tensors


# ----------------------------------------------------------------------------- batches


def batches(n_examples: int, batch_size: int, *, seed: int, epoch: int, drop_last: bool = False) -> list[np.ndarray]:
    """Index batches of one epoch: a permutation drawn from `(seed, epoch)`, cut into `batch_size` pieces.

    As diffusers' `DataLoader(shuffle=True)`: a new order every epoch and, by default, a
    shorter last batch; `drop_last=True` leaves it out, so every batch has one shape (one
    compilation) and divides over a data axis. Every process computes the same batches.

    >>> [b.tolist() for b in batches(5, 2, seed=0, epoch=0)]
    [[2, 4], [3, 0], [1]]
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer, not {batch_size!r}.")
    if not isinstance(n_examples, (int, np.integer)) or n_examples < 0:
        raise DatasetError(f"n_examples must be a non-negative integer, not {n_examples!r}.")
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    stop = n_examples - n_examples % batch_size if drop_last else n_examples
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def shard_batch(batch, mesh, axis: str | tuple[str, ...] = "data", *, process_local: bool = False):
    """A tree of host arrays as global `jax.Array`s with the leading axis split over `axis` of `mesh`.

    By default `batch` is the whole global batch, the same on every process (as `batches`
    gives it); each device takes its slice. With `process_local=True` each process passes
    only its own rows (`jax.make_array_from_process_local_data`).

    >>> mesh = jax.make_mesh((4, 2), ("data", "model"))
    >>> shard_batch({"latents": np.zeros((8, 4, 64, 64), np.float32)}, mesh)["latents"].sharding.spec
    PartitionSpec('data',)
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    names = (axis,) if isinstance(axis, str) else tuple(axis)
    missing = [a for a in names if a not in mesh.shape]
    if missing:
        raise DatasetError(f"mesh axes {tuple(mesh.shape)} have no {missing[0]!r} to split the batch over.")
    ways = int(np.prod([mesh.shape[a] for a in names]))
    sharding = NamedSharding(mesh, PartitionSpec(names[0] if len(names) == 1 else names))

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.dtype.kind not in "biuf" and x.dtype.name != "bfloat16":
            raise DatasetError(f"batch entry {jax.tree_util.keystr(path)}: a {x.dtype} array of shape {x.shape} "
                               "cannot be split over devices (numbers with a batch axis first are needed).")
        if process_local:
            return jax.make_array_from_process_local_data(sharding, x)
        if x.shape[0] % ways:
            raise DatasetError(f"batch entry {jax.tree_util.keystr(path)}: {x.shape[0]} rows do not split over "
                               f"{ways} devices of mesh axis {axis!r}; use a multiple of {ways} (drop_last=True).")
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map_with_path(put, batch)
