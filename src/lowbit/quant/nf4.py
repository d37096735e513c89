"""Blockwise absmax quantization of a weight to k-bit codes (NF4 and the other data types of ``spec.QUANT_TYPES``).

Math (bitsandbytes' layout, for any codebook from ``codebooks``)::

    flatten w row-major; split into blocks of B elements (the last one may be shorter, no padding)
    absmax_b = max |w_i| over block b                      (float32, one per block)
    q_i      = argmin_c |w_i / absmax_b - code[c]|         (nearest code: bucketize on the midpoints)
    bytes    = pack(q, bits)                               (``packing.py``: 4-bit codes two per byte, high
                                                            nibble first, as bitsandbytes; NF3 8 per 3 bytes;
                                                            NF2 4 per byte)
    ŵ_i      = code[q_i] · absmax_b                        (dequantize, float32, then cast)

Quantizing works through the weight in chunks of whole blocks, so a 32000×4096 matrix never needs more
than a few MB of scratch beyond its input. Dequantizing has a pure-PyTorch reference
(``dequantize_reference``: unpack the codes, index the codebook, scale), a vectorised PyTorch path
(``dequantize_torch``: one gather through a byte→values table, one broadcast multiply; NF3 unpacks first) and a
C kernel (``csrc/dequant.c``: one AVX-512 permute per 16 codes) on CPU, and Triton kernels
(``triton_dequant.py``) on CUDA. ``dequantize`` is the one dispatch point every caller uses; see
bench/quant.py for why the C kernel exists. All paths give the same bytes (tests/quant/).
"""

from __future__ import annotations

import functools
import math

import torch

from . import native
from .codebooks import quant_order, zero_code
from .packing import pack_codes, unpack_codes
from .spec import PACKING, QUANT_TYPES, packed_bytes

