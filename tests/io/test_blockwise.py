"""Block-wise reconstruction: every block's output moves closer to the float block's than the grid it started from
(frozen codes, stored scales); the LoRA start is trained for the named layers only and adds to the frozen codes;
the result is an ordinary checkpoint that saves and loads to the same logits."""

import pytest
import torch

from lowbit.io.blockwise import calibrate_blockwise
from lowbit.io.calibration import calibrate
from lowbit.io.export import save_quantized
from lowbit.io.loader import SourceWeights, load
from lowbit.nn.decoder_layers import decoder_layers
from lowbit.nn.linear import Linear4bit
from lowbit.quant.spec import QuantSpec

from tiny import save_tiny


def _batches(n, seed, t=24):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, t, dtype=torch.long)
        mask[3, t // 2:] = 0  # a padded row: its tail must not count
        out.append({"input_ids": torch.randint(0, 256, (4, t), generator=g), "attention_mask": mask})
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_block_ends_closer_to_the_float_block(tmp_path, arch):
    save_tiny(tmp_path, arch)
    net = load(tmp_path, QuantSpec("nf2"), compute_dtype=torch.float32)
    before = {n: m.weight.absmax_float().clone() for n, m in net.named_modules() if isinstance(m, Linear4bit)}
    with SourceWeights(net) as source:
        assert calibrate_blockwise(net, _batches(8, 0), source, log=lambda *a: None, epochs=3) == {}
    report = net.lowbit_blockwise_report
    assert len(report) == len(decoder_layers(net))
    for i, (start, end) in enumerate(report):
        assert end < 0.9 * start, (i, start, end)
    moved = [n for n, m in net.named_modules() if isinstance(m, Linear4bit)
             and not torch.equal(m.weight.absmax_float(), before[n])]
    assert len(moved) == len(before)  # the scales trained


def test_lora_start_only_where_named_and_it_counts(tmp_path):
    save_tiny(tmp_path, "llama")
    net = load(tmp_path, QuantSpec("nf2"), compute_dtype=torch.float32)
    named = {n for n, m in net.named_modules() if isinstance(m, Linear4bit) and n.endswith(("q_proj", "down_proj"))}
    with SourceWeights(net) as source:
        starts = calibrate_blockwise(net, _batches(8, 0), source, log=lambda *a: None, lora=(4, 2.0, named))
    assert set(starts) == named
    for n, (a, b) in starts.items():
        mod = net.get_submodule(n)
        assert a.shape == (4, mod.in_features) and b.shape == (mod.out_features, 4) and b.abs().sum() > 0
    with_start = [end for _, end in net.lowbit_blockwise_report]
    again = load(tmp_path, QuantSpec("nf2"), compute_dtype=torch.float32)
    with SourceWeights(again) as source:
        calibrate_blockwise(again, _batches(8, 0), source, log=lambda *a: None)
    assert sum(with_start) < sum(end for _, end in again.lowbit_blockwise_report)


def test_result_is_an_ordinary_checkpoint(tmp_path):
    save_tiny(tmp_path / "f", "llama")
    net = load(tmp_path / "f", QuantSpec("nf3"), compute_dtype=torch.float32).eval()
    calibrate(net, _batches(4, 0), "clip+blockwise", log=lambda *a: None)
    save_quantized(net, tmp_path / "q")
    back = load(tmp_path / "q", compute_dtype=torch.float32).eval()
    ids = _batches(1, 5)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, back(input_ids=ids).logits)
