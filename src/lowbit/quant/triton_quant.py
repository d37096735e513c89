"""The Triton quantize kernels: quantize-on-load on a GPU, byte-identical to the PyTorch path (``nf4.quantize_torch``,
which is bitsandbytes' rounding) — the dispatch point ``nf4.quantize_blockwise`` sends CUDA tensors here.

Blockwise k-bit codes (NF4, FP4, INT4, NF3, NF2): one program per block of ``BLOCKSIZE`` weights::

    absmax  = max |w|  over the block                      (the last block may be partial)
    v       = clamp(w · (1/absmax), -1, 1)                  a whole block (reciprocal first, as bitsandbytes)
            = clamp(w / max(absmax, 1e-38), -1, 1)          the partial last block (its absmax stored clamped)
    rank    = #{midpoints < v}                              (torch.bucketize: ties go down)
    code    = order[rank]                                   (the codebook's own order; identity for sorted ones)
    bytes   = 4 bits: c0<<4 | c1;  3 bits: the 24-bit word c0<<21 | … | c7, big-endian;  2 bits: c0<<6 | … | c3

Positions past the end read as 0.0, which rounds to the code of 0.0: the pad code bitsandbytes writes.

LLM.int8 rows (``int8.py``): one program per row, two passes over it in ``COLS`` chunks::

    a = w as float16;  SCB = max |a|;  q = rint(a · (127 · (1/SCB)))   (float32; PyTorch's 127.0 / SCB is a
                                                                         reciprocal then a product; half to even)

Double quantization of the 4-bit constants stays in PyTorch on the device (``double_quant.py``: a mean and a
256-block 8-bit codec; the same operations give the same bytes on any device, the mean's reduction order aside).
The interpreter (``TRITON_INTERPRET=1``) runs these kernels on CPU tensors in the tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .spec import PACKING, QUANT_TYPES, packed_bytes

__all__ = ["quantize_codes", "quantize_rows8", "KERNELS"]


@triton.jit
def _codes(w, absmax_out, packed, mid, order, n,
           BLOCKSIZE: tl.constexpr, NMID: tl.constexpr, BITS: tl.constexpr, IDENTITY: tl.constexpr):
    b = tl.program_id(0)
    e = b * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
    keep = e < n
    x = tl.load(w + e, mask=keep, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=0)
    one = tl.full([], 1.0, tl.float32)
    if (b + 1) * BLOCKSIZE <= n:
        v = x * tl.math.div_rn(one, tl.maximum(am, 1e-38))  # correctly rounded, as PyTorch's division
        tl.store(absmax_out + b, am)
    else:
        am = tl.maximum(am, 1e-38)
        v = tl.math.div_rn(x, am)
        tl.store(absmax_out + b, am)
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    rank = tl.zeros([BLOCKSIZE], dtype=tl.int32)
    for j in tl.static_range(NMID):
        rank += (v > tl.load(mid + j)).to(tl.int32)
    if IDENTITY:
        c = rank
    else:
        c = tl.load(order + rank).to(tl.int32)
    nbytes = (n * BITS + 7) // 8
    if BITS == 4:
        hi, lo = tl.split(tl.reshape(c, [BLOCKSIZE // 2, 2]))
        i = b * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)
        tl.store(packed + i, ((hi << 4) | lo).to(tl.uint8), mask=i < nbytes)
    elif BITS == 2:
        shifts = 6 - 2 * tl.arange(0, 4)
        word = tl.sum(tl.reshape(c, [BLOCKSIZE // 4, 4]) << shifts[None, :], axis=1)
        i = b * (BLOCKSIZE // 4) + tl.arange(0, BLOCKSIZE // 4)
        tl.store(packed + i, word.to(tl.uint8), mask=i < nbytes)
    else:
        shifts = 21 - 3 * tl.arange(0, 8)
        word = tl.sum(tl.reshape(c, [BLOCKSIZE // 8, 8]) << shifts[None, :], axis=1)
        g = b * (BLOCKSIZE // 8) + tl.arange(0, BLOCKSIZE // 8)
        ok = g * 3 < ((n + 7) // 8) * 3
        tl.store(packed + 3 * g, ((word >> 16) & 255).to(tl.uint8), mask=ok)
        tl.store(packed + 3 * g + 1, ((word >> 8) & 255).to(tl.uint8), mask=ok)
        tl.store(packed + 3 * g + 2, (word & 255).to(tl.uint8), mask=ok)


@triton.jit
def _rows8(w, q, scb, cols, COLS: tl.constexpr):
    r = tl.program_id(0)
    am = tl.zeros([COLS], dtype=tl.float32)
    for start in range(0, cols, COLS):
        j = start + tl.arange(0, COLS)
        a = tl.load(w + r * cols + j, mask=j < cols, other=0.0).to(tl.float16).to(tl.float32)
        am = tl.maximum(am, tl.abs(a))
    s = tl.max(am, axis=0)
    tl.store(scb + r, s)
    one, c127 = tl.full([], 1.0, tl.float32), tl.full([], 127.0, tl.float32)
    k = tl.math.div_rn(one, s) * c127  # PyTorch's 127.0 / SCB is reciprocal(SCB) · 127
    for start in range(0, cols, COLS):
        j = start + tl.arange(0, COLS)
        a = tl.load(w + r * cols + j, mask=j < cols, other=0.0).to(tl.float16).to(tl.float32)
        y = a * k
        low = tl.floor(y)
        frac = y - low  # exact: y and its floor are within a factor of two
        odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)  # round half to even, as torch.round
        rounded = tl.where(up, low + 1.0, low)
        tl.store(q + r * cols + j, rounded.to(tl.int8), mask=j < cols)


KERNELS = {"codes": _codes, "rows8": _rows8}
"""Every quantize kernel, for the compile test (tests/quant/test_triton_compile.py)."""

_tables: dict = {}


def _table(t: torch.Tensor, device) -> torch.Tensor:
    key = (device, t.dtype, t.cpu().numpy().tobytes())
    if key not in _tables:
        _tables[key] = t.detach().contiguous().to(device)
    return _tables[key]


def quantize_codes(w: torch.Tensor, quant_type: str, blocksize: int, midpoints: torch.Tensor,
                   order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed (bytes, 1) uint8, absmax (blocks,) float32)`` of ``w`` on its device (see the module docstring)."""
    bits = QUANT_TYPES[quant_type].storage_bits
    flat = w.contiguous().view(-1)
    n = flat.numel()
    blocks = -(-n // blocksize)
    packed = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
    identity = bool(torch.equal(order.cpu(), torch.arange(len(order), dtype=torch.uint8, device="cpu")))
    extra = {} if w.device.type == "cpu" else {"enable_fp_fusion": False}
    mids, slots = _table(midpoints.float(), w.device), _table(order.to(torch.int32), w.device)
    _codes[(blocks,)](flat, absmax, packed, mids, slots, n, BLOCKSIZE=blocksize, NMID=midpoints.numel(), BITS=bits,
                      IDENTITY=identity, **extra)
    assert PACKING[bits]  # the layouts this kernel writes are quant.spec.PACKING's
    return packed.view(-1, 1), absmax


def quantize_rows8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes, float32 SCB)`` of a 2-D weight on its device (LLM.int8, bitsandbytes' bytes)."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    scb = torch.empty(rows, dtype=torch.float32, device=w.device)
    chunk = min(4096, 1 << max(4, math.ceil(math.log2(cols))))
    _rows8[(rows,)](w.contiguous(), q, scb, cols, COLS=chunk)
    return q, scb
