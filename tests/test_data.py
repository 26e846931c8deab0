"""jlora.data against torchvision's training transforms and diffusers' script conventions.

Reference for the pixels: torchvision's own `Resize(res, BILINEAR)`, `CenterCrop`/`crop`,
`hflip`, `ToTensor` and `Normalize([0.5], [0.5])` when torchvision imports. Where it does
not (the test environment pins torch alone), the reference repeats torchvision's steps
for PIL images as torchvision 0.28 writes them, on its own code path: the output size of
`transforms.functional._compute_resized_output_size` (shorter side to `res`, the other
`int(res * long / short)`, no resize when the size is unchanged), `PIL.Image.resize` with
BILINEAR (what `_functional_pil.resize` calls; Pillow always antialiases), the crop offsets
of `center_crop` (`int(round((h - th) / 2.0))`), `Image.crop` and `FLIP_LEFT_RIGHT`, and
the tensor math of `to_tensor` / `normalize` in torch. The crop and flip order and
`original_size` / `crop_top_left` follow diffusers' `train_text_to_image_lora.py` (crop,
then flip) and `train_dreambooth_lora_sdxl.py` (flip, then crop; `max(0, round(...))`).
"""

from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, ImageOps

from jlora import data
from jlora.errors import JloraError

try:
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
except Exception:  # noqa: BLE001 - any import failure means: use the mirrored steps
    T = TF = None


