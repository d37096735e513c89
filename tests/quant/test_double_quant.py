"""Double quantization: the 8-bit codec byte-equal to bitsandbytes, 4.127 bits per parameter."""


import pytest
import torch

import lowbit
from lowbit.quant.codebooks import dynamic_map
from lowbit.quant.double_quant import dequantize8, quantize8


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def test_quantize8_byte_equal_with_bnb(bnbF):
    for n in [1, 255, 256, 257, 1000, 4096, 5001]:
        x = torch.rand(n) * 3 - 1
        q, am = quantize8(x, dynamic_map(True), 256)
        bq, st = bnbF.quantize_blockwise(x, blocksize=256)
        assert torch.equal(q, bq) and torch.equal(_bits(am), _bits(st.absmax)), n
        assert torch.equal(dequantize8(q, am, dynamic_map(True), 256), bnbF.dequantize_blockwise(bq, st))


def test_double_quant_bits_per_param():
    w = torch.randn(4096, 4096)
    q = lowbit.quantize(w, "nf4", 64, double_quant=True)
    assert q.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert round(q.bits_per_param, 3) == 4.127
    q2 = lowbit.quantize(w, "nf4", 64, double_quant=False)
    assert q2.bits_per_param == pytest.approx(4.5, abs=1e-6)
    # double quantization changes the constants only slightly
    rel = (q.absmax_float() - q2.absmax).abs().max() / q2.absmax.max()
    assert rel < 0.01
