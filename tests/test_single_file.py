"""Single-file checkpoints (original SD / SDXL layout, BFL Flux) read with no torch on jlora's side.

Each file is written from a tiny saved diffusers pipeline by a hand-written inverse rename
(diffusers -> LDM/BFL names, below). diffusers' own `from_single_file(file, config=<folder>)`
is the reference: it must give back the saved torch weights (which checks the inverse rename),
and jlora's `load_single_file` must give the params `load_component` reads from the folder.
"""

import os
import re

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.torch import load_file, save_file

import pipelines_ref as P
from converters import single_file as sf
from jlora import errors
from jlora.models import checkpoint as C
from jlora.models.single_file import load_single_file

# --- diffusers -> original names (the test's own inverse of the loader) ------------------------------

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_to_ldm(sd, layers):
    per = layers + 1
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if module in _UNET_FIXED:
            name = _UNET_FIXED[module]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"input_blocks.{1 + b * per + i}.{0 if kind == 'resnets' else 1}."
            name += _RESNET[rest] if kind == "resnets" else rest
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            name = f"input_blocks.{(int(m[1]) + 1) * per}.0.op"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
            name = f"middle_block.{2 * int(m[1])}.{_RESNET[m[2]]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            name = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"output_blocks.{b * per + i}.{0 if kind == 'resnets' else 1}."
            name += _RESNET[rest] if kind == "resnets" else rest
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            b = int(m[1])
            with_attention = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
            name = f"output_blocks.{b * per + layers}.{2 if with_attention else 1}.conv"
        else:
            raise KeyError(key)
        out[f"model.diffusion_model.{name}.{param}"] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_to_ldm(sd, n_up):
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        module = module.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        module = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", module)
        module = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", module)
        module = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", module)
        module = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                        lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", module)
        module = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", module)
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            module = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}"
            if param == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # the original stores 1x1 convs
        out[f"first_stage_model.{module}.{param}"] = value
    return out


def _clip_to_ldm(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _open_clip_to_ldm(sd, prefix):
    out, fused = {}, {}
    for key, value in sd.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        name = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                "text_model.embeddings.token_embedding.weight": "token_embedding.weight"}.get(key)
        if name is None:
            name = key.replace("text_model.final_layer_norm.", "ln_final.")
            name = re.sub(r"text_model\.encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1.", name)
            name = name.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
            name = name.replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj")
        out[prefix + name] = value
    for (i, param), qkv in fused.items():
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


_FLUX_NAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
                "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}


def _flux_to_bfl(sd, prefix="model.diffusion_model."):
    out = {}

    def put(name, param, value):
        out[f"{prefix}{name}.{'scale' if name.endswith('_norm') else param}"] = value

    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if module in _FLUX_NAMES:
            put(_FLUX_NAMES[module], param, value)
        elif module == "norm_out.linear":  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = value.chunk(2)
            put("final_layer.adaLN_modulation.1", param, torch.cat([shift, scale]))
        elif (m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in _FLUX_DOUBLE:
            put(f"double_blocks.{m[1]}.{_FLUX_DOUBLE[m[2]]}", param, value)
        elif (m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)) and m[2] in _FLUX_SINGLE:
            put(f"single_blocks.{m[1]}.{_FLUX_SINGLE[m[2]]}", param, value)
        elif not re.search(r"\.(attn\.(to_[qkv]|add_[qkv]_proj)|proj_mlp)$", module):
            raise KeyError(key)
    for i in sorted({int(m[1]) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}):
        b = f"transformer_blocks.{i}.attn."
        for param in ("weight", "bias"):
            put(f"double_blocks.{i}.img_attn.qkv", param, torch.cat([sd[f"{b}to_{p}.{param}"] for p in "qkv"]))
            put(f"double_blocks.{i}.txt_attn.qkv", param, torch.cat([sd[f"{b}add_{p}_proj.{param}"] for p in "qkv"]))
    for i in sorted({int(m[1]) for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k))}):
        b = f"single_transformer_blocks.{i}."
        for param in ("weight", "bias"):
            parts = [sd[f"{b}attn.to_{p}.{param}"] for p in "qkv"] + [sd[f"{b}proj_mlp.{param}"]]
            put(f"single_blocks.{i}.linear1", param, torch.cat(parts))
    return out