def _noise(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def _reference(image, res, *, top_left=None, flip=False, flip_before_crop=False):
    """(pixels, original_size, crop_top_left) from torchvision, or its mirrored steps (module docstring)."""
    img = ImageOps.exif_transpose(image)
    if img.mode != "RGB":
        img = img.convert("RGB")
    original = (img.height, img.width)
    if T is not None:
        img = T.Resize(res, interpolation=T.InterpolationMode.BILINEAR)(img)
    else:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = res, int(res * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_h, new_w) != (h, w):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    centred = top_left is None
    if centred:  # train_dreambooth_lora_sdxl.py's crop_top_left for a center crop
        top_left = (max(0, int(round((img.height - res) / 2.0))), max(0, int(round((img.width - res) / 2.0))))
    hflip = TF.hflip if TF is not None else (lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    if flip and flip_before_crop:
        img = hflip(img)
    if T is not None and centred:
        img = T.CenterCrop(res)(img)
    elif TF is not None:
        img = TF.crop(img, top_left[0], top_left[1], res, res)
    else:
        img = img.crop((top_left[1], top_left[0], top_left[1] + res, top_left[0] + res))
    if flip and not flip_before_crop:
        img = hflip(img)
    if T is not None:
        t = T.Normalize([0.5], [0.5])(T.ToTensor()(img))
    else:
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.height, img.width, 3)
        t = t.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
        t = t.sub_(torch.as_tensor([0.5])[:, None, None]).div_(torch.as_tensor([0.5])[:, None, None])
    return t.numpy(), original, top_left


def _orientation(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.fixture
def folder(tmp_path):
    """Images of odd sizes and modes, one with an EXIF rotation, one corrupt, all with .txt captions."""
    d = tmp_path / "imgs"
    d.mkdir()
    _noise(53, 37, seed=1).save(d / "a.png")
    _noise(37, 53, "RGBA", seed=2).save(d / "b.png")
    _noise(29, 41, "L", seed=3).save(d / "c.bmp")
    _noise(20, 30, seed=4).save(d / "d.jpg", exif=_orientation(6), quality=95)
    _noise(49, 37, seed=5).save(d / "e.webp", lossless=True)
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00 not really a png " * 8)
    for stem in "abcde":
        (d / f"{stem}.txt").write_text(f"caption {stem}\n")
    (d / "bad.txt").write_text("caption bad")
    return d


# ----------------------------------------------------------------------------- preprocess


def test_resized_size_truncates_like_torchvision():
    assert data.resized_size(53, 37, 16) == (22, 16)  # 16 * 53 / 37 = 22.9: truncated, not rounded
    assert data.resized_size(37, 53, 16) == (16, 22)
    assert data.resized_size(16, 16, 16) == (16, 16)
    assert data.resized_size(1000, 10, 8) == (800, 8)


@pytest.mark.parametrize("size,mode", [((53, 37), "RGB"), ((37, 53), "RGBA"), ((29, 41), "L"), ((49, 37), "RGB"),
                                       ((16, 24), "RGB"), ((64, 80), "RGB")])
@pytest.mark.parametrize("res", [16, 24])
def test_center_crop_matches_torchvision(size, mode, res):
    image = _noise(*size, mode=mode, seed=sum(size))
    ref, original, top_left = _reference(image, res)
    out = data.preprocess(image, res)
    assert out.pixels.dtype == np.float32 and out.pixels.shape == (3, res, res)
    np.testing.assert_allclose(out.pixels, ref, rtol=0, atol=1e-6)
    assert out.original_size == original == size
    assert out.crop_top_left == top_left
    assert -1.0 <= out.pixels.min() and out.pixels.max() <= 1.0 and np.ptp(out.pixels) > 0.5


def test_center_crop_rounds_half_to_even():
    # 37 wide, 49 high at 16: resized to 16 x 21, (21 - 16) / 2 = 2.5 -> round() gives 2.
    out = data.preprocess(_noise(49, 37), 16)
    assert out.crop_top_left == (2, 0)


def test_random_crop_offsets_and_pixels():
    image = _noise(40, 90, seed=7)  # resized at 16: 16 x 36, so the left offset ranges over 0..20
    lefts = set()
    for seed in range(6):
        out = data.preprocess(image, 16, center_crop=False, rng=np.random.default_rng(seed))
        g = np.random.default_rng(seed)  # the documented draw order: top, then left
        expected = (int(g.integers(0, 16 - 16 + 1)), int(g.integers(0, 36 - 16 + 1)))
        assert out.crop_top_left == expected
        ref, _, _ = _reference(image, 16, top_left=expected)
        np.testing.assert_allclose(out.pixels, ref, rtol=0, atol=1e-6)
        lefts.add(expected[1])
    assert len(lefts) > 2


def _flipping_seed():
    for seed in range(100):
        if np.random.default_rng(seed).random() < 0.5:
            return seed
    raise AssertionError("no seed flips")


@pytest.mark.parametrize("flip_before_crop", [False, True])
def test_flip_matches_torchvision_order(flip_before_crop):
    image = _noise(40, 75, seed=8)  # resized at 16: 16 x 30, center left = round(7.0) = 7; flip then crop differs
    seed = _flipping_seed()
    out = data.preprocess(image, 16, random_flip=True, flip_before_crop=flip_before_crop,
                          rng=np.random.default_rng(seed))
    ref, _, _ = _reference(image, 16, flip=True, flip_before_crop=flip_before_crop)
    np.testing.assert_allclose(out.pixels, ref, rtol=0, atol=1e-6)
    unflipped = data.preprocess(image, 16).pixels
    assert np.abs(out.pixels - unflipped).max() > 0.5


def test_flip_orders_differ_when_the_crop_is_off_center():
    image = _noise(40, 68, seed=10)  # resized 16 x 27: left = round(5.5) = 6, so the crop is not centred
    seed = _flipping_seed()
    a = data.preprocess(image, 16, random_flip=True, rng=np.random.default_rng(seed)).pixels
    b = data.preprocess(image, 16, random_flip=True, flip_before_crop=True, rng=np.random.default_rng(seed)).pixels
    assert np.abs(a - b).max() > 0.5
    np.testing.assert_allclose(b, _reference(image, 16, flip=True, flip_before_crop=True)[0], rtol=0, atol=1e-6)


def test_no_flip_draw_keeps_image():
    image = _noise(40, 68, seed=11)
    seed = next(s for s in range(100) if np.random.default_rng(s).random() >= 0.5)
    out = data.preprocess(image, 16, random_flip=True, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(out.pixels, data.preprocess(image, 16).pixels)


def test_exif_orientation_is_applied(folder):
    image = data.load_image(folder / "d.jpg")
    assert image.size == (30, 20) and image.getexif().get(0x0112) == 6
    out = data.preprocess(image, 16)
    assert out.original_size == (30, 20)  # rotated: 30 high, 20 wide
    ref, original, _ = _reference(image, 16)
    assert original == (30, 20)
    np.testing.assert_allclose(out.pixels, ref, rtol=0, atol=1e-6)
    plain = data.preprocess(image, 16, exif_transpose=False)
    assert plain.original_size == (20, 30)


@pytest.mark.parametrize("res,factor", [(20, 8), (12, 8), (0, 8), (-8, 8), (16.0, 8), (True, 8), (24, 16)])
def test_bad_resolution_is_a_typed_error(res, factor):
    with pytest.raises(data.DatasetError, match="resolution"):
        data.preprocess(_noise(30, 30), res, vae_scale_factor=factor)


def test_resolution_factor_is_a_parameter():
    assert data.preprocess(_noise(30, 30), 20, vae_scale_factor=4).pixels.shape == (3, 20, 20)
    assert issubclass(data.DatasetError, JloraError)


# ----------------------------------------------------------------------------- folders


def test_read_folder_txt_captions_skips_corrupt(folder):
    with pytest.warns(data.UnreadableImageWarning, match="bad.png"):
        examples = data.read_folder(folder)
    assert [os.path.basename(e.image_path) for e in examples] == ["a.png", "b.png", "c.bmp", "d.jpg", "e.webp"]
    assert [e.caption for e in examples] == [f"caption {s}" for s in "abcde"]
    assert all(isinstance(e, tuple) and len(e) == 2 for e in examples)


def test_read_folder_metadata_jsonl(folder):
    for f in folder.glob("*.txt"):
        f.unlink()
    sub = folder / "train"
    sub.mkdir()
    os.replace(folder / "e.webp", sub / "e.webp")
    names = ["a.png", "b.png", "c.bmp", "d.jpg", "bad.png"]
    rows = [{"file_name": n, "text": f"meta {n}", "other": "x"} for n in names]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (sub / "metadata.jsonl").write_text(json.dumps({"file_name": "e.webp", "text": "meta sub e"}) + "\n")
    with pytest.warns(data.UnreadableImageWarning, match="bad.png"):
        examples = data.read_folder(folder)
    assert {os.path.basename(e.image_path): e.caption for e in examples} == {
        "a.png": "meta a.png", "b.png": "meta b.png", "c.bmp": "meta c.bmp", "d.jpg": "meta d.jpg",
        "e.webp": "meta sub e"}
    with pytest.raises(data.DatasetError, match=r"e\.webp: no caption \(no 'other'"), warnings.catch_warnings():
        warnings.simplefilter("ignore", data.UnreadableImageWarning)
        data.read_folder(folder, caption_column="other")
    with pytest.warns(data.UnreadableImageWarning):
        other = data.read_folder(folder, caption_column="other", instance_prompt="p")
    assert [e.caption for e in other] == ["x", "x", "x", "x", "p"]


def test_metadata_naming_a_missing_file(folder):
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "nope.png", "text": "t"}) + "\n")
    with pytest.raises(data.DatasetError, match="nope.png"):
        data.read_folder(folder)


