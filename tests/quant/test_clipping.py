"""Clipped block scales: with the absmax as scales the bytes are round-to-nearest's (bitsandbytes'); the searched
scales never raise the activation-weighted error and lower it most at 2 bits; every weight sits on the nearest code
of its block's stored (double-quantized) scale; an NF4 result is a checkpoint bitsandbytes dequantizes as we do;
GPTQ rounds on the clipped grid."""

import pytest
import torch

import lowbit
from lowbit.quant.clipping import block_absmax, clip_scales, quantize_with_scales, stored_scales
from lowbit.quant.codebooks import codebook
from lowbit.quant.gptq import gptq_quantize, second_moment
from lowbit.quant.spec import QUANT_TYPES, QuantSpec


def _weight(shape=(48, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (40,), generator=g)] *= 12  # a few outliers, as trained weights have
    return w


def _werr(q, w, d):
    return float((((q.dequantize(torch.float32) - w) ** 2) * d).sum())


@pytest.mark.parametrize("qt", [q for q, t in QUANT_TYPES.items() if not t.zero_point])  # zero points: their own
@pytest.mark.parametrize("shape,bs", [((48, 256), 64), ((7, 50), 32), ((3, 1000), 128)])  # test_zero_point.py
def test_absmax_scales_give_round_to_nearest_bytes(qt, shape, bs):
    w = _weight(shape)
    spec = QuantSpec(qt, bs, False)
    ours, rtn = quantize_with_scales(w, block_absmax(w, bs), spec), lowbit.quantize(w, spec)
    assert torch.equal(ours.packed, rtn.packed) and torch.equal(ours.absmax, rtn.absmax)


@pytest.mark.parametrize("qt", list(QUANT_TYPES))
def test_clipping_never_raises_the_weighted_error(qt):
    w = _weight()
    d = torch.rand(256, generator=torch.Generator().manual_seed(1)) * 3
    spec = QuantSpec(qt, 64, False)
    clipped = quantize_with_scales(w, clip_scales(w, d, spec), spec)
    rtn = lowbit.quantize(w, spec)
    assert _werr(clipped, w, d) <= _werr(rtn, w, d) * (1 + 1e-6)
    if QUANT_TYPES[qt].bits == 2:
        assert _werr(clipped, w, d) < 0.7 * _werr(rtn, w, d)


@pytest.mark.parametrize("qt", ["nf4", "nf3", "nf2"])
def test_codes_are_nearest_to_the_stored_scale(qt):
    w = _weight()
    spec = QuantSpec(qt, 64, True)
    scales = clip_scales(w, torch.ones(256), spec)
    q = quantize_with_scales(w, scales, spec)
    s, _ = stored_scales(scales, True)
    assert torch.equal(q.absmax_float(), s) and q.bits_per_param == lowbit.quantize(w, spec).bits_per_param
    levels = codebook(qt)
    v = (w.reshape(-1, 64) / s[:, None]).clamp(-1, 1)
    got = q.dequantize(torch.float32).reshape(-1, 64) / s[:, None]
    best = (v[..., None] - levels).abs().min(-1).values
    assert torch.allclose((got - v).abs(), best, atol=1e-6)


def test_clipped_nf4_is_a_plain_bitsandbytes_checkpoint(bnbF):
    from bitsandbytes.functional import QuantState

    w = _weight()
    spec = QuantSpec("nf4", 64, True)
    q = quantize_with_scales(w, clip_scales(w, torch.ones(256), spec), spec)
    sd = q.state_dict("weight")
    state = QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(sd["weight"], state), q.dequantize(torch.float32))


def test_gptq_rounds_on_the_clipped_grid():
    w = _weight((32, 128))
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(3))
    h = second_moment(x)
    spec = QuantSpec("nf3", 64, True)
    scales = clip_scales(w, torch.diagonal(h).float(), spec)
    g = gptq_quantize(w, h, "nf3", 64, True, scales=scales)
    clipped = quantize_with_scales(w, scales, spec)
    assert torch.equal(g.absmax, clipped.absmax) and torch.equal(g.nested_absmax, clipped.nested_absmax)
    out = lambda q: float(((x @ (q.dequantize(torch.float32) - w).T) ** 2).sum())
    assert out(g) < out(clipped)
