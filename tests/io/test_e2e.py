"""The end-to-end pass: it brings the quantized model's next-token distribution closer to the float model's on
batches it never saw, by scales alone (the codes do not change); the LoRA start it trains is the run's start
for the layers named; the result saves and loads as an ordinary checkpoint; its stage runs last."""

import pytest
import torch
from test_blockwise import _batches

from lowbit.errors import LowbitError
from lowbit.io.calibration import calibrate
from lowbit.io.e2e import calibrate_e2e
from lowbit.io.export import save_quantized
from lowbit.io.loader import SourceWeights, load
from lowbit.nn.linear import Linear4bit
from lowbit.quant.spec import QuantSpec, calibration_stages

from tiny import save_tiny

quiet = lambda *a: None


def _kl_to_float(ref, net, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for b in batches:
            keep = b["attention_mask"].bool()
            p = torch.log_softmax(ref(**b).logits.float(), -1)[keep]
            q = torch.log_softmax(net(**b).logits.float(), -1)[keep]
            total += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))
    return total / len(batches)


def _codes(net):
    return {n: m.codes.clone() for n, m in net.named_modules() if isinstance(m, Linear4bit)}


def test_closer_to_the_float_model_on_unseen_batches_with_the_same_codes(tmp_path):
    save_tiny(tmp_path, "llama")
    ref = load(tmp_path, None, compute_dtype=torch.float32).eval()
    net = load(tmp_path, QuantSpec("nf2"), compute_dtype=torch.float32).eval()
    calibrate(net, _batches(16, 0), "clip", log=quiet)
    codes, unseen = _codes(net), _batches(6, 9)
    before = _kl_to_float(ref, net, unseen)
    with SourceWeights(net) as source:
        assert calibrate_e2e(net, _batches(16, 0), source, log=quiet, epochs=12) == {}
    after = _kl_to_float(ref, net, unseen)
    assert after < 0.98 * before, (before, after)
    assert all(torch.equal(c, _codes(net)[n]) for n, c in codes.items())
    report = net.lowbit_e2e_report  # held-out loss before, after each epoch, with the scales stored
    assert min(report[1:-1]) < report[0] and abs(report[-1] - min(report[:-1])) < 0.01 * report[0]
    assert all(m.scale_log is None for m in net.modules() if isinstance(m, Linear4bit))


def test_lora_start_for_the_named_layers_continues_blockwise(tmp_path):
    save_tiny(tmp_path, "llama")
    net = load(tmp_path, QuantSpec("nf2"), compute_dtype=torch.float32).eval()
    named = {n for n, m in net.named_modules() if isinstance(m, Linear4bit) and n.endswith(("v_proj", "up_proj"))}
    lines = []
    starts = calibrate(net, _batches(8, 0), "blockwise+e2e", log=lines.append, lora=(4, 2.0, named))
    assert set(starts) == named
    assert any("e2e pass" in s and "with a LoRA start" in s for s in lines)
    for n, (a, b) in starts.items():
        mod = net.get_submodule(n)
        assert a.shape == (4, mod.in_features) and b.shape == (mod.out_features, 4) and b.abs().sum() > 0


def test_result_is_an_ordinary_checkpoint(tmp_path):
    save_tiny(tmp_path / "f", "qwen2")
    net = load(tmp_path / "f", QuantSpec("nf3"), compute_dtype=torch.float32).eval()
    calibrate(net, _batches(4, 0), "clip+e2e", log=quiet)
    save_quantized(net, tmp_path / "q")
    back = load(tmp_path / "q", compute_dtype=torch.float32).eval()
    ids = _batches(1, 5)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, back(input_ids=ids).logits)


def test_stage_order():
    assert calibration_stages("awq+clip+blockwise+e2e") == ("awq", "clip", "blockwise", "e2e")
    assert calibration_stages("gptq+e2e") == ("gptq", "e2e")
    with pytest.raises(LowbitError, match="in the order"):
        calibration_stages("e2e+blockwise")
