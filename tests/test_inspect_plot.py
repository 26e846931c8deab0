"""`block_strengths` and `jlora inspect --plot`: per-module delta norms against torch, and the PNG chart."""

import json
import os

import numpy as np
import pytest
import torch

import reference as R
from converters import architectures
from converters.naming import get_scheme
from converters.safetensors_io import save_file
from jlora.cli import main
from jlora.inspection import block_strengths
from jlora.loading import shape_index
from jlora.pipelines.images import read_png


@pytest.fixture(scope="module")
def tiny():
    unet, te = R.build_sd15_unet(), R.build_clip_text()
    return unet, te, {"unet": shape_index(unet.flax_params), "text_encoder": shape_index(te.flax_params)}


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).double()


def _fro(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def _expected_group(component: str, module: str) -> str:
    parts = module.split(".")
    if component == "text_encoder":
        return f"layers.{parts[3]}"
    if parts[0] in ("down_blocks", "up_blocks"):
        return f"{parts[0]}.{parts[1]}"
    return "mid_block" if parts[0] == "mid_block" else "other"


def test_peft_file_norms_equal_torch_and_are_grouped_by_block(tiny, tmp_path):
    unet, te, indexes = tiny
    path = R.make_peft_lora_file(tmp_path, [unet, te], pipeline="sd", rank=4, alpha=8, rank_pattern={"to_k": 2})
    sd, _ = R.read_lora_file(path)
    want = {}
    for key, a in sd.items():
        if ".lora_A." in key:
            component, rest = key.split(".", 1)
            down, up = _t(a).flatten(1), _t(sd[key.replace(".lora_A.", ".lora_B.")]).flatten(1)
            want[(component, rest.rsplit(".lora_A.", 1)[0])] = _fro(8.0 / down.shape[0] * (up @ down))
    rows = block_strengths(path, indexes=indexes)
    got = {(c, m): (g, n) for c, g, m, n in rows}
    assert len(rows) == len(got) == len(want) > 40 and set(got) == set(want)
    assert {a.shape[0] for k, a in sd.items() if ".lora_A." in k} == {2, 4}
    for (component, module), (group, norm) in got.items():
        assert norm == pytest.approx(want[component, module], rel=1e-9), module
        assert group == _expected_group(component, module), module
    unet_groups = [g for c, g, _, _ in rows if c == "unet"]
    order = list(dict.fromkeys(unet_groups))
    assert order == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert unet_groups == sorted(unet_groups, key=order.index)  # each group's modules are together


def test_loha_lokr_and_conv_lora_norms_equal_torch(tiny, tmp_path):
    """LoHa: (alpha/r) (w1a w1b) * (w2a w2b); LoKr: kron(w1, w2) (full factors: no alpha); LoCon 1x1."""
    unet, _, indexes = tiny
    rng = np.random.default_rng(3)
    block = "down_blocks_0_attentions_0"
    q, k = f"lora_unet_{block}_transformer_blocks_0_attn1_to_q", f"lora_unet_{block}_transformer_blocks_0_attn1_to_k"
    proj = f"lora_unet_{block}_proj_in"
    n = indexes["unet"][("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn1", "to_q", "kernel")][0][0]
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    sd = {
        f"{q}.hada_w1_a": f(n, 3), f"{q}.hada_w1_b": f(3, n), f"{q}.hada_w2_a": f(n, 3), f"{q}.hada_w2_b": f(3, n),
        f"{q}.alpha": np.array(1.5, np.float32),
        f"{k}.lokr_w1": f(4, 4), f"{k}.lokr_w2": f(n // 4, n // 4),
        f"{proj}.lora_down.weight": f(2, n, 1, 1), f"{proj}.lora_up.weight": f(n, 2, 1, 1),
        f"{proj}.alpha": np.array(3.0, np.float32),
    }
    path = str(tmp_path / "lycoris.safetensors")
    save_file(sd, path)
    t = {key: _t(v) for key, v in sd.items()}
    want = {
        "to_q": _fro((t[f"{q}.hada_w1_a"] @ t[f"{q}.hada_w1_b"]) * (t[f"{q}.hada_w2_a"] @ t[f"{q}.hada_w2_b"]) * 1.5 / 3),
        "to_k": _fro(torch.kron(t[f"{k}.lokr_w1"], t[f"{k}.lokr_w2"])),
        "proj_in": _fro(3.0 / 2 * t[f"{proj}.lora_up.weight"].flatten(1) @ t[f"{proj}.lora_down.weight"].flatten(1)),
    }
    rows = block_strengths(path, indexes={"unet": indexes["unet"]})
    got = {m.rsplit(".", 1)[-1]: n for _, _, m, n in rows}
    assert set(got) == set(want) and {g for _, g, _, _ in rows} == {"down_blocks.0"}
    for name, norm in got.items():
        assert norm == pytest.approx(want[name], rel=1e-5), name


def _standard_sd_kohya(path, n_unet=12, n_te=4):
    """A kohya file on the real SD-1.5 shapes: the first Linear kernels of the UNet and of CLIP-L."""
    rng = np.random.default_rng(1)
    indexes = architectures.family_indexes("sd")
    out = {}
    for component, prefix, scheme, n in (("unet", "lora_unet_", "diffusers_flax", n_unet),
                                         ("text_encoder", "lora_te_", None, n_te)):
        kernels = [(p, s) for p, (s, _) in indexes[component].items() if p[-1] == "kernel" and len(s) == 2][:n]
        for i, (p, (n_in, n_out)) in enumerate(kernels):
            module = get_scheme(scheme).to_module(p[:-1]) if scheme else ".".join(p[:-1])
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = rng.standard_normal((2, n_in)).astype(np.float32)
            out[f"{name}.lora_up.weight"] = (rng.standard_normal((n_out, 2)) * (1 + i)).astype(np.float32)
            out[f"{name}.alpha"] = np.array(1.0, np.float32)
    save_file(out, path)
    return out


def test_inspect_plot_writes_a_png_and_the_values_in_json(tmp_path, capsys):
    path = str(tmp_path / "style.safetensors")
    sd = _standard_sd_kohya(path)
    png = str(tmp_path / "style.png")
    assert main(["inspect", path, "--plot", png, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plot"] == png and len(info["strengths"]) == 16
    assert {s["component"] for s in info["strengths"]} == {"unet", "text_encoder"}
    for s in info["strengths"]:
        name = ("lora_unet_" if s["component"] == "unet" else "lora_te_") + s["module"].replace(".", "_")
        down, up = _t(sd[f"{name}.lora_down.weight"]), _t(sd[f"{name}.lora_up.weight"])
        assert s["norm"] == pytest.approx(_fro(0.5 * up @ down), rel=1e-9)
    rows = block_strengths(path)
    assert [tuple(s.values()) for s in info["strengths"]] == [tuple(r) for r in rows]
    img = read_png(png)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
    ink = np.any(img != 255, axis=-1)
    colored = ink & (np.ptp(img.astype(int), axis=-1) > 60)  # bars are coloured, labels and axes are black
    assert ink.sum() > 500 and colored.sum() > 200


def test_plot_of_several_files_and_text_output(tmp_path, capsys):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    _standard_sd_kohya(a)
    _standard_sd_kohya(b, n_unet=3, n_te=0)
    assert main(["inspect", a, b, "--plot", str(tmp_path / "chart.png")]) == 0
    out = capsys.readouterr().out
    assert f"plot        {tmp_path / 'chart-a.png'} (16 modules)" in out and "(3 modules)" in out
    for stem in ("a", "b"):
        assert read_png(str(tmp_path / f"chart-{stem}.png")).shape[2] == 3
    assert not os.path.exists(tmp_path / "chart.png")
