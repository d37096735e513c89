"""Codebooks built from their definitions: bit-equal to bitsandbytes where it has them."""


import pytest
import torch

import lowbit
from lowbit.quant import codebooks
from lowbit.quant.codebooks import codebook, dynamic_map


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_codebook_bit_equal_to_bnb(bnbF, qt):
    assert torch.equal(_bits(codebook(qt)), _bits(bnbF.get_4bit_type(qt, device="cpu")))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_bit_equal_to_bnb(bnbF, signed):
    assert torch.equal(_bits(dynamic_map(signed)), _bits(bnbF.create_dynamic_map(signed=signed)))


def test_nf4_is_normal_quantiles():
    # Independent check in float64: 8 positive quantiles, 7 negative, exact 0, normalised by the largest.
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    v = v / v.max()
    assert torch.allclose(codebook("nf4").double(), v, atol=1e-6)


@pytest.mark.parametrize("qt,n", [("nf3", 8), ("nf2", 4), ("int4", 15)])
def test_other_codebooks_shape(qt, n):
    c = codebook(qt)
    assert c.numel() == n
    assert torch.all(c[1:] > c[:-1]), "codebook must be sorted and distinct"
    assert c[0] == -1 and c[-1] == 1 and (c == 0).any()


def test_error_ordering_on_gaussian_weights():
    # NF4 is the information-theoretically better 4-bit type for normal weights; fewer bits, more error.
    w = torch.randn(256, 1024)
    err = {qt: ((lowbit.quantize(w, qt).dequantize() - w).norm() / w.norm()).item() for qt in codebooks.CODEBOOKS}
    assert err["nf4"] < err["fp4"] and err["nf4"] < err["int4"]
    assert err["nf4"] < 0.11 and err["nf4"] < err["nf3"] < err["nf2"] < 0.7
