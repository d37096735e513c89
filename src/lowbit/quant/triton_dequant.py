"""The Triton dequantize kernels: the GPU path behind the one dispatch point (``nf4.dequantize``), byte-identical
to the PyTorch reference and the C kernel.

4-bit codes (NF4, FP4, INT4): one program takes ``BYTES`` packed bytes → 2·``BYTES`` outputs::

    hi, lo   = byte >> 4, byte & 15                      (the first element is the high nibble)
    absmax   = absmax[e // blocksize]                    without double quantization, else
    absmax   = code8[qabsmax[b]] · nested[b // 256]      then  + offset   (two roundings, as bitsandbytes: the
                                                         kernel is launched with FP fusion off, so no FMA)
    out[e]   = code[nibble] · absmax                     (float32), then cast to the output dtype

3-bit and 2-bit codes (NF3, NF2; layouts in ``packing.py``): one program takes ``2·BYTES`` outputs, each reading
the byte(s) its code lies in (3 bits: the group's three bytes → a 24-bit word, ``(word >> 21 - 3·(e mod 8)) & 7``;
2 bits: ``(byte >> 6 - 2·(e mod 4)) & 3``), then the same scale and store.

The bfloat16 cast rounds to nearest-even with integer operations on the float32 bits, because the Triton
interpreter (``TRITON_INTERPRET=1``, which the tests use on CPU tensors) truncates; on a GPU the same code
gives the same bytes. Outputs are written contiguously (the two nibbles interleaved), so a GPU stores whole
cache lines. Inputs are finite by construction (``quantize`` refuses NaN/Inf).

With ``TRITON_INTERPRET=1`` set before Triton is first imported (tests/conftest.py does so where there is no
GPU), the kernel runs in Triton's interpreter on CPU tensors: that is how the tests prove the GPU kernel's bytes
on a machine without a GPU. The dispatch point sends only CUDA tensors here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .nf4 import code_bits

__all__ = ["dequantize"]

BYTES = 1024  # packed bytes per program: 2048 outputs


@triton.jit
def _dequant4(packed, absmax, qabsmax, nested, ncode, offset, code, out, n_bytes, n,
              BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr, KIND: tl.constexpr,
              BYTES: tl.constexpr):
    i = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    inside = i < n_bytes
    b = tl.load(packed + i, mask=inside, other=0).to(tl.int32)
    hi = tl.load(code + (b >> 4), mask=inside, other=0.0)
    lo = tl.load(code + (b & 15), mask=inside, other=0.0)
    blk = (2 * i) // BLOCKSIZE  # both nibbles of a byte share a block: blocksizes are even
    a = _scale(blk, inside, absmax, qabsmax, nested, ncode, offset, NESTED, DOUBLE)
    vals = tl.interleave(hi * a, lo * a)  # element 2i, then 2i+1
    e = tl.program_id(0) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    _store(out, e, vals, e < n, KIND)


@triton.jit
def _dequant_k(packed, absmax, qabsmax, nested, ncode, offset, code, out, n,
               BITS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DOUBLE: tl.constexpr,
               KIND: tl.constexpr, ELEMS: tl.constexpr):
    e = tl.program_id(0) * ELEMS + tl.arange(0, ELEMS)
    keep = e < n
    if BITS == 3:
        g = (e >> 3) * 3
        word = (tl.load(packed + g, mask=keep, other=0).to(tl.int32) << 16) \
            | (tl.load(packed + g + 1, mask=keep, other=0).to(tl.int32) << 8) \
            | tl.load(packed + g + 2, mask=keep, other=0).to(tl.int32)
        q = (word >> (21 - 3 * (e & 7))) & 7
    else:
        q = (tl.load(packed + (e >> 2), mask=keep, other=0).to(tl.int32) >> (6 - 2 * (e & 3))) & 3
    a = _scale(e // BLOCKSIZE, keep, absmax, qabsmax, nested, ncode, offset, NESTED, DOUBLE)
    _store(out, e, tl.load(code + q, mask=keep, other=0.0) * a, keep, KIND)


@triton.jit
def _scale(blk, keep, absmax, qabsmax, nested, ncode, offset, NESTED: tl.constexpr, DOUBLE: tl.constexpr):
    """Block ``blk``'s absmax: stored, or double-quantized (two float32 roundings, no FMA)."""
    if DOUBLE:
        q = tl.load(qabsmax + blk, mask=keep, other=0).to(tl.int32)
        a = tl.load(ncode + q, mask=keep, other=0.0) * tl.load(nested + blk // NESTED, mask=keep, other=0.0)
        a = a + offset
    else:
        a = tl.load(absmax + blk, mask=keep, other=0.0)
    return a


@triton.jit
def _store(out, e, vals, keep, KIND: tl.constexpr):
    if KIND == 0:
        tl.store(out + e, vals, mask=keep)
    elif KIND == 1:  # bfloat16, round to nearest-even on the bits (out is viewed as int16)
        bits = vals.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(out + e, (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=keep)
    else:
        tl.store(out + e, vals.to(tl.float16), mask=keep)


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_tables: dict = {}


def _on(t: torch.Tensor, device: torch.device, key) -> torch.Tensor:
    """A small table (codebook, nested map) on ``device``, cached: never copied per call."""
    if t.device == device:
        return t.float().contiguous()
    k = (key, device, t.detach().float().cpu().numpy().tobytes())
    if k not in _tables:
        _tables[k] = t.detach().float().contiguous().to(device)
    return _tables[k]


def dequantize(packed, absmax, code, blocksize, shape, dtype=torch.float32, out=None, nested=None) -> torch.Tensor:
    """As ``nf4.dequantize`` (same arguments, same bytes), with the Triton kernel."""
    n = math.prod(shape)
    device = packed.device
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    c = _on(code, device, "code")
    if c.numel() < 16:
        c = torch.cat([c, c.new_zeros(16 - c.numel())])
    target = out.view(torch.int16) if dtype == torch.bfloat16 else out
    dummy = c  # an unused pointer argument
    if nested is None:
        args = (absmax.float().contiguous(), dummy, dummy, dummy, 0.0)
        nbs, double = 256, False
    else:
        qa, na, nc, offset, nbs = nested
        args = (dummy, qa.contiguous(), na.float().contiguous(), _on(nc, device, "nested"), float(offset))
        double = True
    p = packed.contiguous().view(-1)
    extra = {} if device.type == "cpu" else {"enable_fp_fusion": False}  # no a·b + c fused into an FMA on a GPU
    bits = code_bits(code)
    if bits == 4:
        _dequant4[(triton.cdiv(p.numel(), BYTES),)](p, *args, c, target, p.numel(), n, BLOCKSIZE=blocksize,
                                                     NESTED=nbs, DOUBLE=double, KIND=_KINDS[dtype], BYTES=BYTES,
                                                     **extra)
    else:
        _dequant_k[(triton.cdiv(n, 2 * BYTES),)](p, *args, c, target, n, BITS=bits, BLOCKSIZE=blocksize, NESTED=nbs,
                                                 DOUBLE=double, KIND=_KINDS[dtype], ELEMS=2 * BYTES, **extra)
    return out
