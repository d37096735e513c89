"""Blockwise 4-bit quantize/dequantize: byte equality with bitsandbytes, the float64 reference, every path behind
the dispatch point."""

import zlib

import pytest
import torch

import lowbit
from lowbit.quant import codebooks, nf4
from lowbit.quant.codebooks import codebook
from lowbit.quant.spec import QUANT_TYPES

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _shapes(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = [(1,), (7,), (31,), (33, 1), (3, 5), (64,), (65,), (127, 3), (1, 4097)]
    while len(out) < n:
        out.append((int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))))
    return out


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_byte_equal_with_bnb(bnbF, qt, dq):
    for i, shape in enumerate(_shapes(60, seed=zlib.crc32(f"{qt}-{dq}".encode()) % 1000)):
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


@pytest.mark.parametrize("qt", [q for q, t in QUANT_TYPES.items() if not t.zero_point])  # zero points:
def test_dequantize_matches_float64_reference(qt):                                        # test_zero_point.py
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
