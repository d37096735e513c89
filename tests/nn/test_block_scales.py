"""Trainable block scales over frozen codes: zero multipliers give the stored layer exactly; the input and scale
gradients are those of the dense product deq(Q)·exp(t) autograd differentiates; folding keeps the codes and
stores the trained scales (exactly without double quantization, within its rounding with it)."""

import pytest
import torch

from lowbit.nn.block_scales import fold_block_scales, train_block_scales
from lowbit.nn.linear import Linear4bit
from lowbit.quant.spec import QuantSpec
from lowbit.quant.tensor import quantize


def _layer(spec, out=25, inp=40, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out, generator=g) if bias else None
    return Linear4bit(quantize(torch.randn(out, inp, generator=g), spec), b, compute_dtype=torch.float32)


def _dense(layer, t):
    w = layer.weight.dequantize(torch.float32).reshape(-1)  # the stored weight, before any multiplier
    bs = layer.weight.blocksize
    m = t.exp().repeat_interleave(bs)[: w.numel()]
    return (w * m).view(layer.out_features, layer.in_features)


def test_zero_multipliers_are_the_stored_layer():
    layer = _layer(QuantSpec("nf2", 64))
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        plain = layer(x)
    train_block_scales(layer)
    assert layer.scale_log.requires_grad and layer.scale_log.shape == (16,)  # 1,000 weights: a partial last block
    assert torch.equal(layer(x), plain)


@pytest.mark.parametrize("spec", [QuantSpec("nf3", 64), QuantSpec("nf4", 32, double_quant=False)])
def test_gradients_match_the_dense_product(spec):
    layer = _layer(spec)
    (t,) = train_block_scales(layer)
    with torch.no_grad():
        t.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 7, 40, requires_grad=True)
    gy = torch.randn(2, 7, 25)
    (layer(x) * gy).sum().backward()
    t_ref = t.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, _dense(layer, t_ref), layer.bias)
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-4, atol=1e-5)
    assert t.grad.abs().sum() > 0
    torch.testing.assert_close(layer.dequantize(), _dense(layer, t.detach()))  # what merge and export read


def test_fold_keeps_the_codes_and_stores_the_scales():
    for spec, tol in ((QuantSpec("nf4", 64, double_quant=False), 1e-6), (QuantSpec("nf3", 64), 2e-2)):
        layer = _layer(spec, bias=False)
        codes = layer.codes.clone()
        (t,) = train_block_scales(layer)
        with torch.no_grad():
            t.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(2))
            want = _dense(layer, t)
        assert fold_block_scales(layer) == 1 and layer.scale_log is None
        assert torch.equal(layer.codes, codes)
        assert layer.weight.double_quant == spec.double_quant
        torch.testing.assert_close(layer.dequantize(), want, rtol=tol, atol=tol)
        assert not any(k.endswith("scale_log") for k in layer.state_dict())


def test_untrained_multipliers_leave_the_stored_scales_alone():
    layer = _layer(QuantSpec("nf2", 64))  # re-double-quantizing stored scales would move them
    absmax, nested = layer.absmax.clone(), layer.nested_absmax.clone()
    train_block_scales(layer)
    assert fold_block_scales(layer) == 0 and layer.scale_log is None
    assert torch.equal(layer.absmax, absmax) and torch.equal(layer.nested_absmax, nested)


def test_scales_apply_after_an_inference_mode_forward():
    """The dequantize scratch a forward under torch.inference_mode made is not written in place outside it."""
    layer = _layer(QuantSpec("nf3", 64), out=512, inp=2048)  # larger than any weight before: a new scratch
    x = torch.randn(2, 3, 2048)
    with torch.inference_mode():
        plain = layer(x)
    train_block_scales(layer)
    assert torch.equal(layer(x), plain)
