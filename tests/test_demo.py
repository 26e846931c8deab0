"""The README's demo command runs and reports what it claims."""

import re

from jlora.cli import main


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"compilations for scales 0.0, 0.5, 1.0\s+1\n", out)
    assert re.search(r"max \|y\(scale 0\) - y\(base\)\|\s+0.00e\+00", out)
    effect = float(re.search(r"\(LoRA effect\)\s+([0-9.]+)", out).group(1))
    sharded = float(re.search(r"sharded\(8 devices\) - single\|\s+([0-9.e+-]+)", out).group(1))
    assert effect > 0.1 and sharded < 1e-4 * effect
    assert re.search(r"saved file reloads to the same factors\s+True", out)
    flux_effect = float(re.search(r"Flux: max \|y\(scale 1\) - y\(scale 0\)\|\s+([0-9.]+)", out).group(1))
    assert flux_effect > 0.1
    assert (tmp_path / "saved" / "pytorch_lora_weights.safetensors").exists()
