"""QuantizedTensor: state-dict round trips and bad input."""


import pytest
import torch

import lowbit


def test_state_dict_round_trip():
    for dq in [False, True]:
        q = lowbit.quantize(torch.randn(17, 96).bfloat16(), "fp4", 32, double_quant=dq)
        q2 = lowbit.QuantizedTensor.from_state_dict(q.state_dict("w"), "w")
        assert q2.shape == q.shape and q2.dtype == torch.bfloat16 and q2.quant_type == "fp4"
        assert torch.equal(q2.dequantize(), q.dequantize())


def test_all_zero_weight_is_finite():
    for dq in [False, True]:
        q = lowbit.quantize(torch.zeros(8, 64), "nf4", 64, double_quant=dq)
        assert torch.equal(q.dequantize(), torch.zeros(8, 64))


@pytest.mark.parametrize("kwargs,w,msg", [
    ({}, torch.ones(4, 4, dtype=torch.int32), "dtype"),
    ({}, torch.empty(0, 4), "empty"),
    ({}, torch.tensor([1.0, float("nan")]), "non-finite"),
    ({}, torch.tensor([1.0, float("inf")]), "non-finite"),
    ({"blocksize": 48}, torch.ones(64), "blocksize"),
    ({"blocksize": 8192}, torch.ones(64), "blocksize"),
    ({"quant_type": "nf5"}, torch.ones(64), "quant_type"),
])
def test_bad_input(kwargs, w, msg):
    with pytest.raises(ValueError, match=msg):
        lowbit.quantize(w, **kwargs)


def test_from_state_dict_rejects_truncated():
    sd = lowbit.quantize(torch.randn(8, 64)).state_dict("weight")
    sd["weight"] = sd["weight"][:10]
    with pytest.raises(ValueError, match="packed bytes"):
        lowbit.QuantizedTensor.from_state_dict(sd, "weight")
    with pytest.raises(ValueError, match="quant_state"):
        lowbit.QuantizedTensor.from_state_dict({"weight": sd["weight"]}, "weight")
