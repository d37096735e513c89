"""A tiny mixture-of-experts model fine-tuned end to end through the command line (slow): `lowbit train` with an
adapter on every expert, `lowbit merge` (with the 4-bit re-quantized copy), `lowbit quantize`; transformers
loads what comes out and computes what lowbit does."""

import json
import subprocess
import sys

import pytest
import torch

from lowbit.io.adapters import load_adapter
from lowbit.io.loader import load

from tiny import save_tiny_with_tokenizer

pytestmark = pytest.mark.slow


def _lowbit(*args):
    p = subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_train_merge_quantize(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    save_tiny_with_tokenizer(model, arch)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"what is the capital of france {i % 5}"},
        {"role": "assistant", "content": "the capital of france is paris"}]}) for i in range(80)) + "\n")
    run = tmp_path / "run"
    _lowbit("train", "--model", model, "--datasets", data, "--lora-target-modules", "all-linear+experts",
            "--lora-r", 4, "--lora-alpha", 8, "--max-steps", 16, "--learning-rate", 3e-3, "--warmup-steps", 2,
            "--micro-batch-size", 4, "--sequence-len", 64, "--eval-steps", 8, "--val-set-size", 0.1,
            "--compute-dtype", "float32", "--output-dir", run, "--quiet")
    evals = [r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("eval_loss") is not None]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == [f"model.layers.{i}.mlp.experts.{m}" for i in (0, 1)
                                        for m in ("gate_up_proj", "down_proj")]

    merged = tmp_path / "merged"
    _lowbit("merge", "--model", model, "--adapter", run, "--out", merged, "--dtype", "fp32", "--requantize",
            "--compute-dtype", "float32")
    ids = torch.randint(4, 200, (2, 12))
    net = load_adapter(load(model, compute_dtype=torch.float32), run)
    with torch.no_grad():
        want = net.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
        assert torch.allclose(got, want, atol=1e-4)
        # the 4-bit copy of the merge: transformers + bitsandbytes compute what lowbit does with it
        requantized = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-nf4").eval()(ids).logits.float()
        mine = load(tmp_path / "merged-nf4").eval()(ids).logits.float()
        assert ((requantized - mine).norm() / mine.norm()) < 2e-2

    q4 = tmp_path / "q4"
    _lowbit("quantize", "--model", model, "--out", q4)
    with torch.no_grad():
        bnb = AutoModelForCausalLM.from_pretrained(q4).eval()(ids).logits
        mine = load(model, compute_dtype=torch.float32).eval()(ids).logits
        assert ((bnb - mine).norm() / mine.norm()) < 1e-2
