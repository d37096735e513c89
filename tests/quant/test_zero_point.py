"""INT3 / INT2 with a zero point per block: against a float64 min-max reference written out here, exact zeros, the
stored layout and its bytes per weight, every dequantize path alike, a state dict round trip with one-line
refusals, and the 4-bit layer computing with the weight it stores."""

import dataclasses

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.nn.linear import Linear4bit
from lowbit.quant import native, zero_point
from lowbit.quant.codebooks import codebook
from lowbit.quant.packing import unpack_codes
from lowbit.quant.spec import QUANT_TYPES, QuantSpec, packed_bytes
from lowbit.quant.tensor import QuantizedTensor

ZP = [q for q, t in QUANT_TYPES.items() if t.zero_point]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_the_zero_point_types():
    assert ZP == ["int3", "int2"]
    assert torch.equal(codebook("int2"), torch.tensor([0, 1 / 3, 2 / 3, 1]))


def _reference(w: torch.Tensor, bits: int, blocksize: int) -> torch.Tensor:
    """Asymmetric min-max quantization as GPTQ writes it: step = (hi − lo) / L, z = round(−lo / step),
    q = clamp(round(w / step) + z, 0, L), ŵ = step · (q − z) — in float64, block by block."""
    levels, flat, out = 2**bits - 1, w.reshape(-1).double(), []
    for b in flat.split(blocksize):
        lo, hi = min(b.min().item(), 0.0), max(b.max().item(), 0.0)
        step = (hi - lo) / levels
        z = round(-lo / step)
        q = (torch.round(b / step) + z).clamp(0, levels)
        out.append(step * (q - z))
    return torch.cat(out).view(w.shape)


@pytest.mark.parametrize("qt", ZP)
@pytest.mark.parametrize("shape,bs", [((37, 213), 64), ((5, 77), 32), ((3, 1000), 128)])
def test_matches_the_float64_min_max_reference(qt, shape, bs):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bs)) * 2
    w += torch.linspace(-4, 4, shape[0])[:, None]  # rows off-centre both ways: the zero points vary
    q = lowbit.quantize(w, qt, bs, double_quant=False)
    ref = _reference(w, QUANT_TYPES[qt].bits, bs)
    got = q.dequantize(torch.float32).double()
    mismatch = ~torch.isclose(got, ref, rtol=1e-5, atol=1e-6)
    assert mismatch.sum() <= 2, f"{int(mismatch.sum())} of {w.numel()} weights differ from the reference"
    zeros = unpack_codes(q.zeros, QUANT_TYPES[qt].bits, q.absmax.numel())
    assert len(set(zeros.tolist())) > 2  # the data exercise several zero points


@pytest.mark.parametrize("qt", ZP)
def test_zero_is_exact_with_double_quantization(qt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) + torch.randn(64, 1, generator=g)  # rows shifted: lopsided blocks
    w[torch.rand(w.shape, generator=g) < 0.2] = 0.0
    w[:2] = 0.0  # all-zero blocks
    q = lowbit.quantize(w, qt, 64)
    for dt in DTYPES:
        d = q.dequantize(dt)
        assert d.dtype == dt and torch.all(d[w == 0] == 0)
    rel = float(((q.dequantize() - w) ** 2).sum() / (w**2).sum())
    assert rel < {"int3": 0.05, "int2": 0.25}[qt]


@pytest.mark.parametrize("qt", ZP)
@pytest.mark.parametrize("dq", [True, False])
def test_layout_bytes_and_state_dict_round_trip(qt, dq):
    w = torch.randn(48, 200)
    q = lowbit.quantize(w, qt, 64, double_quant=dq)
    bits, n, blocks = QUANT_TYPES[qt].bits, w.numel(), -(-w.numel() // 64)
    assert q.packed.numel() == packed_bytes(n, bits) and q.zeros.numel() == packed_bytes(blocks, bits)
    constants = blocks + 4 * q.nested_absmax.numel() + 4 if dq else 4 * blocks
    assert q.nbytes == packed_bytes(n, bits) + constants + packed_bytes(blocks, bits)
    sd = q.state_dict("w")
    assert torch.equal(sd["w.zeros"], q.zeros)
    back = QuantizedTensor.from_state_dict(sd, "w")
    assert torch.equal(back.dequantize(), q.dequantize()) and back.bits_per_param == q.bits_per_param
    with pytest.raises(LowbitError, match=r"^w\.zeros: quant_type '.*' needs a zero point per block") as e:
        QuantizedTensor.from_state_dict({k: v for k, v in sd.items() if k != "w.zeros"}, "w")
    assert "\n" not in str(e.value)
    nf = lowbit.quantize(w, qt.replace("int", "nf"), 64, double_quant=dq).state_dict("w")
    with pytest.raises(LowbitError, match=r"^w\.zeros: quant_type 'nf.' has no zero points$"):
        QuantizedTensor.from_state_dict({**nf, "w.zeros": q.zeros}, "w")


@pytest.mark.parametrize("qt", ZP)
@pytest.mark.parametrize("dq", [True, False])
def test_c_kernel_and_pytorch_paths_agree_and_round_once(qt, dq, monkeypatch):
    w = torch.randn(33, 4097, generator=torch.Generator().manual_seed(2)) * 3  # a ragged last block
    q = lowbit.quantize(w, qt, 128, double_quant=dq)
    f32 = q.dequantize(torch.float32)
    fast = {dt: q.dequantize(dt) for dt in DTYPES}
    buf = {dt: torch.empty(w.shape, dtype=dt) for dt in DTYPES}
    for dt in DTYPES:
        assert q.dequantize(dt, out=buf[dt]).data_ptr() == buf[dt].data_ptr()
        assert torch.equal(buf[dt], fast[dt]) and torch.equal(fast[dt], f32.to(dt))  # one rounding, from float32
    monkeypatch.setattr(zero_point, "_CHUNK", 1000)  # many chunks of whole blocks (7 of 128), the last one ragged
    for dt in DTYPES:
        assert torch.equal(q.dequantize(dt), fast[dt])
    assert native.kernel() is not None, "the C kernel builds on this machine"
    monkeypatch.setattr(native, "kernel", lambda: None)
    for dt in DTYPES:
        assert torch.equal(q.dequantize(dt), fast[dt])


def test_int2_beats_nf2_on_normal_weights():
    """LoftQ's observation: at 2 bits a uniform grid with a zero point errs less than NormalFloat on Gaussian
    weights (three of NF2's four codes sit near zero)."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    err = {qt: float(((lowbit.quantize(w, qt, 64).dequantize() - w) ** 2).mean()) for qt in ("int2", "nf2")}
    assert err["int2"] < 0.8 * err["nf2"], err


@pytest.mark.parametrize("qt", ZP)
def test_layer_computes_with_its_stored_weight_and_round_trips(qt):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 96), QuantSpec(qt, 64))
    x = torch.randn(4, 128, requires_grad=True)
    w = layer.weight.dequantize(torch.float32)
    y = layer(x)
    torch.testing.assert_close(y, x @ w.t() + layer.bias, rtol=0, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ w, rtol=0, atol=1e-5)
    assert layer.zeros is not None and not layer.zeros.requires_grad
    sd = layer.state_dict()
    assert "weight.zeros" in sd
    fresh = Linear4bit(lowbit.quantize(torch.zeros(96, 128), qt, 64), torch.zeros(96))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)
    assert torch.equal(dataclasses.replace(fresh.weight, dtype=torch.float32).dequantize(), w)
