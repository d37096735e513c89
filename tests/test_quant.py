"""Core quantization: codebooks, blockwise NF4/FP4, double quantization — byte equality with bitsandbytes."""


import pytest
import torch

import lowbit
from lowbit.quant import codebooks, nf4
from lowbit.quant.codebooks import codebook, dynamic_map
from lowbit.quant.double_quant import dequantize8, quantize8

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


# ---- codebooks ---------------------------------------------------------------------------------

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


# ---- blockwise 4-bit -----------------------------------------------------------------------------

def _shapes(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = [(1,), (7,), (31,), (33, 1), (3, 5), (64,), (65,), (127, 3), (1, 4097)]
    while len(out) < n:
        out.append((int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))))
    return out


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_byte_equal_with_bnb(bnbF, qt, dq):
    for i, shape in enumerate(_shapes(60, seed=hash((qt, dq)) % 1000)):
        bs = BLOCKSIZES[i % len(BLOCKSIZES)]
        dt = DTYPES[i % len(DTYPES)]
        w = (torch.randn(shape) * (0.01 + 3 * torch.rand(1))).to(dt)
        if i % 5 == 0:
            w.view(-1)[: min(w.numel(), bs)] = 0  # an all-zero block
        q = lowbit.quantize(w, qt, blocksize=bs, double_quant=dq)
        bp, st = bnbF.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=dq)
        ctx = f"shape={shape} bs={bs} dtype={dt}"
        assert torch.equal(q.packed, bp), ctx
        ref_sd = st.as_dict(packed=True)
        sd = q.state_dict("weight")
        assert set(sd) == {"weight"} | {f"weight.{k}" for k in ref_sd}, ctx
        for k, v in ref_sd.items():
            assert sd[f"weight.{k}"].dtype == v.dtype, (k, ctx)
            assert torch.equal(_bits(sd[f"weight.{k}"]), _bits(v)), (k, ctx)


@pytest.mark.parametrize("dq", [False, True])
def test_dequantize_bnb_state_gives_bnb_floats(bnbF, dq):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    bnb_reference = _dequantize_4bit_compute.__wrapped__  # bnb's own pure-torch path, without torch.compile

    for i, shape in enumerate(_shapes(40, seed=7)):
        bs = BLOCKSIZES[i % len(BLOCKSIZES)]
        dt = DTYPES[i % len(DTYPES)]
        qt = ["nf4", "fp4"][i % 2]
        w = torch.randn(shape).to(dt)
        bp, st = bnbF.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=dq)
        sd = {"weight": bp, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
        q = lowbit.QuantizedTensor.from_state_dict(sd, "weight")
        mine = q.dequantize(dt)
        absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset if dq else st.absmax
        ref = bnb_reference(bp.view(-1), absmax, st.code, bs, st.shape, dt)
        assert torch.equal(mine, ref), (shape, bs, dt, qt)
        if shape[-1] % bs == 0 or shape[-1] % 2:
            # bnb's CPU C kernel is only right when rows hold whole blocks (or it falls back for odd rows)
            assert torch.equal(mine, bnbF.dequantize_4bit(bp, st)), (shape, bs, dt, qt)


@pytest.mark.parametrize("qt", list(codebooks.CODEBOOKS))
def test_dequantize_matches_float64_reference(qt):
    w = torch.randn(37, 213) * 2
    q = lowbit.quantize(w, qt, blocksize=64, double_quant=False)
    code64 = codebook(qt).double()
    # float64 reference: nearest code of w/absmax, times absmax
    flat = w.reshape(-1).double()
    n = flat.numel()
    blocks = torch.arange(n) // 64
    am = torch.zeros(blocks.max() + 1, dtype=torch.float64).scatter_reduce(0, blocks, flat.abs(), "amax")
    x = flat / am[blocks]
    dist = (x[:, None] - code64[None, :]).abs()
    ref = (code64[dist.argmin(1)] * am[blocks]).view(w.shape)
    got = q.dequantize(torch.float32).double()
    # identical except possibly at exact ties between two codes
    mismatch = ~torch.isclose(got, ref, rtol=1e-6, atol=1e-7)
    assert mismatch.sum() <= 2, f"{int(mismatch.sum())} elements differ from the float64 reference"
    ref_path = nf4.dequantize_reference(q.packed, q.absmax, q.code, q.blocksize, q.shape)
    assert torch.equal(q.dequantize(torch.float32), ref_path)


@pytest.mark.parametrize("dt", DTYPES)
def test_fast_dequantize_equals_reference_all_dtypes(dt):
    for shape, bs in [((5, 7), 32), ((64, 128), 64), ((3, 4096), 4096), ((1001,), 128)]:
        q = lowbit.quantize(torch.randn(shape), "nf4", blocksize=bs)
        ref = nf4.dequantize_reference(q.packed, q.absmax_float(), q.code, bs, q.shape, dt)
        assert torch.equal(q.dequantize(dt), ref)


def test_quantize_in_chunks_equals_single_pass(monkeypatch):
    w = torch.randn(50, 333)
    a = lowbit.quantize(w, "nf4", blocksize=64)
    monkeypatch.setattr(nf4, "_CHUNK", 128)  # many chunks, the last one partial
    b = lowbit.quantize(w, "nf4", blocksize=64)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)


# ---- double quantization ----------------------------------------------------------------------

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


# ---- bad input ---------------------------------------------------------------------------------

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


# ---- kernels behind the dispatch point ----------------------------------------------------------

def test_native_kernel_builds_where_a_compiler_exists():
    import shutil

    from lowbit.quant import native

    if shutil.which("cc") or shutil.which("gcc"):
        assert native.kernel() is not None, "the C dequantize kernel failed to build"


@pytest.mark.parametrize("qt", list(codebooks.CODEBOOKS))
@pytest.mark.parametrize("dt", DTYPES)
def test_every_dequantize_path_agrees_with_reference(qt, dt):
    for shape, bs in [((7,), 32), ((33, 77), 64), ((5, 4097), 4096), ((1,), 32), ((96, 160), 128)]:
        w = torch.randn(shape) * 3
        w.view(-1)[0] = float(torch.finfo(torch.float16).max) / 2  # large values must round the same way too
        q = lowbit.quantize(w, qt, bs)
        am = q.absmax_float()
        ref = nf4.dequantize_reference(q.packed, am, q.code, bs, q.shape, dt)
        assert torch.equal(nf4.dequantize(q.packed, am, q.code, bs, q.shape, dt), ref), (shape, bs)
        assert torch.equal(nf4.dequantize_torch(q.packed, am, q.code, bs, q.shape, dt), ref), (shape, bs)
