"""Clipped block scales (OmniQuant's weight clipping, searched on a grid): each block's scale may sit below its
absmax where that lowers the block's activation-weighted rounding error.

For a block b of weights w_i (i: the input channel each multiplies) and d_i = E[x_i²] (the diagonal of the
layer's input second moment)::

    s_b(r)   = r · absmax_b                          r ∈ {1, 1 − (1 − r_min)/n, …, r_min}
    ŵ_i(r)   = s_b(r) · code[nearest(clamp(w_i / s_b(r), −1, 1))]
    err_b(r) = Σ_i d_i (w_i − ŵ_i(r))²               the block's share of E‖x (Ŵ − W)ᵀ‖² without cross terms

and r_b is the ratio with the least error (r = 1 is plain absmax: never worse on this error). Fewer codes make
outliers costlier to keep, so the lower the bits the more blocks clip. ``quantize_with_scales`` then stores any
given scales as the absmax field (double-quantized like every absmax) and rounds each weight against the scale
as stored: the same layout and bytes per weight as round-to-nearest — an NF4 result is still a plain bitsandbytes
checkpoint, only its constants and codes differ. For a type with a zero point (INT3 / INT2) the scale searched is
the block's range hi − lo instead of its absmax, with the zero point of round-to-nearest kept (``zero_point.py``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .codebooks import codebook, quant_order, zero_code
from .double_quant import double_dequantize, double_quantize
from .packing import pack_codes
from .spec import QUANT_TYPES, QuantSpec
from .tensor import QuantizedTensor
from .zero_point import block_shift, has_zero_point, pack_zeros, range_and_zeros, shifted

__all__ = ["block_absmax", "start_scales", "clip_scales", "quantize_with_scales", "stored_scales", "with_scales"]

_CHUNK = 1 << 20  # weights per search chunk


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(blocks, blocksize) view of ``flat``, the last block zero-padded."""
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def block_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block max |w| (float32), the blocks running over the row-major weight as bitsandbytes lays them."""
    return _blocks(w.detach().reshape(-1).float(), blocksize).abs().amax(1)


def _channel_weights(diag: torch.Tensor, n: int, start: int, blocks: int, blocksize: int) -> torch.Tensor:
    """d_i (the input channel's E[x²]) of the weights in ``blocks`` blocks from flat index ``start`` of a weight of
    ``n`` elements with ``len(diag)`` columns, laid out as those blocks (0 past the end)."""
    idx = torch.arange(start, start + blocks * blocksize, device=diag.device)
    return torch.where(idx < n, diag[idx % diag.numel()], 0.0).view(blocks, blocksize)


def start_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest's per-block scales of ``w`` (float32) and zero points (packed, None for symmetric types):
    the absmax, or the range and zero point of a zero-point type."""
    if not has_zero_point(spec.quant_type):
        return block_absmax(w, spec.blocksize), None
    bits = QUANT_TYPES[spec.quant_type].storage_bits
    scale, zeros = range_and_zeros(w.detach().reshape(-1), spec.blocksize, bits)
    return scale, pack_zeros(zeros, bits)


def _round(v: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Nearest code value of v ∈ [lo, hi] (the sorted codebook's entry)."""
    midpoints, order = quant_order(quant_type)
    return codebook(quant_type)[order.long()].to(v.device)[torch.bucketize(v, midpoints.to(v.device))]


def clip_scales(w: torch.Tensor, diag: torch.Tensor, spec: QuantSpec, grid: int = 28, lowest: float = 0.3,
                start: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """Per-block scales of ``w`` (out, in) with the least activation-weighted error (``diag``: E[x²] per input
    channel, length ``in``), searched over ``grid`` + 1 ratios of round-to-nearest's scale (the absmax, or the
    range) from 1 down to ``lowest``. ``start``: ``start_scales(w, spec)`` when the caller has it already."""
    flat = w.detach().reshape(-1).float()
    scales = torch.empty(-(-flat.numel() // spec.blocksize), dtype=torch.float32, device=w.device)
    diag = diag.to(w.device).float().clamp(min=0)
    ratios = [1 - (1 - lowest) * k / grid for k in range(grid + 1)]
    step = max(1, _CHUNK // spec.blocksize)
    blocks = _blocks(flat, spec.blocksize)
    rtn, zeros = start_scales(w, spec) if start is None else start
    shift = block_shift(zeros, codebook(spec.quant_type), blocks.shape[0])
    for b0 in range(0, blocks.shape[0], step):
        x = blocks[b0: b0 + step]
        d = _channel_weights(diag, flat.numel(), b0 * spec.blocksize, x.shape[0], spec.blocksize)
        base = rtn[b0: b0 + step, None]
        sh = None if shift is None else shift[b0: b0 + step, None]
        best_err, best = None, base
        for r in ratios:
            s = (base * r).clamp(min=1e-38)
            v = _round(shifted(x, s, sh, spec.quant_type), spec.quant_type)
            err = (d * (x - (v if sh is None else v - sh) * s) ** 2).sum(1, keepdim=True)
            if best_err is None:
                best_err, best = err, s
            else:
                better = err < best_err
                best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
        scales[b0: b0 + x.shape[0]] = torch.where(base > 0, best, base).view(-1)
    return scales


def stored_scales(scales: torch.Tensor, double_quant: bool) -> tuple[torch.Tensor, tuple | None]:
    """The scales as a checkpoint will hold them: ``(float scales after double quantization, (qabsmax,
    nested_absmax, offset, nested_code) or None)``."""
    if not double_quant:
        return scales.float(), None
    q, nested, offset, ncode = double_quantize(scales.float())
    ncode = ncode.to(scales.device)
    return double_dequantize(q, nested, offset, ncode), (q, nested, offset, ncode)


def quantize_with_scales(w: torch.Tensor, scales: torch.Tensor | None, spec: QuantSpec,
                         zeros: torch.Tensor | None = None) -> QuantizedTensor:
    """``w`` on the grid of the given per-block ``scales``: the scales stored as the absmax field, each weight
    rounded to the nearest code of its block's *stored* scale (after double quantization). ``scales`` None:
    round-to-nearest's (``start_scales``); ``zeros``: the packed zero points of a zero-point type (None: those of
    ``w``'s own ranges)."""
    if scales is None or (zeros is None and has_zero_point(spec.quant_type)):
        start, own = start_scales(w, spec)
        scales, zeros = start if scales is None else scales, own if zeros is None else zeros
    s, nested = stored_scales(scales, spec.double_quant)
    flat = w.detach().reshape(-1)
    n, bs = flat.numel(), spec.blocksize
    code = codebook(spec.quant_type).to(w.device)
    shift = block_shift(zeros, code, s.numel())
    midpoints, order = (t.to(w.device) for t in quant_order(spec.quant_type))
    zero = zero_code(spec.quant_type)
    codes = torch.empty(n, dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK // bs)
    for b0 in range(0, s.numel(), step):
        x = _blocks(flat[b0 * bs: (b0 + step) * bs].float(), bs)
        sc = s[b0: b0 + x.shape[0], None]
        c = order[torch.bucketize(shifted(x, sc, None if shift is None else shift[b0: b0 + x.shape[0], None],
                                          spec.quant_type), midpoints)]
        c = torch.where(sc == 0, torch.full_like(c, zero), c).reshape(-1)
        codes[b0 * bs: b0 * bs + c.numel()] = c[: n - b0 * bs]
    packed = pack_codes(codes, QUANT_TYPES[spec.quant_type].storage_bits, pad=zero).view(-1, 1)
    if nested is None:
        return QuantizedTensor(packed, s.clone(), torch.Size(w.shape), w.dtype, spec.blocksize, spec.quant_type, code,
                               zeros=zeros)
    q, nested_absmax, offset, ncode = nested
    return QuantizedTensor(packed, q, torch.Size(w.shape), w.dtype, spec.blocksize, spec.quant_type, code,
                           nested_absmax, ncode, offset, zeros=zeros)


def with_scales(q: QuantizedTensor, scales: torch.Tensor) -> QuantizedTensor:
    """``q``'s codes under new per-block ``scales`` (stored as the absmax field, double-quantized when ``q`` is)."""
    s, nested = stored_scales(scales, q.double_quant)
    if nested is None:
        return replace(q, absmax=s.clone())
    qa, nested_absmax, offset, ncode = nested
    return replace(q, absmax=qa, nested_absmax=nested_absmax, nested_code=ncode, nested_offset=offset)
