"""The frozen 4-bit linear layer: forward, gradients against float64, memory behaviour, state dict."""


import pytest
import torch
from torch import nn

from lowbit.nn.linear import Linear4bit
from lowbit.quant.spec import QuantSpec


def _layer(out_f=48, in_f=96, bias=True, compute_dtype=None, **spec):
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin, Linear4bit.from_linear(lin, QuantSpec(**spec), compute_dtype)


def test_forward_equals_dequantized_matmul():
    lin, q = _layer()
    x = torch.randn(3, 5, 96)
    w = q.weight.dequantize(torch.float32)
    assert torch.allclose(q(x), x @ w.t() + lin.bias, atol=1e-5)
    # and it stays close to the full-precision layer (NF4 error on a ±1/sqrt(in) weight)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.15


def test_gradients_match_float64_reference():
    lin, q = _layer()
    q.bias.requires_grad_(True)
    x = torch.randn(4, 7, 96, requires_grad=True)
    gy = torch.randn(4, 7, 48)
    q(x).backward(gy)
    w64 = q.weight.dequantize(torch.float32).double()
    x64 = x.detach().double().requires_grad_(True)
    b64 = q.bias.detach().double().requires_grad_(True)
    (x64 @ w64.t() + b64).backward(gy.double())
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)
    assert torch.allclose(q.bias.grad.double(), b64.grad, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_bias_frozen_by_default():
    _, q = _layer()
    assert [n for n, p in q.named_parameters() if p.requires_grad] == []
    x = torch.randn(2, 96, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and q.bias.grad is None


def test_dequantized_weight_not_kept_between_forward_and_backward():
    _, q = _layer(out_f=256, in_f=512, bias=False)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(2, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert sum(saved) < 256 * 512 * 2 / 4, f"autograd saved {sum(saved)} bytes"
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compute_dtype_and_autocast(dtype):
    lin, q = _layer(compute_dtype=dtype)
    x = torch.randn(2, 96)
    assert q(x).dtype == dtype
    _, q2 = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q2(x)
    assert y.dtype == torch.bfloat16
    ref = x.bfloat16() @ q2.weight.dequantize(torch.bfloat16).t() + q2.bias.bfloat16()
    assert torch.allclose(y.float(), ref.float(), atol=2e-2)


def test_state_dict_layout_and_round_trip():
    lin, q = _layer(quant_type="nf4", double_quant=True)
    sd = q.state_dict()
    assert {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4"} == set(sd)
    _, q2 = _layer(quant_type="fp4", double_quant=False)
    q2.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert torch.equal(q2(x), q(x))
    assert q2.weight.quant_type == "nf4"


def test_layer_loads_bnb_linear4bit_state():
    import bitsandbytes as bnb

    lin = nn.Linear(128, 64)
    ref = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # bnb quantizes on .to()
    assert ref.weight.dtype == torch.uint8
    sd = ref.state_dict()
    _, q = _layer(64, 128)
    q.load_state_dict(sd)
    ours = Linear4bit.from_linear(lin)
    assert torch.equal(q.weight.packed, ours.weight.packed)
    x = torch.randn(2, 128)
    assert torch.allclose(q(x), ours(x))
