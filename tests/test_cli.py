"""`jlora inspect` and `jlora convert`: figures, JSON, and kohya -> diffusers files that diffusers loads."""

import argparse
import json
import os

import jax
import numpy as np
import pytest

import jlora
import reference as R
from converters import architectures
from converters.errors import UnsafeFileError
from converters.naming import get_scheme
from converters.safetensors_io import save_file
from jlora.cli import _parser, main
from jlora.inspection import OutputExistsError, config_indexes, convert_file, inspect_file
from jlora.loading import shape_index


def _kohya_from_peft(peft_path, out_path, alpha=6.0):
    """The same LoRA under kohya names (`lora_unet_...lora_down.weight`, `.alpha`)."""
    sd = jlora.lora_state_dict(peft_path)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    out = {}
    for key, value in sd.items():
        component, rest = key.split(".", 1)
        module, role = rest.rsplit(".lora_", 1)
        name = prefix[component] + module.replace(".", "_")
        out[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = np.array(alpha, np.float32)
    save_file(out, out_path)
    return out_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    unet, te = R.build_sd15_unet(), R.build_clip_text()
    d = tmp_path_factory.mktemp("cli")
    peft_path = R.make_peft_lora_file(d, [unet, te], pipeline="sd")
    kohya_path = _kohya_from_peft(peft_path, str(d / "style_kohya.safetensors"))
    indexes = {"unet": shape_index(unet.flax_params), "text_encoder": shape_index(te.flax_params)}
    return unet, te, kohya_path, indexes, d


def test_inspect_reports_format_targets_ranks_alphas(tiny):
    unet, te, path, indexes, _ = tiny
    info = inspect_file(path, indexes=indexes)
    sd = jlora.lora_state_dict(path)
    n_unet = len({k.split(".")[0] for k in sd if k.startswith("lora_unet_")})
    n_te = len({k.split(".")[0] for k in sd if k.startswith("lora_te_")})
    assert info["format"] == "kohya"
    assert info["components"]["unet"]["modules"] == n_unet and info["components"]["text_encoder"]["modules"] == n_te
    assert info["targets"] == n_unet + n_te
    assert info["components"]["unet"]["ranks"] == {"4": n_unet}
    assert info["components"]["unet"]["alphas"] == [6.0]
    assert info["dtypes"] == {"float32": len(sd)}
    assert info["size_bytes"] == os.path.getsize(path) and info["unplaced"] == {} and info["unmatched"] == []


def test_inspect_lists_keys_it_cannot_place(tiny, tmp_path):
    _, _, path, indexes, _ = tiny
    sd = dict(jlora.lora_state_dict(path))
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = np.zeros((4, 32), np.float32)
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = np.zeros((32, 4), np.float32)
    sd["lora_unet_mystery.hada_w9"] = np.zeros((2,), np.float32)
    bad = str(tmp_path / "bad.safetensors")
    save_file(sd, bad)
    info = inspect_file(bad, indexes=indexes)
    assert any("down_blocks_7" in k for k in info["unplaced"])
    assert info["unmatched"] == ["lora_unet_mystery.hada_w9"]


def test_convert_kohya_to_diffusers_loads_in_diffusers_with_equal_outputs(tiny, tmp_path):
    unet, te, path, indexes, _ = tiny
    result = convert_file(path, str(tmp_path), family="sd", to="diffusers", indexes=indexes)
    converted = result["output"]
    assert result["targets"] == inspect_file(path, indexes=indexes)["targets"]
    for ref in (unet, te):
        want = R.torch_forward(R.torch_model_with_lora(ref, path, pipeline="sd"), ref, scale=0.8)
        got = R.torch_forward(R.torch_model_with_lora(ref, converted, pipeline="sd"), ref, scale=0.8)
        effect = np.abs(want - R.torch_forward(ref.torch_model, ref)).max()
        assert effect > 0.1
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), ref.name


def _full_size_kohya(path, seed, n=40):
    """A small kohya LoRA on the first `n` Linear kernels of the real SD-1.5 UNet."""
    rng = np.random.default_rng(seed)
    index = architectures.family_indexes("sd")["unet"]
    scheme = get_scheme("diffusers_flax")
    kernels = [(p, s) for p, (s, _) in index.items() if p[-1] == "kernel" and len(s) == 2][:n]
    out = {}
    for p, (n_in, n_out) in kernels:
        name = "lora_unet_" + scheme.to_module(p[:-1]).replace(".", "_")
        out[f"{name}.lora_down.weight"] = rng.standard_normal((2, n_in)).astype(np.float16)
        out[f"{name}.lora_up.weight"] = rng.standard_normal((n_out, 2)).astype(np.float16)
        out[f"{name}.alpha"] = np.array(1.0, np.float16)
    save_file(out, path)
    return path