# --- files ---------------------------------------------------------------------------------------


def _weights(directory, component):
    return load_file(C.ckpts.weight_files(os.path.join(directory, component))[0])


def _write_sd(directory, out, sdxl):
    unet = _weights(directory, "unet")
    tensors = {**_unet_to_ldm(unet, C.read_config(os.path.join(directory, "unet"))["layers_per_block"]),
               **_vae_to_ldm(_weights(directory, "vae"), 2)}
    if sdxl:
        tensors.update(_clip_to_ldm(_weights(directory, "text_encoder"), "conditioner.embedders.0.transformer."))
        tensors.update(_open_clip_to_ldm(_weights(directory, "text_encoder_2"), "conditioner.embedders.1.model."))
    else:
        tensors.update(_clip_to_ldm(_weights(directory, "text_encoder"), "cond_stage_model.transformer."))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    sd, sdxl, flux = (P.pipeline_dir(f) for f in ("sd", "sdxl", "flux"))
    bfl = _flux_to_bfl(_weights(flux, "transformer"))
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(root / "flux.safetensors"))
    save_file({k[len("model.diffusion_model."):]: v.contiguous() for k, v in bfl.items()}, str(root / "flux_bare.safetensors"))
    return {
        "sd": (_write_sd(sd, str(root / "sd.safetensors"), False), sd),
        "sdxl": (_write_sd(sdxl, str(root / "sdxl.safetensors"), True), sdxl),
        "flux": (str(root / "flux.safetensors"), flux),
        "flux_bare": (str(root / "flux_bare.safetensors"), flux),
    }


COMPONENTS = {"sd": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}


