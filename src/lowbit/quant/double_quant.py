"""Double quantization: the per-block float32 absmax constants are themselves quantized to 8 bits.

Math (bitsandbytes ``compress_statistics=True``)::

    offset   = mean(absmax)                                   (one float32 scalar)
    c        = absmax - offset                                (centred: uses the signed map well)
    nested_b = max |c_i| over blocks of 256 constants         (float32, one per 256 blocks)
    q_i      = nearest entry of the signed 8-bit dynamic map to c_i / nested_b
    absmax_i ≈ dynamic[q_i] · nested_b + offset

Cost per parameter at blocksize 64: 8/64 + 32/(64·256) ≈ 0.127 bits instead of 32/64 = 0.5.
``quantize8`` / ``dequantize8`` are the generic blockwise 8-bit codec (also used for 8-bit optimizer state).
"""

from __future__ import annotations

import torch

from .codebooks import dynamic_map
from .spec import NESTED_BLOCKSIZE

__all__ = ["NESTED_BLOCKSIZE", "quantize8", "dequantize8", "double_quantize", "double_dequantize", "rounding_lut"]


_LUT_SIZE = 65536
_luts: dict[tuple, torch.Tensor] = {}


def rounding_lut(code: torch.Tensor, device=None) -> torch.Tensor:
    """65536-entry table: a value in [-1, 1] discretised to 16 bits → index of the nearest code.

    This is how bitsandbytes 0.50 rounds to the 8-bit map on CPU (a lookup instead of a search), so the
    codes differ from exact nearest rounding only for values within ~1.5e-5 of a midpoint; we reproduce
    it to stay byte-identical. One table per codebook and device, built once (callers on a hot path keep it).
    """
    code = code.detach().float().cpu()
    key = (code.numpy().tobytes(), str(device or "cpu"))
    lut = _luts.get(key)
    if lut is None:
        mid = 0.5 * (code[:-1] + code[1:])
        grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device="cpu")) / (_LUT_SIZE - 1)
        lut = _luts[key] = torch.searchsorted(mid, grid, right=False).to(torch.uint8).to(device or "cpu")
    return lut


def quantize8(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE,
              lut: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``x`` to uint8 indices into the sorted 256-entry ``code``.

    ``v = x · (1/absmax)``, then ``lut[trunc(((v+1)·0.5)·65535 + 0.5)]``; an all-zero block stores code 0.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    v = torch.clamp(padded * inv.unsqueeze(1), -1.0, 1.0)
    idx = ((((v + 1.0) * 0.5) * (_LUT_SIZE - 1)) + 0.5).to(torch.int64)  # truncation, as in C
    q = (lut if lut is not None else rounding_lut(code, idx.device))[idx]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].view(x.shape), absmax


def dequantize8(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    vals = code.to(q.device)[q.reshape(-1).long()]
    n = vals.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].unsqueeze(1)).reshape(-1)
    if rem:
        out[full:] = vals[full:] * absmax[-1]
    return out.view(q.shape)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """``absmax`` (float32) → ``(qabsmax uint8, nested_absmax float32, offset, nested_code)``."""
    offset = absmax.mean()
    code = dynamic_map(signed=True)
    q, nested = quantize8(absmax - offset, code, NESTED_BLOCKSIZE)
    return q, nested, float(offset.item()), code


def double_dequantize(qabsmax, nested_absmax, offset: float, code,
                      nested_blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    return dequantize8(qabsmax, nested_absmax, code, nested_blocksize) + torch.tensor(offset, dtype=torch.float32,
                                                                                      device=qabsmax.device)
