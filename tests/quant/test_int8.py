"""LLM.int8 storage (load_in_8bit): the bytes bitsandbytes' Int8Params gives, its dequantization, the 8-bit layer's
matmul and its state-dict layout."""

import pytest
import torch

from lowbit.nn.linear8bit import Linear8bit
from lowbit.quant.int8 import dequantize_int8, quantize_int8


@pytest.mark.parametrize("shape", [(64, 48), (7, 33), (300, 257), (1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_bytes_equal_bitsandbytes(shape, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    w = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)
    ref = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
    q, scb = quantize_int8(w)
    assert torch.equal(q, ref.data) and torch.equal(scb, ref.SCB)
    assert torch.equal(dequantize_int8(q, scb), F.int8_vectorwise_dequant(ref.data, ref.SCB))


def test_linear8bit_forward_backward_and_layout():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    layer = Linear8bit.from_weight(lin.weight.data, lin.bias.data, compute_dtype=torch.float32)
    x = torch.randn(3, 40, requires_grad=True)
    layer(x).square().sum().backward()
    w = layer.dequantize()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.t() + lin.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and layer.codes.grad is None
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].shape == (24,) and sd["weight_format"].item() == 0
    again = Linear8bit(torch.zeros(24, 40, dtype=torch.int8), torch.ones(24), torch.zeros(24))
    again.load_state_dict(sd)
    assert torch.equal(again.codes, layer.codes) and torch.equal(again.SCB, layer.SCB)
    assert layer.nbytes == 24 * 40 + 24 * 4
