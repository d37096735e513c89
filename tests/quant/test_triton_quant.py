"""The Triton quantize kernels (quantize-on-load on a GPU), run in Triton's interpreter on CPU tensors: the same
bytes as the PyTorch path, which is bitsandbytes' (tests/quant/test_nf4.py, test_int8.py)."""

import pytest
import torch

from lowbit.quant.codebooks import quant_order
from lowbit.quant.int8 import quantize_int8_torch
from lowbit.quant.nf4 import quantize_torch
from lowbit.quant.spec import QUANT_TYPES
from lowbit.quant.triton_quant import quantize_codes, quantize_rows8

SHAPES = [(64, 64), (33, 77), (3, 1000), (1, 40)]


@pytest.mark.parametrize("qt", list(QUANT_TYPES))
@pytest.mark.parametrize("bs", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codes_equal_the_torch_path(qt, bs, dtype):
    g = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        w.view(-1)[5] = 0.0
        if shape[0] > 2:
            w[2] = 0.0  # a whole row of zeros (whole zero blocks, or part of one)
        packed, absmax = quantize_codes(w, qt, bs, *quant_order(qt))
        ref_p, ref_a = quantize_torch(w, qt, bs)
        assert torch.equal(packed, ref_p) and torch.equal(absmax, ref_a), (qt, bs, dtype, shape)


@pytest.mark.parametrize("shape", [(24, 40), (5, 5000), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows_equal_the_torch_path(shape, dtype):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1).to(dtype)
    w.view(-1)[0] = w.view(-1)[1] * 0.5  # values landing on .5 after scaling are likely somewhere
    q, scb = quantize_rows8(w)
    rq, rs = quantize_int8_torch(w)
    assert torch.equal(q, rq) and torch.equal(scb, rs)


def test_int8_rounds_half_to_even():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])
    q, _ = quantize_rows8(w)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]
    assert torch.equal(q, quantize_int8_torch(w)[0])