def test_caption_that_is_not_utf8(folder):
    (folder / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(data.DatasetError, match=r"a\.txt.*UTF-8"):
        data.read_folder(folder, check_images=False)


def test_corrupt_image_without_caption_is_only_skipped(folder):
    (folder / "bad.txt").unlink()
    with pytest.warns(data.UnreadableImageWarning, match="bad.png"):
        assert len(data.read_folder(folder)) == 5


def test_missing_caption_names_the_file_or_takes_instance_prompt(folder):
    (folder / "c.txt").unlink()
    (folder / "b.txt").write_text("  \n")
    with pytest.raises(data.DatasetError, match=r"c\.bmp"):
        data.read_folder(folder, check_images=False)
    with pytest.warns(data.UnreadableImageWarning):
        examples = data.read_folder(folder, instance_prompt="a photo of sks dog")
    captions = {os.path.basename(e.image_path): e.caption for e in examples}
    assert captions["c.bmp"] == "a photo of sks dog"
    assert captions["b.png"] == "a photo of sks dog"  # empty caption: DreamBooth's fallback
    assert captions["a.png"] == "caption a"


def test_empty_and_unreadable_only_folders(tmp_path):
    with pytest.raises(data.DatasetError, match="no readable images"):
        data.read_folder(tmp_path)
    with pytest.raises(data.DatasetError, match="not a folder"):
        data.read_folder(tmp_path / "missing")
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(data.UnreadableImageWarning, match="x.jpg"), pytest.raises(data.DatasetError):
        data.read_folder(tmp_path, instance_prompt="p")


def test_load_image_of_corrupt_file_is_typed(folder):
    with pytest.raises(data.DatasetError, match="bad.png"):
        data.load_image(folder / "bad.png")


# ----------------------------------------------------------------------------- cache


class _Encoders:
    def __init__(self):
        self.image_calls = self.caption_calls = 0

    def images(self, pixels):
        self.image_calls += 1
        b, c, h, w = pixels.shape
        return pixels.reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5))  # a stand-in VAE: 8x8 means

    def captions(self, captions):
        self.caption_calls += 1
        lengths = np.asarray([len(c) for c in captions], np.float32)
        return {"prompt_embeds": np.repeat(lengths[:, None, None], 3, 1) * np.ones((1, 3, 2), np.float32),
                "pooled": lengths[:, None]}