def _assert_state_dicts_equal(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for k in want:
        assert torch.equal(got[k], want[k]), k


# --- diffusers reads the files as the saved weights (checks the inverse rename) -----------------------


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diffusers_reads_the_file_as_the_saved_pipeline(files, family):
    import diffusers

    path, directory = files[family]
    cls = getattr(diffusers, P.PIPELINE_CLASSES[family])
    pipe = cls.from_single_file(path, config=directory, local_files_only=True)
    for component in COMPONENTS[family]:
        if component == "text_encoder_2":
            # The pipeline tells its encoders apart by width; both tiny ones are 32 wide, so it fills
            # text_encoder_2 from the CLIP-L tensors. Its OpenCLIP converter is called directly instead.
            from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

            got = convert_open_clip_checkpoint(pipe.text_encoder_2, load_file(path), prefix="conditioner.embedders.1.model.")
        else:
            got = getattr(pipe, component).state_dict()
        _assert_state_dicts_equal(got, _weights(directory, component))


def _patched_flux_converter(hidden):
    """diffusers' Flux converter with its hard-coded hidden size (3072) set to the tiny model's."""
    from diffusers.loaders import single_file_utils as U

    fn = U.convert_flux_transformer_checkpoint_to_diffusers
    code = fn.__code__.replace(co_consts=tuple(hidden if c == 3072 else c for c in fn.__code__.co_consts))
    return type(fn)(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@pytest.mark.parametrize("name", ["flux", "flux_bare"])
def test_diffusers_reads_the_flux_file_as_the_saved_transformer(files, name, monkeypatch):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_model

    path, directory = files[name]
    cfg = C.read_config(os.path.join(directory, "transformer"))
    with pytest.raises(RuntimeError, match="split_with_sizes"):  # unpatched: inner_dim = 3072 is hard-coded
        FluxTransformer2DModel.from_single_file(path, config=directory, subfolder="transformer", local_files_only=True)
    entry = dict(single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    entry["checkpoint_mapping_fn"] = _patched_flux_converter(cfg["num_attention_heads"] * cfg["attention_head_dim"])
    monkeypatch.setitem(single_file_model.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", entry)
    model = FluxTransformer2DModel.from_single_file(path, config=directory, subfolder="transformer", local_files_only=True)
    _assert_state_dicts_equal(model.state_dict(), _weights(directory, "transformer"))


# --- jlora reads the files as load_component reads the folder ------------------------------------------


def _assert_trees_equal(got, want):
    a, b = flatten_dict(got), flatten_dict(want)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
    return len(a)


_CASES = [(f, c) for f, cs in COMPONENTS.items() for c in cs] + [("flux", "transformer"), ("flux_bare", "transformer")]


@pytest.mark.parametrize("name,component", _CASES)
def test_load_single_file_matches_load_component(files, name, component):
    path, directory = files[name]
    stats = {}
    model, params = load_single_file(path, component, config=directory, stats=stats)
    want_model, want = C.load_component(directory, component)
    assert type(model) is type(want_model)
    n = _assert_trees_equal(params, want)
    assert n >= 10
    assert stats["kind"] == name.split("_")[0]
    assert stats["unused"] == [], stats["unused"][:5]  # every tensor of the component went somewhere
    assert stats["bytes_read"] > 0


def test_sharded_flux_load_reads_row_pieces(files):
    """FSDP-sharded leaves cut across the fused qkv / linear1 pieces and the swapped final halves."""
    import jax
    from jax.sharding import Mesh

    path, directory = files["flux"]
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    _, params = load_single_file(path, "transformer", config=directory, shardings=C.fsdp(mesh, min_size=1))
    _, want = C.load_component(directory, "transformer")
    _assert_trees_equal(params, want)
    sharded = [x for x in jax.tree.leaves(params) if len(x.sharding.device_set) == 8 and not x.is_fully_replicated]
    assert len(sharded) >= 10


def test_dtype_casts_like_load_component(files):
    import jax.numpy as jnp

    path, directory = files["sdxl"]
    _, params = load_single_file(path, "text_encoder_2", config=directory, dtype=jnp.bfloat16)
    _, want = C.load_component(directory, "text_encoder_2", dtype=jnp.bfloat16)
    assert _assert_trees_equal(params, want) > 10
    assert {x.dtype for x in flatten_dict(params).values()} == {jnp.dtype(jnp.bfloat16)}


def test_view_reads_blocks_of_renamed_tensors(files):
    path, _ = files["flux"]
    with sf.open_single_file(path, "transformer") as view:
        for key in ("norm_out.linear.weight", "single_transformer_blocks.0.proj_mlp.weight",
                    "transformer_blocks.0.attn.add_v_proj.bias"):
            full = view.read(key)
            assert full.shape == view.shape(key)
            n = full.shape[0]
            for lo, hi in ((0, n), (n // 4, 3 * n // 4), (n // 2 - 3, n // 2 + 5), (n - 1, n)):
                np.testing.assert_array_equal(view.read(key, (slice(lo, hi),)), full[lo:hi])
    path, _ = files["sdxl"]
    with sf.open_single_file(path, "text_encoder_2") as view:
        key = "text_projection.weight"
        full = view.read(key)
        np.testing.assert_array_equal(view.read(key, (slice(3, 9), slice(1, 30))), full[3:9, 1:30])
    with sf.open_single_file(path, "vae") as view:
        key = "encoder.mid_block.attentions.0.to_q.weight"
        assert len(view.shape(key)) == 2
        np.testing.assert_array_equal(view.read(key, (slice(2, 5),)), view.read(key)[2:5])


def test_sd2_open_clip_text_encoder(files, tmp_path):
    """SD 2.x stores its text encoder as OpenCLIP under `cond_stage_model.model.` (fused in_proj, extras)."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sd_path, directory = files["sd"]
    prefix = "cond_stage_model.model."
    tensors = {k: v for k, v in load_file(sd_path).items() if not k.startswith("cond_stage_model.")}
    te = _weights(directory, "text_encoder")
    width = te["text_model.final_layer_norm.weight"].shape[0]
    tensors.update(_open_clip_to_ldm(te, prefix))
    tensors[prefix + "text_projection"] = torch.randn(width, width)  # SD 2.x files carry these; diffusers drops them
    tensors[prefix + "logit_scale"] = torch.tensor(4.6)
    path = str(tmp_path / "sd2.safetensors")
    save_file(tensors, path)

    got = convert_open_clip_checkpoint(SimpleNamespace(config=SimpleNamespace(hidden_size=width)), load_file(path), prefix)
    _assert_state_dicts_equal(got, te)
    stats = {}
    _, params = load_single_file(path, "text_encoder", config=directory, stats=stats)
    _assert_trees_equal(params, C.load_component(directory, "text_encoder")[1])
    assert stats["unused"] == [prefix + "logit_scale", prefix + "text_projection"]


# --- detection and errors ------------------------------------------------------------------------------


def test_detect(files):
    assert sf.detect(["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"]) == "sd"
    assert sf.detect(["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.x"]) == "sdxl"
    assert sf.detect(["double_blocks.0.img_attn.qkv.weight"]) == "flux"
    assert sf.detect(["model.diffusion_model.double_blocks.3.img_attn.qkv.weight"]) == "flux"
    assert sf.detect(["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]) is None
    with C.ckpts.open_checkpoint(files["sdxl"][0]) as ckpt:
        assert sf.components(sf.detect(ckpt.where), ckpt.where) == ["unet", "vae", "text_encoder", "text_encoder_2"]


@pytest.mark.parametrize("name,component", _CASES)
def test_block_counts_from_keys_match_the_config(files, name, component):
    path, directory = files[name]
    with C.ckpts.open_checkpoint(path) as ckpt:
        shapes = {k: ckpt.shape(k) for k in ckpt.where}
    kind = sf.detect(shapes)
    config = C.read_config(os.path.join(directory, component))
    assert sf.renames(kind, component, shapes) == sf.renames(kind, component, shapes, config)


def test_errors_name_the_file_and_the_fix(files, tmp_path):
    sd_path, sd_dir = files["sd"]
    with pytest.raises(errors.ModelFileNotFoundError, match=r"no text_encoder_2.*holds: unet, vae, text_encoder"):
        load_single_file(sd_path, "text_encoder_2", config=files["sdxl"][1])
    flux_path, flux_dir = files["flux"]
    with pytest.raises(errors.ModelFileNotFoundError, match=r"flux single file has no vae.*load_component"):
        load_single_file(flux_path, "vae", config=flux_dir)
    diffusers_file = C.ckpts.weight_files(os.path.join(sd_dir, "unet"))[0]
    with pytest.raises(errors.UnsupportedModelError, match=r"diffusion_pytorch_model.safetensors: not a single-file"):
        load_single_file(diffusers_file, "unet", config=sd_dir)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"PK")
    with pytest.raises(errors.UnsupportedModelError, match=r"model.ckpt: a pickled torch checkpoint.*safetensors"):
        load_single_file(str(pickled), "unet", config=sd_dir)
    with pytest.raises(errors.ModelFileNotFoundError, match="no such single-file"):
        load_single_file(str(tmp_path / "missing.safetensors"), "unet", config=sd_dir)
    with pytest.raises(errors.ShapeMismatchError, match=r"sd.safetensors \(sd single file.*config=.*"
                       r"file key model\.diffusion_model\.middle_block\.1\.transformer_blocks\.0\.attn2\.to_k"):
        load_single_file(sd_path, "unet", config=files["sdxl"][1])  # another model's config


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_pipeline_from_a_single_file_makes_the_folders_images(files, name):
    """The images of the single file (with the folder for configs and tokenizers) equal the folder's."""
    from jlora.pipelines import Request, load_pipeline

    path, folder = files[name]
    requests = [Request("a photo of a cat", seed=3, steps=2, width=32, height=32, guidance=4.0)]
    want = load_pipeline(folder).generate(requests)
    got = load_pipeline(path, config=folder).generate(requests)
    np.testing.assert_array_equal(got, want)


def test_generate_script_takes_a_single_file(files, tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import generate

    path, folder = files["sd"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat", "width": 32, "height": 32, "steps": 2}\n')
    assert generate.main(["--model", path, "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--config" in capsys.readouterr().err
    assert generate.main(["--model", path, "--config", folder, "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                          "--no-progress"]) == 0
    assert (tmp_path / "o" / "000001.png").exists()
