"""scripts/bench.py --train: both sides run and the table prints (no timing asserts)."""

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
