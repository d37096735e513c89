"""FakeQuantLinear: its forward weight is the stored weight freeze() gives (same codes, same scales); gradients
reach the latent weight straight through the rounding (zero where the clamp cuts) and the scales as LSQ's; the
LoRA start adds (α/r)·B·A."""

import pytest
import torch

from lowbit.nn.fake_quant import FakeQuantLinear
from lowbit.quant.clipping import block_absmax
from lowbit.quant.spec import QuantSpec


def _layer(qt="nf3", dq=False, lora=None):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=g) * 0.05
    return FakeQuantLinear(w, block_absmax(w, 64) * 0.8, QuantSpec(qt, 64, dq), torch.randn(24, generator=g), lora), w


@pytest.mark.parametrize("qt", ["nf4", "nf3", "nf2", "int4", "int3", "int2"])
def test_forward_weight_is_the_frozen_weight(qt):
    m, _ = _layer(qt)
    with torch.no_grad():
        assert torch.allclose(m.rounded_weight(), m.freeze().dequantize(torch.float32), atol=1e-7)


def test_double_quantized_freeze_rounds_against_the_stored_scales():
    m, _ = _layer("nf2", dq=True)
    q = m.freeze(torch.bfloat16)
    assert q.dtype == torch.bfloat16 and q.double_quant
    assert torch.allclose(q.absmax_float(), m.scales(), rtol=0.02)


def test_straight_through_gradients():
    m, w = _layer("nf2")
    x = torch.randn(5, 128)
    m(x).pow(2).sum().backward()
    outside = (w.reshape(-1, 64).abs() > (block_absmax(w, 64) * 0.8)[:, None]).reshape(w.shape)
    assert outside.any() and (~outside).any()
    assert torch.all(m.weight.grad[outside] == 0) and torch.all(m.weight.grad[~outside] != 0)
    wh = m.rounded_weight().detach().requires_grad_()
    torch.nn.functional.linear(x, wh, m.bias).pow(2).sum().backward()
    assert torch.allclose(m.weight.grad[~outside], wh.grad[~outside], rtol=1e-5, atol=1e-6)
    assert m.log_scale.grad.abs().sum() > 0


def test_lora_start_adds_its_product():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 128, generator=g), torch.randn(24, 4, generator=g)
    m, _ = _layer(lora=(a, b, 0.5))
    plain, _ = _layer()
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.allclose(m(x), plain(x) + 0.5 * x @ a.T @ b.T, atol=1e-5)
