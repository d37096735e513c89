"""Calibration of a loaded 4-bit model (GPTQ, AWQ, clipping, blockwise, chains of them): the model's logits closer
to the full-precision model's on held-out inputs than round-to-nearest's; GPTQ keeps the grid (only the codes
move); AWQ's folding keeps the model's function exactly before rounding, grouped-query attention included."""

import copy

import pytest
import torch

from lowbit.io.awq_fold import awq_groups, fold_awq
from lowbit.io.calibration import calibrate, calibrate_gptq, input_statistics
from lowbit.io.loader import SourceWeights, load
from lowbit.nn.linear import Linear4bit
from lowbit.quant.spec import QuantSpec

from tiny import save_tiny


def _batches(n, seed, t=24):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (4, t), generator=g)} for _ in range(n)]


def _outlier_model(path):
    """A tiny LLaMA (4 heads, 2 kv heads) whose norms have a few loud channels, as trained LLMs do."""
    ref = save_tiny(path, "llama").float().eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.exp(torch.randn(p.shape, generator=g) * 1.2))
    ref.save_pretrained(path, safe_serialization=True)
    return ref


def _error(net, want, held):
    with torch.no_grad():
        return sum(((net(**b).logits - w).norm() / w.norm()).item() for b, w in zip(held, want))


@pytest.mark.parametrize("method,quant_type", [("gptq", "nf4"), ("awq", "nf4"), ("both", "nf4"), ("clip", "nf3"),
                                               ("clip", "nf2"), ("awq+clip+gptq", "nf3"), ("clip+blockwise", "nf2"),
                                               ("clip", "int2"), ("awq+clip+gptq", "int3"),
                                               ("clip+blockwise", "int2")])
def test_each_method_is_closer_to_full_precision_than_round_to_nearest(tmp_path, method, quant_type):
    ref = _outlier_model(tmp_path)
    spec = QuantSpec(quant_type)
    rtn = load(tmp_path, spec, compute_dtype=torch.float32).eval()
    cal = load(tmp_path, spec, compute_dtype=torch.float32).eval()
    calibrate(cal, _batches(16, 0), method, log=lambda *a: None)
    held = _batches(4, 1)
    with torch.no_grad():
        want = [ref(**b).logits for b in held]
    assert _error(cal, want, held) < 0.9 * _error(rtn, want, held), method


def test_gptq_keeps_the_grid(tmp_path):
    save_tiny(tmp_path, "llama")
    rtn = load(tmp_path, compute_dtype=torch.float32).eval()
    cal = load(tmp_path, compute_dtype=torch.float32).eval()
    assert calibrate_gptq(cal, _batches(16, 0), log=lambda *a: None) == sum(isinstance(m, Linear4bit)
                                                                             for m in cal.modules())
    for (name, a), (_, b) in zip(rtn.named_modules(), cal.named_modules()):
        if isinstance(a, Linear4bit):  # same grid: only the codes moved
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.nested_absmax, b.nested_absmax), name
            assert a.weight.dtype == b.weight.dtype


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_awq_folding_keeps_the_function_before_rounding(tmp_path, arch):
    """The float model rebuilt from the scaled weights, folded norms and biases computes the original logits."""
    ref = save_tiny(tmp_path, arch).float().eval()
    net = load(tmp_path, compute_dtype=torch.float32).eval()
    kinds = {g.prev.rsplit(".", 1)[-1] for g in awq_groups(net)}
    assert kinds == {"input_layernorm", "post_attention_layernorm", "v_proj", "up_proj"}
    assert any(g.repeat == 2 for g in awq_groups(net))  # 4 heads read 2 kv heads
    stats = input_statistics(net, _batches(4, 0))
    with SourceWeights(net) as source:
        scaled = fold_awq(net, stats, source, next(m.weight.spec for m in net.modules() if isinstance(m, Linear4bit)),
                          log=lambda *a: None)
        assert scaled.cols and scaled.rows
        rebuilt = copy.deepcopy(ref)
        with torch.no_grad():
            for name, mod in net.named_modules():
                if isinstance(mod, Linear4bit):
                    rebuilt.get_submodule(name).weight.copy_(scaled(name))
                    if mod.bias is not None:
                        rebuilt.get_submodule(name).bias.copy_(mod.bias)
                elif name.endswith("layernorm"):
                    rebuilt.get_submodule(name).weight.copy_(mod.weight)
    ids = _batches(1, 3)[0]
    with torch.no_grad():
        assert torch.allclose(rebuilt(**ids).logits, ref(**ids).logits, atol=1e-4, rtol=1e-4)


def test_statistics_leave_padding_out(tmp_path):
    save_tiny(tmp_path, "llama")
    net = load(tmp_path, compute_dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    padded = input_statistics(net, [{"input_ids": ids, "attention_mask": mask}])
    garbage = ids.clone()
    garbage[1, 6:] = 7  # what sits in the padding must not matter
    again = input_statistics(net, [{"input_ids": garbage, "attention_mask": mask}])
    assert all(torch.allclose(padded[k][0], again[k][0]) and torch.allclose(padded[k][1], again[k][1])
               for k in padded)


def test_unknown_method_and_unfoldable_model_are_refused(tmp_path):
    save_tiny(tmp_path / "llama", "llama")
    net = load(tmp_path / "llama", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="calibration method must be one of none, awq, clip, gptq, blockwise, e2e, "
                                         "both or stages joined by"):
        calibrate(net, _batches(1, 0), "smoothquant")
    with pytest.raises(ValueError, match="gptq and blockwise both choose the codes"):
        calibrate(net, _batches(1, 0), "awq+gptq+blockwise")
    save_tiny(tmp_path / "gpt2", "gpt2")
    gpt2 = load(tmp_path / "gpt2", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="awq: this model has no place to fold scales into"):
        calibrate(gpt2, _batches(1, 0), "awq")
    assert calibrate_gptq(gpt2, _batches(2, 0), log=lambda *a: None) > 0  # GPTQ needs no folding