def test_cli_json_and_batch_convert_to_flax(tmp_path, capsys):
    a = _full_size_kohya(str(tmp_path / "a.safetensors"), 0)
    b = _full_size_kohya(str(tmp_path / "b.safetensors"), 1, n=10)
    assert main(["inspect", a, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd" and info["targets"] == 40 and info["components"]["unet"]["ranks"] == {"2": 40}
    assert main(["convert", a, b, "--family", "sd", "--to", "flax", "-o", str(tmp_path / "out"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["targets"] for r in results] == [40, 10]
    params = {c: jlora.abstract_params(i) for c, i in architectures.family_indexes("sd").items()}
    for src, r in zip((a, b), results):
        back = jlora.load_adapters(r["output"], params)
        direct = jlora.load_lora_weights(src, params)
        assert jlora.count(back["unet"]) == jlora.count(direct["unet"])
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(direct)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cli_reports_failures_with_exit_code(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00\x01")
    assert main(["inspect", str(bad), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["error_type"] == "CorruptFileError" and "broken.safetensors" in info["error"]


def test_flux_kohya_file_inspect_and_convert(tmp_path, capsys):
    """A kohya Flux file at Flux.1 size: inspect guesses flux, convert writes per-module diffusers keys."""
    rng = np.random.default_rng(0)
    d = 3072
    sd = {
        "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight": rng.standard_normal((2, d)).astype(np.float16),
        "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight": rng.standard_normal((3 * d, 2)).astype(np.float16),
        "lora_unet_double_blocks_3_img_attn_qkv.alpha": np.array(1.0, np.float16),
        "lora_unet_single_blocks_20_linear2.lora_down.weight": rng.standard_normal((2, 5 * d)).astype(np.float16),
        "lora_unet_single_blocks_20_linear2.lora_up.weight": rng.standard_normal((d, 2)).astype(np.float16),
    }
    path = str(tmp_path / "flux_style.safetensors")
    save_file(sd, path)
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya_flux" and info["family"] == "flux" and info["targets"] == 4 and not info["unplaced"]
    assert main(["convert", path, "--to", "diffusers", "-o", str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = sorted(jlora.lora_state_dict(result["output"]))
    assert keys == sorted(
        f"transformer.{m}.lora_{x}.weight"
        for m in ("transformer_blocks.3.attn.to_q", "transformer_blocks.3.attn.to_k", "transformer_blocks.3.attn.to_v",
                  "single_transformer_blocks.20.proj_out")
        for x in "AB"
    )


@pytest.fixture
def evil_file(tmp_path):
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    path = str(tmp_path / "evil.safetensors")
    save_file({f"unet.{q}.lora_A.weight": np.ones((4, 320), np.float32), f"unet.{q}.lora_B.weight": np.ones((320, 4), np.float32),
               "unet.x\x1b[2JEVIL.lora_A.weight": np.ones((4, 320), np.float32),
               "unet.x\x1b[2JEVIL.lora_B.weight": np.ones((320, 4), np.float32)}, path)
    return path


@pytest.mark.parametrize("case", ["missing-config", "bad-json-config", "list-config", "out-is-a-file", "missing-file",
                                  "folder-without-config", "bad-text-encoder-config"])
def test_user_errors_print_one_line_without_traceback(tmp_path, capsys, evil_file, case):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "a_file").write_text("x")
    argv = {
        "missing-config": ["inspect", evil_file, "--unet-config", str(tmp_path / "none.json")],
        "bad-json-config": ["inspect", evil_file, "--unet-config", str(tmp_path / "bad.json")],
        "list-config": ["convert", evil_file, "--to", "diffusers", "-o", str(tmp_path / "o"), "--unet-config",
                        str(tmp_path / "list.json")],
        "out-is-a-file": ["convert", evil_file, "--to", "diffusers", "-o", str(tmp_path / "a_file"), "--non-strict"],
        "missing-file": ["inspect", str(tmp_path / "nothing.safetensors")],
        "folder-without-config": ["inspect", evil_file, "--unet-config", str(tmp_path)],
        "bad-text-encoder-config": ["inspect", evil_file, "--text-encoder-config", str(tmp_path / "list.json")],
    }[case]
    code = main(argv)
    captured = capsys.readouterr()
    assert code in (1, 2)
    assert "Traceback" not in captured.err + captured.out
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
    assert (tmp_path / "a_file").read_text() == "x"


def test_json_output_of_a_user_error_has_its_type(tmp_path, capsys, evil_file):
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["inspect", evil_file, "--unet-config", str(tmp_path / "list.json"), "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error_type"] == "UnsupportedModelError"
    assert captured.err.startswith("error: --unet-config")


def test_key_names_are_printed_with_control_characters_escaped(capsys, evil_file):
    main(["inspect", evil_file])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "x\\x1b[2JEVIL" in out


def test_inspect_exits_1_with_error_type_when_the_file_does_not_fit(tiny, tmp_path, capsys):
    _, _, tiny_path, _, _ = tiny
    assert main(["inspect", tiny_path, "--json"]) == 1  # tiny shapes checked against the standard SD-1.5 models
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd" and info["error_type"] == "ShapeMismatchError"
    path = _full_size_kohya(str(tmp_path / "a.safetensors"), 0, n=5)
    sd = dict(jlora.lora_state_dict(path))
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = np.zeros((2, 320), np.float16)
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = np.zeros((320, 2), np.float16)
    save_file(sd, path)
    assert main(["inspect", path, "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["error_type"] == "KeyMismatchError" and info["targets"] == 5 and len(info["unplaced"]) == 2
    assert main(["inspect", path]) == 1
    assert "cannot place 2 keys" in capsys.readouterr().out


def test_inspect_shows_kohya_training_metadata(tmp_path, capsys):
    path = _full_size_kohya(str(tmp_path / "a.safetensors"), 0, n=3)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1.0",
            "ss_output_name": "my_style", "ss_tag_frequency": json.dumps({"d": {"tag": 3}}), "ss_seed": "42"}
    save_file(jlora.lora_state_dict(path), path, metadata=meta)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "network_module        networks.lora" in out and "output_name           my_style" in out
    assert "tag_frequency" not in out and "kohya training metadata (6 ss_* keys)" in out
    assert main(["inspect", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"] == meta


def test_inspect_alphas_and_counts_agree_with_modules(tmp_path, capsys):
    path = _full_size_kohya(str(tmp_path / "a.safetensors"), 0, n=7)
    assert main(["inspect", path, "--json"]) == 0
    unet = json.loads(capsys.readouterr().out)["components"]["unet"]
    assert (unet["modules"], unet["placed_modules"], unet["weights"], unet["stacked_or_fused_weights"]) == (7, 7, 7, 0)
    assert unet["file_alphas"] == {"1.0": 7} and unet["alpha_source"] == "file"
    assert main(["inspect", path]) == 0
    assert "7 modules -> 7 weights {'lora': 7}, ranks {'2': 7}, alphas [1.0] from .alpha tensors" in capsys.readouterr().out
    save_file({k: v for k, v in jlora.lora_state_dict(path).items() if not k.endswith(".alpha")}, path)
    assert main(["inspect", path]) == 0
    assert "no alphas in file (alpha = rank)" in capsys.readouterr().out


def test_inspect_alphas_from_peft_metadata(tiny):
    _, _, _, indexes, d = tiny
    info = inspect_file(os.path.join(d, R.LORA_WEIGHT_NAME), indexes=indexes)  # PEFT r=4, lora_alpha=8
    unet = info["components"]["unet"]
    assert info["format"] == "peft" and unet["alpha_source"] == "metadata" and unet["alphas"] == [8.0]
    assert unet["file_alphas"] == {} and unet["modules"] == unet["weights"]
    assert info["targets"] == info["weights"] == unet["weights"] + info["components"]["text_encoder"]["weights"]


def _flux_double_only(path, alpha=True):
    rng = np.random.default_rng(0)
    d = 3072
    sd = {}
    for i in (3, 4):
        sd[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_down.weight"] = rng.standard_normal((2, d)).astype(np.float16)
        sd[f"lora_unet_double_blocks_{i}_img_attn_qkv.lora_up.weight"] = rng.standard_normal((3 * d, 2)).astype(np.float16)
        sd[f"lora_unet_double_blocks_{i}_img_attn_proj.lora_down.weight"] = rng.standard_normal((2, d)).astype(np.float16)
        sd[f"lora_unet_double_blocks_{i}_img_attn_proj.lora_up.weight"] = rng.standard_normal((d, 2)).astype(np.float16)
        if alpha:
            sd[f"lora_unet_double_blocks_{i}_img_attn_qkv.alpha"] = np.array(1.0, np.float16)
    save_file(sd, path)
    return path


def test_flux_counts_explain_fused_and_stacked_weights(tmp_path, capsys):
    path = _flux_double_only(str(tmp_path / "f.safetensors"))
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    t = info["components"]["transformer"]
    # 2 blocks x (qkv -> to_q, to_k, to_v; proj -> to_out.0) on the layer-stacked qkv and proj weights
    assert (t["modules"], t["placements"], t["weights"], t["stacked_or_fused_weights"]) == (4, 8, 2, 2)
    assert info["targets"] == 8 and info["weights"] == 2 and t["file_alphas"] == {"1.0": 2}
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "4 modules -> 8 module weights on 2 weights (2 stacked/fused)" in out
    assert "alphas [1.0] from .alpha tensors (2 without: alpha = rank)" in out


def test_family_is_guessed_from_the_format(tmp_path, capsys):
    """A kohya-Flux file with only double blocks has no name that says Flux; its format does."""
    path = _flux_double_only(str(tmp_path / "f.safetensors"))
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya_flux" and info["family"] == "flux" and info["family_guessed"] is True
    assert not info["unplaced"] and "error" not in info
    assert main(["convert", path, "--to", "flax", "-o", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "flux"


@pytest.mark.parametrize("as_folder", [True, False])
def test_model_configs_from_files_or_folders(tiny, tmp_path, capsys, as_folder):
    unet, te, path, indexes, _ = tiny
    unet.torch_model.save_config(str(tmp_path / "unet"))
    te.torch_model.config.save_pretrained(str(tmp_path / "text_encoder"))
    where = {c: str(tmp_path / c) if as_folder else str(tmp_path / c / "config.json") for c in ("unet", "text_encoder")}
    built = config_indexes(unet_config=where["unet"], text_encoder_config=where["text_encoder"])
    for c in ("unet", "text_encoder"):
        assert {p: s for p, (s, _) in built[c].items()} == {p: s for p, (s, _) in indexes[c].items()}
    argv = ["inspect", path, "--unet-config", where["unet"], "--text-encoder-config", where["text_encoder"], "--json"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["targets"] == inspect_file(path, indexes=indexes)["targets"] and not info["unplaced"]
    assert main(argv[:-3] + ["--json"]) == 1  # without the text encoder's config its keys do not fit CLIP-L


def test_text_encoder_2_config_with_projection(tmp_path):
    te2 = R.build_clip_text_proj()
    te2.torch_model.config.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())  # no architectures, whatever saved the shared model
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "architectures"}))
    built = config_indexes(text_encoder_2_config=str(tmp_path))["text_encoder_2"]
    assert {p: s for p, (s, _) in built.items()} == {p: s for p, (s, _) in shape_index(te2.flax_params).items()}
    assert ("text_projection", "kernel") in built
    assert ("text_projection", "kernel") not in config_indexes(text_encoder_config=str(tmp_path))["text_encoder"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, architectures=["CLIPTextModel"])))
    assert ("text_projection", "kernel") not in config_indexes(text_encoder_2_config=str(tmp_path))["text_encoder_2"]


def test_pickle_refusal_names_the_cli_option(tmp_path, capsys):
    path = tmp_path / "old.bin"
    path.write_bytes(b"not read")
    assert main(["inspect", str(path), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["error_type"] == "UnsafeFileError" and "--allow-pickle" in info["error"]
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):  # the library's own message is unchanged
        jlora.lora_state_dict(str(path))


def test_version_and_help_on_every_argument(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"jlora {jlora.__version__}"
    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("jlora", parser)] + list(subparsers.choices.items()):
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (name, action.dest)


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    path = _full_size_kohya(str(tmp_path / "a.safetensors"), 0, n=3)
    argv = ["convert", path, "--to", "flax", "-o", str(tmp_path / "out"), "--json"]
    assert main(argv) == 0
    output = json.loads(capsys.readouterr().out)["output"]
    with open(output, "ab") as f:
        f.write(b"marker")
    before = open(output, "rb").read()
    assert main(argv) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["error_type"] == "OutputExistsError" and "--overwrite" in result["error"]
    assert open(output, "rb").read() == before
    with pytest.raises(OutputExistsError):
        convert_file(path, str(tmp_path / "out"), family="sd", to="flax")
    assert main(argv + ["--overwrite"]) == 0
    assert open(output, "rb").read() != before