def _examples(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.UnreadableImageWarning)
        return data.read_folder(folder)


def test_cache_latents_reused_and_rebuilt(folder, tmp_path):
    examples, path, enc = _examples(folder), tmp_path / "cache" / "latents.safetensors", _Encoders()
    first = data.cache_latents(examples, enc.images, enc.captions, path, resolution=16, batch_size=2)
    assert (enc.image_calls, enc.caption_calls) == (3, 3)  # 5 examples in batches of 2
    pixels = data.load_examples(examples, 16)
    np.testing.assert_allclose(first["latents"], enc.images(pixels["pixels"]), rtol=0, atol=1e-6)
    assert first["latents"].shape == (5, 3, 2, 2)
    np.testing.assert_array_equal(first["original_size"], [[53, 37], [37, 53], [29, 41], [30, 20], [49, 37]])
    np.testing.assert_array_equal(first["crop_top_left"], pixels["crop_top_left"])
    assert first["captions/pooled"][:, 0].tolist() == [9.0] * 5
    enc.image_calls = 0

    again = data.cache_latents(examples, enc.images, enc.captions, path, resolution=16, batch_size=4)
    assert enc.image_calls == 0 and enc.caption_calls == 3
    assert sorted(again) == sorted(first)
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])

    data.cache_latents(examples, enc.images, enc.captions, path, resolution=24)
    assert enc.image_calls == 1  # resolution changed
    data.cache_latents(examples, enc.images, enc.captions, path, resolution=24)
    assert enc.image_calls == 1

    before = data.cache_latents(examples, enc.images, enc.captions, path, resolution=24)["latents"]
    _noise(53, 37, seed=99).save(folder / "a.png")  # same name and size, other pixels
    changed = data.cache_latents(examples, enc.images, enc.captions, path, resolution=24)["latents"]
    assert enc.image_calls == 2
    assert np.abs(changed[0] - before[0]).max() > 0.01
    np.testing.assert_array_equal(changed[1:], before[1:])

    renamed = [examples[0]._replace(caption="other caption")] + examples[1:]
    data.cache_latents(renamed, enc.images, enc.captions, path, resolution=24)
    assert enc.image_calls == 3  # caption changed
    data.cache_latents(renamed, enc.images, enc.captions, path, resolution=24, center_crop=False)
    assert enc.image_calls == 4  # options changed
    data.cache_latents(renamed, enc.images, enc.captions, path, resolution=24, center_crop=False, key="other vae")
    assert enc.image_calls == 5


def test_cache_file_that_is_corrupt_is_rebuilt(folder, tmp_path):
    examples, path, enc = _examples(folder)[:2], tmp_path / "c.safetensors", _Encoders()
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    out = data.cache_latents(examples, enc.images, None, path, resolution=16)
    assert enc.image_calls == 1 and set(out) == {"latents", "original_size", "crop_top_left"}
    data.cache_latents(examples, enc.images, None, path, resolution=16)
    assert enc.image_calls == 1
    with_captions = data.cache_latents(examples, enc.images, enc.captions, path, resolution=16)
    assert enc.image_calls == 2 and "captions/pooled" in with_captions  # a cache without captions is extended


def test_cache_random_crops_are_drawn_per_example(folder, tmp_path):
    examples, enc = _examples(folder), _Encoders()
    a = data.cache_latents(examples, enc.images, None, tmp_path / "a.st", resolution=16, batch_size=1,
                           center_crop=False, random_flip=True, seed=3)
    b = data.cache_latents(examples, enc.images, None, tmp_path / "b.st", resolution=16, batch_size=5,
                           center_crop=False, random_flip=True, seed=3)
    np.testing.assert_array_equal(a["latents"], b["latents"])
    np.testing.assert_array_equal(a["crop_top_left"], b["crop_top_left"])


