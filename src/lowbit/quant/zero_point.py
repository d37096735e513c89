"""Uniform k-bit codes with a zero point per block (INT2 / INT3: asymmetric min-max quantization, the layout GPTQ
and AWQ checkpoints use), beside the symmetric codebooks.

For a block b of weights w_i, L = 2^k − 1 and the codebook code[q] = q / L (uniform on [0, 1])::

    lo_b   = min(min_i w_i, 0)      hi_b = max(max_i w_i, 0)
    s_b    = hi_b − lo_b                           stored in the absmax field (double-quantized like any absmax)
    z_b    = round(−lo_b / s_b · L) ∈ {0 … L}      stored packed at k bits per block (``weight.zeros``)
    q_i    = nearest code of clamp(w_i / s_b + code[z_b], 0, 1)
    ŵ_i    = s_b · (code[q_i] − code[z_b])         (q_i = z_b gives exactly 0)

Every rounding site works in the block's *shifted* frame ``v = clamp(w / s + shift, lo, hi)`` with ``shift`` =
code[z_b] for these types and 0 (bounds −1, 1) for the symmetric ones, so one rule serves both; dequantizing
subtracts ``shift · s`` per block after the codebook lookup, in float32.
"""

from __future__ import annotations

import math

import torch

from .nf4 import code_bits, dequantize
from .packing import pack_codes, unpack_codes
from .spec import PACKING, QUANT_TYPES, packed_bytes

__all__ = ["has_zero_point", "bounds", "range_and_zeros", "block_shift", "pack_zeros", "shifted", "unshift_",
           "dequantize_shifted"]

_CHUNK = 1 << 20  # weights per float32 pass of dequantize_shifted (4 MiB of float32; 256K–4M measured alike)


def has_zero_point(quant_type: str) -> bool:
    return QUANT_TYPES[quant_type].zero_point


def bounds(quant_type: str) -> tuple[float, float]:
    """The interval a block's scaled weights are clamped to before rounding."""
    return (0.0, 1.0) if has_zero_point(quant_type) else (-1.0, 1.0)


def range_and_zeros(flat: torch.Tensor, blocksize: int, bits: int,
                    chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of the row-major ``flat`` weight (the last one may be shorter): the scale s_b = hi − lo (float32)
    and the zero point z_b (uint8), a chunk of whole blocks at a time."""
    levels, n = (1 << bits) - 1, flat.numel()
    nblocks = -(-n // blocksize)
    scale = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    zeros = torch.empty(nblocks, dtype=torch.uint8, device=flat.device)
    step = max(1, chunk // blocksize) * blocksize
    for start in range(0, n, step):
        x = flat[start: start + step].float()
        pad = -x.numel() % blocksize  # the short last block padded with its own first value: min and max unchanged
        if pad:
            x = torch.cat([x, x[x.numel() - x.numel() % blocksize].expand(pad)])
        x = x.view(-1, blocksize)
        lo = x.amin(1).clamp(max=0)
        s = x.amax(1).clamp(min=0) - lo
        b0 = start // blocksize
        scale[b0: b0 + s.numel()] = s
        zeros[b0: b0 + s.numel()] = torch.round(-lo / s.clamp(min=1e-38) * levels).clamp(0, levels).to(torch.uint8)
    return scale, zeros


def block_shift(zeros: torch.Tensor | None, code: torch.Tensor, blocks: int) -> torch.Tensor | None:
    """code[z_b] per block (float32) from the packed zero points, None for a symmetric type."""
    if zeros is None:
        return None
    return code.float().to(zeros.device)[unpack_codes(zeros, code_bits(code), blocks).long()]


def pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_codes(zeros, bits).view(-1, 1)


def shifted(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, quant_type: str) -> torch.Tensor:
    """v = clamp(x / scale + shift, lo, hi): rows of ``x`` (blocks, blocksize) against their block's scale
    (``scale`` and ``shift`` of shape (blocks, 1); a zero scale counts as 1)."""
    lo, hi = bounds(quant_type)
    v = x * (1.0 / torch.where(scale == 0, torch.ones_like(scale), scale))
    return (v if shift is None else v + shift).clamp(lo, hi)


def unshift_(out: torch.Tensor, absmax: torch.Tensor, shift: torch.Tensor, blocksize: int) -> torch.Tensor:
    """out (float32, row-major) −= code[z_b] · s_b over each block, in place (the last block may be shorter)."""
    flat = out.view(-1)
    n = flat.numel()
    full = n - n % blocksize
    delta = shift.float() * absmax.float()
    if full:
        flat[:full].view(-1, blocksize).sub_(delta[: full // blocksize, None])
    if full < n:
        flat[full:].sub_(delta[-1])
    return out


def dequantize_shifted(packed, absmax, code, zeros, blocksize, shape, dtype, out=None) -> torch.Tensor:
    """ŵ = s_b · (code[q] − code[z_b]): the dequantize kernels (``nf4.dequantize``) into float32 and the shift
    subtracted there, a chunk of whole blocks at a time, then cast once into ``out`` — no full-size float32
    temporary. ``absmax``: the block scales as float32 (after double quantization)."""
    n, blocks = math.prod(shape), absmax.numel()
    bits = code_bits(code)
    per, nbytes = PACKING[bits]
    shift = block_shift(zeros, code, blocks)
    target = out if out is not None and out.is_contiguous() else torch.empty(shape, dtype=dtype, device=packed.device)
    flat, pk = target.view(-1), packed.reshape(-1)
    step = max(1, _CHUNK // blocksize)  # whole blocks: a chunk starts on a packing group (blocksize ≥ 32)
    work = None if dtype == torch.float32 else torch.empty(min(n, step * blocksize), dtype=torch.float32,
                                                           device=packed.device)
    for b0 in range(0, blocks, step):
        b1 = min(blocks, b0 + step)
        e0, e1 = b0 * blocksize, min(n, b1 * blocksize)
        seg = pk[e0 // per * nbytes: e0 // per * nbytes + packed_bytes(e1 - e0, bits)]
        dst = flat[e0:e1] if work is None else work[: e1 - e0]
        dequantize(seg, absmax[b0:b1], code, blocksize, (e1 - e0,), torch.float32, out=dst)
        unshift_(dst, absmax[b0:b1], shift[b0:b1], blocksize)
        if work is not None:
            flat[e0:e1].copy_(dst)
    return target if out is None or target is out else out.copy_(target)
