"""scripts/bench.py --train and --step-side: each side runs and reports (no timing asserts)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))


def test_train_benchmark_prints_its_table(capsys):
    import bench

    bench.bench_train("tiny", rank=4, batch=2, steps=1, repeat=1, base=False)
    out = capsys.readouterr().out
    assert "LoRA training, UNet tiny" in out
    for row in ("train step jlora / diffusers+PEFT (ms)", "peak memory jlora / torch (MB)", "steps/s jlora"):
        assert row in out, out
    assert "base-weights forward+backward" not in out


def test_step_side_measures_a_variant_beside_its_base():
    """`bench.py --step-side auto`: one strategy and the base step timed in one process, with its plan counts."""
    import bench

    r = bench._step_side("tiny", rank=4, variant="auto", repeat=1)
    assert r["base_ms"] > 0 and r["ms"] > 0
    assert 0 < r["unmerged"] < r["modules"], r  # the tiny UNet has both small and large-token modules