def test_cache_of_a_latent_distribution(folder, tmp_path):
    examples = _examples(folder)[:3]

    def encode(pixels):
        mean = _Encoders().images(pixels)
        return {"mean": mean, "logvar": np.full_like(mean, -2.0).astype(np.float16)}

    out = data.cache_latents(examples, encode, lambda c: np.zeros((len(c), 4), np.float32), tmp_path / "d.st",
                             resolution=16, batch_size=2)
    assert set(out) == {"latents/mean", "latents/logvar", "captions", "original_size", "crop_top_left"}
    assert out["latents/logvar"].dtype == np.float16 and out["latents/mean"].shape == (3, 3, 2, 2)
    again = data.cache_latents(examples, None, None, tmp_path / "d.st", resolution=16, batch_size=2)
    np.testing.assert_array_equal(again["latents/mean"], out["latents/mean"])


def test_cache_rejects_encoders_that_drop_the_batch_axis(folder, tmp_path):
    with pytest.raises(data.DatasetError, match="centre_crop"):
        data.cache_latents(_examples(folder), _Encoders().images, None, tmp_path / "x.st", resolution=16,
                           centre_crop=True)
    with pytest.raises(data.DatasetError, match="batch axis"):
        data.cache_latents(_examples(folder), lambda p: p.mean(0), None, tmp_path / "x.st", resolution=16)


def test_sdxl_time_ids():
    ids = data.sdxl_time_ids([(53, 37), (30, 20)], [(3, 0), (0, 2)], 16)
    np.testing.assert_array_equal(ids, [[53, 37, 3, 0, 16, 16], [30, 20, 0, 2, 16, 16]])


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize("n,bs", [(10, 3), (8, 4), (1, 4)])
def test_batches_cover_every_index_once_per_epoch(n, bs):
    epochs = [data.batches(n, bs, seed=0, epoch=e) for e in range(4)]
    for bl in epochs:
        assert sorted(np.concatenate(bl).tolist()) == list(range(n))
        assert [len(b) for b in bl] == [bs] * (n // bs) + ([n % bs] if n % bs else [])
    if n > 2:
        assert len({tuple(np.concatenate(bl)) for bl in epochs}) == 4
        assert not np.array_equal(np.concatenate(data.batches(n, bs, seed=1, epoch=0)), np.concatenate(epochs[0]))
    again = data.batches(n, bs, seed=0, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(again, epochs[2]))


def test_batches_drop_last():
    bl = data.batches(10, 3, seed=0, epoch=0, drop_last=True)
    assert [len(b) for b in bl] == [3, 3, 3]
    flat = np.concatenate(bl)
    assert len(set(flat.tolist())) == 9
    full = np.concatenate(data.batches(10, 3, seed=0, epoch=0))
    np.testing.assert_array_equal(flat, full[:9])
    with pytest.raises(data.DatasetError):
        data.batches(10, 0, seed=0, epoch=0)


# ----------------------------------------------------------------------------- sharding


@pytest.fixture
def mesh():
    assert len(jax.devices()) == 8, "conftest sets 8 host devices"
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


@pytest.mark.parametrize("process_local", [False, True])
def test_shard_batch_splits_leading_axis_over_data(mesh, process_local):
    batch = {"latents": np.arange(8 * 4 * 2 * 2, dtype=np.float32).reshape(8, 4, 2, 2),
             "time_ids": data.sdxl_time_ids(np.full((8, 2), 16), np.zeros((8, 2)), 16),
             "idx": np.arange(8, dtype=np.int32)}
    out = data.shard_batch(batch, mesh, process_local=process_local)
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), v.ndim)
        np.testing.assert_array_equal(np.asarray(v), batch[k])
        assert len(v.addressable_shards) == 8
        for shard in v.addressable_shards:
            row = list(mesh.devices.flat).index(shard.device) // 2  # the device's index on "data"
            assert shard.data.shape == (2,) + batch[k].shape[1:]
            np.testing.assert_array_equal(np.asarray(shard.data), batch[k][2 * row:2 * row + 2])


def test_shard_batch_over_two_axes_and_errors(mesh):
    out = data.shard_batch(np.zeros((8, 3), np.float32), mesh, ("data", "model"))
    assert {s.data.shape for s in out.addressable_shards} == {(1, 3)}
    with pytest.raises(data.DatasetError, match="multiple of 4"):
        data.shard_batch({"x": np.zeros((6, 3), np.float32)}, mesh)
    with pytest.raises(data.DatasetError, match="'batch'"):
        data.shard_batch({"x": np.zeros((8, 3), np.float32)}, mesh, "batch")
    with pytest.raises(data.DatasetError, match="captions"):
        data.shard_batch({"captions": np.asarray(["a"] * 8)}, mesh)
