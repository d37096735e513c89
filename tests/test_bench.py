"""Smoke tests of the benchmark scripts (slow): they run, and write what the README is made from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_retention_quick(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH / "retention.py"), "--quick", "--results", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "retention.json").read_text())
    assert set(res) >= {"base", "budget", "methods"} and set(res["methods"]) == {"lora", "qlora-nf4"}
    for m in res["methods"].values():
        assert {"eval_loss", "accuracy", "retention_vs_lora", "peak_rss_bytes", "footprint_bytes", "tokens_per_s",
                "seeds", "pre_train_loss", "bits_per_param"} <= set(m)
        assert 0 <= m["accuracy"] <= 1 and m["eval_loss"] > 0 and m["pre_train_loss"] > m["eval_loss"]
    assert res["methods"]["lora"]["retention_vs_lora"] == pytest.approx(1.0)
    assert res["methods"]["lora"]["bits_per_param"] == 16 and 4.1 < res["methods"]["qlora-nf4"]["bits_per_param"] < 4.2
    assert (tmp_path / "retention.png").stat().st_size > 1000
    md = (tmp_path / "retention.md").read_text()
    assert "| qlora-nf4" in md and "bits/param" in md and "loss_before_training" in md


def test_gpu_bench_smoke(tmp_path):
    """bench/gpu.py end to end on CPU (tiny shapes, Triton's interpreter): the GPU run fails for GPU reasons only."""
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--out", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) >= {"dequant", "step7b", "headline"} and not any("error" in res[k] for k in
                                                                      ("dequant", "step7b", "headline")), res
    equal = res["dequant"]["byte_equal_with_bitsandbytes"]
    assert equal and all(equal.values()), equal
    assert {r["impl"] for r in res["dequant"]["rows"]} >= {"copy", "lowbit Triton", "bitsandbytes"}
    assert res["step7b"]["lowbit"]["finite"] and res["step7b"]["peer"]["finite"]
    # the same bytes in both stacks: the first losses agree closely
    assert abs(res["step7b"]["lowbit"]["loss"] - res["step7b"]["peer"]["loss"]) < 0.05
    assert res["headline"]["finite"] and res["headline"]["planner_predicted_bytes"] > 0