__all__ = ["quantize_blockwise", "quantize_torch", "code_bits", "dequantize", "dequantize_torch",
           "dequantize_reference", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK = 1 << 20  # elements per quantization chunk


def _absmax_and_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the scaled values in [-1, 1], rounding exactly as bitsandbytes does."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_blockwise(w: torch.Tensor, quant_type: str = "nf4",
                       blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to packed k-bit codes (``QUANT_TYPES[quant_type].storage_bits`` bits each), on its device —
    the one dispatch point: the Triton kernel (``triton_quant.py``) for CUDA tensors, ``quantize_torch`` elsewhere.

    Returns ``(packed, absmax)``: ``packed`` uint8 of shape ``(packed_bytes(n, bits), 1)``, ``absmax`` float32
    ``(blocks,)``. Spare slots of the last byte group hold the code of 0.0, as in bitsandbytes.
    Input validation (dtype, finiteness, emptiness) is the caller's (``lowbit.quantize``).
    """
    if w.is_cuda:
        from .triton_quant import quantize_codes

        return quantize_codes(w, quant_type, blocksize, *quant_order(quant_type))
    return quantize_torch(w, quant_type, blocksize)


def quantize_torch(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_blockwise`` in PyTorch operations, a chunk of whole blocks at a time (the reference path)."""
    midpoints, order = (t.to(w.device) for t in quant_order(quant_type))
    bits = QUANT_TYPES[quant_type].storage_bits
    per, nbytes = PACKING[bits]
    identity = bool(torch.equal(order.cpu(), torch.arange(len(order), dtype=torch.uint8, device="cpu")))
    flat = w.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=w.device)
    step = max(1, _CHUNK // blocksize) * blocksize  # whole blocks per chunk (a multiple of every group size)
    for start in range(0, n, step):
        chunk = flat[start : start + step].float()
        am, scaled = _absmax_and_scale(chunk, blocksize)
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        q = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        if not identity:
            q = order[q.long()]
        p = pack_codes(q, bits, pad=zero_code(quant_type))
        packed[start // per * nbytes : start // per * nbytes + p.numel()] = p
    return packed.view(-1, 1), absmax


def code_bits(code: torch.Tensor) -> int:
    """Bits per stored code for a codebook of this size (16 entries or 15 → 4, 8 → 3, 4 → 2)."""
    return max(2, (int(code.numel()) - 1).bit_length())


def dequantize_reference(packed, absmax, code, blocksize, shape, dtype=torch.float32) -> torch.Tensor:
    """Reference path: unpack the codes, look up the codebook, scale each block, cast."""
    n = math.prod(shape)
    q = unpack_codes(packed, code_bits(code), n).long()
    vals = code.float().to(packed.device)[q]
    block = torch.arange(n, device=packed.device) // blocksize
    return (vals * absmax.float()[block]).to(dtype).reshape(shape)


_byte_tables: dict[bytes, torch.Tensor] = {}


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """256×k table: byte b → the values of the k codes it holds (4-bit: k = 2, 2-bit: k = 4), first code first."""
    key = code.detach().float().cpu().numpy().tobytes()
    t = _byte_tables.get(key)
    if t is None:
        bits = code_bits(code)
        c = torch.zeros(16, dtype=torch.float32, device="cpu")
        c[: code.numel()] = code.float()
        t = c[unpack_codes(torch.arange(256, dtype=torch.uint8, device="cpu"), bits, 256 * 8 // bits).long()]
        t = _byte_tables[key] = t.view(256, 8 // bits).contiguous()
    return t


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dequantize(packed, absmax, code, blocksize, shape, dtype=torch.float32, out=None, nested=None) -> torch.Tensor:
    """The one dispatch point: the C kernel (``native.py``) on CPU when it built, the Triton kernel on CUDA when
    Triton is installed, else the PyTorch path. The code width follows from the codebook's size (``code_bits``).

    ``nested``: ``(qabsmax, nested_absmax, nested_code, offset, nested_blocksize)`` when the block constants
    are double-quantized (``absmax`` is then None); the kernels undo both levels in one pass.
    """
    bits = code_bits(code)
    if packed.device.type == "cuda" and _triton() is not None:
        return _triton().dequantize(packed, absmax, code, blocksize, shape, dtype, out, nested)
    n = math.prod(shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    lib = native.kernel() if packed.device.type == "cpu" and out.is_contiguous() else None
    if lib is not None:
        c = code.float()
        if c.numel() < 16:
            c = torch.cat([c, c.new_zeros(16 - c.numel())])
        p, c = packed.contiguous(), c.contiguous()
        if nested is None:
            a = absmax.float().contiguous()
            args = (a.data_ptr(), None, None, None, 0.0, 0)
        else:
            qa, na, nc, offset, nbs = nested
            qa, na, nc = qa.contiguous(), na.float().contiguous(), nc.float().contiguous()
            args = (None, qa.data_ptr(), na.data_ptr(), nc.data_ptr(), float(offset), nbs)
        rc = lib.lowbit_dequant(p.data_ptr(), *args, c.data_ptr(), out.data_ptr(), n, blocksize, bits,
                                _KINDS[dtype], torch.get_num_threads())
        if rc == 0:
            return out
    if nested is not None:
        from .double_quant import double_dequantize

        qa, na, nc, offset, nbs = nested
        absmax = double_dequantize(qa, na, offset, nc, nbs)
    return dequantize_torch(packed, absmax, code, blocksize, shape, dtype, out)


@functools.cache
def _triton():
    """The Triton kernel module, imported on first use on a CUDA tensor (None without Triton)."""
    try:
        from . import triton_dequant
    except ImportError:
        return None
    return triton_dequant


def dequantize_torch(packed, absmax, code, blocksize, shape, dtype=torch.float32, out=None) -> torch.Tensor:
    """Vectorised PyTorch path: ``table[packed]`` (one gather; NF3's 3-byte groups are unpacked first), times the
    block's absmax (one multiply)."""
    n = math.prod(shape)
    if code_bits(code) == 3:
        vals = code.float().to(packed.device)[unpack_codes(packed, 3, n).long()]
    else:
        table = _byte_table(code).to(packed.device)
        vals = table[packed.reshape(-1).long()].view(-1)[:n]  # (codes per byte · bytes,) float32
    absmax = absmax.float()
    rem = n % blocksize
    full = n - rem
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    o = out.view(-1)
    if full:
        blocks = vals[:full].view(-1, blocksize)
        torch.mul(blocks, absmax[: full // blocksize].unsqueeze(1), out=blocks)
        o[:full].copy_(vals[:full])
    if rem:
        o[full:].copy_(vals[full:] * absmax[-1])
    return out
