"""4-bit NormalFloat storage: blockwise absmax quantization of a weight to k-bit codes, two per byte.

Math (bitsandbytes' layout, for any codebook from ``codebooks``)::

    flatten w row-major; split into blocks of B elements (the last one may be shorter, no padding)
    absmax_b = max |w_i| over block b                      (float32, one per block)
    q_i      = argmin_c |w_i / absmax_b - code[c]|         (nearest code: bucketize on the 15 midpoints)
    byte_j   = q_{2j} << 4 | q_{2j+1}                      (first element in the HIGH nibble)
    ŵ_i      = code[q_i] · absmax_b                        (dequantize, float32, then cast)

Quantizing works through the weight in chunks of whole blocks, so a 32000×4096 matrix never needs more
than a few MB of scratch beyond its input. Dequantizing has a pure-PyTorch reference
(``dequantize_reference``: unpack nibbles, index the codebook, scale), a vectorised PyTorch path
(``dequantize_torch``: one gather through a 256-entry byte→pair table, one broadcast multiply) and a C
kernel (``csrc/dequant4.c``: one AVX-512 permute per 16 codes) on CPU, and a Triton kernel
(``triton_dequant.py``) on CUDA. ``dequantize`` is the one dispatch point every caller uses; see bench/quant.py
for why the C kernel exists. All paths give the same bytes (tests/quant/).
"""

from __future__ import annotations

import functools
import math

import torch

from . import native
from .codebooks import quant_order

__all__ = ["quantize_blockwise", "dequantize", "dequantize_torch", "dequantize_reference", "FLOAT_DTYPES"]

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
    """Quantize ``w`` to packed 4-bit codes.

    Returns ``(packed, absmax)``: ``packed`` uint8 of shape ``((n+1)//2, 1)``, ``absmax`` float32 ``(blocks,)``.
    Input validation (dtype, finiteness, emptiness) is the caller's (``lowbit.quantize``).
    """
    midpoints, order = quant_order(quant_type)
    identity = bool(torch.equal(order, torch.arange(len(order), dtype=torch.uint8)))
    flat = w.reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    step = max(1, _CHUNK // blocksize) * blocksize  # whole blocks per chunk (always even)
    for start in range(0, n, step):
        chunk = flat[start : start + step].float()
        am, scaled = _absmax_and_scale(chunk, blocksize)
        absmax[start // blocksize : start // blocksize + am.numel()] = am
        if scaled.numel() % 2:  # odd total: the spare low nibble holds the code of 0.0, as in bnb
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        q = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
        if not identity:
            q = order[q.long()]
        packed[start // 2 : start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
    return packed.view(-1, 1), absmax


def dequantize_reference(packed, absmax, code, blocksize, shape, dtype=torch.float32) -> torch.Tensor:
    """Reference path: unpack nibbles, look up the codebook, scale each block, cast."""
    n = math.prod(shape)
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    vals = code.float().to(packed.device)[q]
    block = torch.arange(n, device=packed.device) // blocksize
    return (vals * absmax.float()[block]).to(dtype).reshape(shape)


_pair_tables: dict[bytes, torch.Tensor] = {}


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """256×2 table: byte b → (code[b >> 4], code[b & 15])."""
    key = code.detach().float().cpu().numpy().tobytes()
    t = _pair_tables.get(key)
    if t is None:
        b = torch.arange(256)
        c = torch.zeros(16, dtype=torch.float32)
        c[: code.numel()] = code.float()
        t = torch.stack([c[b >> 4], c[b & 15]], dim=1).contiguous()
        _pair_tables[key] = t
    return t


_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dequantize(packed, absmax, code, blocksize, shape, dtype=torch.float32, out=None, nested=None) -> torch.Tensor:
    """The one dispatch point: the C kernel (``native.py``) on CPU when it built, the Triton kernel on CUDA when
    Triton is installed, else the PyTorch path.

    ``nested``: ``(qabsmax, nested_absmax, nested_code, offset, nested_blocksize)`` when the block constants
    are double-quantized (``absmax`` is then None); the kernels undo both levels in one pass.
    """
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
        rc = lib.lowbit_dequant4(p.data_ptr(), *args, c.data_ptr(), out.data_ptr(), n, blocksize, _KINDS[dtype],
                                 torch.get_num_threads())
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
    """Vectorised PyTorch path: ``table[packed]`` (one gather), times the block's absmax (one multiply)."""
    n = math.prod(shape)
    table = _pair_table(code).to(packed.device)
    vals = table[packed.reshape(-1).long()].view(-1)  # (2·bytes,) float32
    if n % 2:
        vals = vals[:n]
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
