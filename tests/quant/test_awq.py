"""Activation-aware scale search: α = 0 is round-to-nearest, and the chosen scales lower a layer's output error on
held-out inputs that share the calibration inputs' outlier channels."""

import torch

import lowbit
from lowbit.quant.awq import output_error, scales_for, search_scales
from lowbit.quant.spec import QuantSpec


def _inputs(n, seed, loud):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 256, generator=g) * loud


def test_scales_are_normalised_and_alpha_zero_is_one():
    m = torch.rand(256) * 10 + 0.01
    assert torch.equal(scales_for(m, 0.0), torch.ones(256))
    s = scales_for(m, 0.5)
    assert abs(float(s.max() * s.min()) - 1) < 1e-5
    assert torch.equal(torch.argsort(s), torch.argsort(m))


def test_search_lowers_held_out_output_error():
    g = torch.Generator().manual_seed(0)
    loud = torch.ones(256)
    loud[torch.randperm(256, generator=g)[:8]] = 30.0  # a few channels with large activations, as in real LLMs
    w = torch.randn(128, 256, generator=g) * 0.05
    x = _inputs(2048, 1, loud)
    held = _inputs(2048, 2, loud)
    spec = QuantSpec()
    s, alpha, err, rtn = search_scales([w], x.abs().mean(0), x.T @ x / len(x), spec)
    assert 0 < alpha and err < 0.8 * rtn
    h2 = held.T @ held / len(held)
    rtn_held = output_error(w, lowbit.quantize(w, spec).dequantize(), h2)
    awq_held = output_error(w, lowbit.quantize(w * s, spec).dequantize() / s, h2)
    assert awq_held < 0.8 * rtn_held, (awq_held, rtn_held)
