"""The Triton dequantize kernel — in Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET=1 where
there is no GPU), compiled on a GPU: byte-identical to the C kernel and the PyTorch reference for every
codebook (4-, 3- and 2-bit packing), fp32/bf16/fp16 output, any shape, partial last block, blocksizes 32…4096,
with and without double quantization. On a GPU also byte-identical to bitsandbytes' CUDA kernel."""

import dataclasses
import os

import pytest
import torch

import lowbit
from lowbit.quant import nf4, triton_dequant
from lowbit.quant.codebooks import CODEBOOKS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets the interpreter on CPU"

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def _triton(q, dtype):
    """The Triton kernel's output for ``q`` (on the GPU where there is one), back on the CPU."""
    q = q.to(DEVICE)
    nested = (q.absmax, q.nested_absmax, q.nested_code, q.nested_offset, q.nested_blocksize) if q.double_quant \
        else None
    return triton_dequant.dequantize(q.packed, None if nested else q.absmax, q.code, q.blocksize, q.shape, dtype,
                                     nested=nested).cpu()


@pytest.mark.parametrize("qt", list(CODEBOOKS))
@pytest.mark.parametrize("dq", [False, True])
def test_triton_equals_c_kernel_and_reference(qt, dq):
    g = torch.Generator().manual_seed(len(qt) * 2 + dq)
    shapes = [(7,), (1,), (33, 77), (5, 4097), (96, 160), (300, 257), (64, 64)]
    for i, shape in enumerate(shapes):
        bs = BLOCKSIZES[(i * 3 + dq) % len(BLOCKSIZES)]
        w = torch.randn(shape, generator=g) * 3
        w.view(-1)[0] = float(torch.finfo(torch.float16).max) / 2  # large values must round alike in every dtype
        q = lowbit.quantize(w, qt, bs, double_quant=dq)
        for dt in DTYPES:
            ref = nf4.dequantize_reference(q.packed, q.absmax_float(), q.code, bs, q.shape, dt)
            got = _triton(q, dt)
            assert got.dtype == dt and got.shape == q.shape
            assert torch.equal(got.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8)), (shape, bs, dt)
            # the C kernel behind the dispatch point (codes × scales: a zero-point type's shift comes after the
            # kernel, in QuantizedTensor.dequantize, tests/quant/test_zero_point.py)
            assert torch.equal(got, dataclasses.replace(q, zeros=None).dequantize(dt)), (shape, bs, dt)


def test_bfloat16_is_rounded_to_nearest_even_not_truncated():
    """The interpreter's own float32 → bf16 cast truncates; the kernel must round to nearest-even."""
    q = lowbit.quantize(torch.randn(4096, generator=torch.Generator().manual_seed(0)), "nf4", 64)
    vals = q.dequantize(torch.float32)
    rne = vals.to(torch.bfloat16)
    truncated = (vals.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert (rne != truncated).sum() > 100, "the data must tell the two roundings apart"
    assert torch.equal(_triton(q, torch.bfloat16), rne)


def test_reused_scratch_buffer_keeps_a_chain_of_layers_exact():
    """Two 4-bit layers of different shapes share the dequantize scratch buffer in forward and backward."""
    from lowbit.nn.linear import Linear4bit

    a, b = torch.nn.Linear(96, 160), torch.nn.Linear(160, 64)
    la, lb = Linear4bit.from_linear(a), Linear4bit.from_linear(b)
    x = torch.randn(5, 96, requires_grad=True)
    lb(la(x)).square().sum().backward()
    wa, wb = la.dequantize().double(), lb.dequantize().double()
    x64 = x.detach().double().requires_grad_(True)
    ((x64 @ wa.t() + a.bias.double()) @ wb.t() + b.bias.double()).square().sum().backward()
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by bench/gpu.py)")


@gpu
@pytest.mark.parametrize("dq", [False, True])
def test_triton_on_cuda_equals_bitsandbytes_cuda(bnbF, dq):
    for shape, bs in [((4096, 4096), 64), ((33, 77), 64), ((11008, 96), 128)]:
        w = torch.randn(shape, device="cuda")
        for dt in DTYPES:
            wd = w.to(dt)
            bp, st = bnbF.quantize_4bit(wd, blocksize=bs, quant_type="nf4", compress_statistics=dq)
            q = lowbit.quantize(wd, "nf4", bs, double_quant=dq)
            assert torch.equal(q.packed.cuda(), bp)
            q = lowbit.QuantizedTensor.from_state_dict({"w": bp, **{f"w.{k}": v for k, v in
                                                                    st.as_dict(packed=True).items()}}, "w")
            assert torch.equal(q.dequantize(dt), bnbF.dequantize_4bit(bp, st)), (shape, bs, dt)
