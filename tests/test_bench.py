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
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    phases = ("dequant", "quant", "train", "step7b", "headline")
    assert set(res) >= set(phases) and not any("error" in res[k] for k in phases), res
    equal = res["dequant"]["byte_equal_with_bitsandbytes"]
    assert equal and all(equal.values()), equal
    assert {r["impl"] for r in res["dequant"]["rows"]} >= {"copy", "lowbit Triton", "bitsandbytes"}
    for key in ("byte_equal_with_cpu_path", "byte_equal_with_bitsandbytes"):
        same = res["quant"][key]
        assert same and all(same.values()), (key, same)
    assert any(k.endswith("nf2") for k in res["quant"]["byte_equal_with_cpu_path"])
    # lowbit.train with the run's device against the same run in float32
    assert res["train"]["within_bf16_tolerance"] and len(res["train"]["device_run"]["losses"]) == 3
    assert res["step7b"]["lowbit"]["finite"] and res["step7b"]["peer"]["finite"]
    # the same checkpoint and the same batch in both stacks: the first losses agree closely
    assert abs(res["step7b"]["lowbit"]["first_loss"] - res["step7b"]["peer"]["first_loss"]) < 0.05
    assert res["headline"]["finite"] and res["headline"]["planner_predicted_bytes"] > 0


def test_load_memory_smoke():
    """bench/load_memory.py on a 2-layer LLaMA-2-7B-shaped checkpoint: the loading process stays within 1.2 × the
    loaded model + one bf16 layer (the script exits non-zero otherwise)."""
    p = subprocess.run([sys.executable, str(BENCH / "load_memory.py"), "--smoke"], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert "| LLaMA-2-7B shape, 2 layers" in p.stdout and "True" in p.stdout
