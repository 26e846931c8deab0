"""The README's demo command runs and reports what it claims."""

import re

import numpy as np

from jlora.cli import main
from jlora.pipelines import images


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert captured.err.count("... ") >= 5  # the stages as they run
    assert re.search(r"compilations for scales 0.0, 0.5, 1.0\s+1\n", out)
    assert re.search(r"max \|y\(scale 0\) - y\(base\)\|\s+0.00e\+00", out)
    effect = float(re.search(r"\(LoRA effect\)\s+([0-9.]+)", out).group(1))
    sharded = float(re.search(r"sharded\(8 devices\) - single\|\s+([0-9.e+-]+)", out).group(1))
    assert effect > 0.1 and sharded < 1e-4 * effect
    assert re.search(r"saved file reloads to the same factors\s+True", out)
    flux_effect = float(re.search(r"Flux: max \|y\(scale 1\) - y\(scale 0\)\|\s+([0-9.]+)", out).group(1))
    assert flux_effect > 0.1
    assert (tmp_path / "saved" / "pytorch_lora_weights.safetensors").exists()
    assert re.search(r"hotswap: compilations for LoRAs of rank 2, 4, 6\s+1\n", out)
    assert re.search(r"hotswap: max \|padded rank-8 - unpadded\| \(rank 4\)\s+0.00e\+00", out)
    per_sample = float(re.search(r"per sample: .* max \|d\| vs merged\s+([0-9.e+-]+)", out).group(1))
    assert per_sample < 1e-4 * effect
    first, last = map(float, re.search(r"loss first -> last\s+([0-9.]+) -> ([0-9.]+)", out).groups())
    assert last < 0.7 * first
    assert re.search(r"orbax checkpoint restores the same state\s+True", out)
    names = ["no_lora", "style_a", "style_b", "a_0.5+b_0.5"]
    pngs = [images.read_png(str(tmp_path / "images" / f"{n}.png")) for n in names]
    assert all(p.shape == (64, 64, 3) for p in pngs)
    assert all(np.abs(p.astype(int) - pngs[0].astype(int)).max() > 20 for p in pngs[1:])  # each LoRA shows
    assert (tmp_path / "images" / "contact_sheet.png").exists()
    assert int(re.search(r"each set merged alone, max \|d\|\s+(\d+) of 255", out).group(1)) <= 2
