"""The frozen base weight's matmul, in row chunks where the CPU's bfloat16 GEMM runs faster that way: the forward
product and the input gradient of the 4-bit layer (eager and compiled), its trained-scales variant and the 8-bit layer.

    y = x · w   (x: tokens × in, w: in × out)   computed as   y[i:i+c] = x[i:i+c] · w   for row chunks of c

Same product, row by row: every output row is still one dot product per column over the whole of ``in``, so only
the library's blocking of the work changes (on this machine's oneDNN the chunked and whole products came out
bit-identical for 1,024 and 2,048 rows at these widths; the tests hold them to float tolerance).

Why: PyTorch's CPU bfloat16 GEMM (oneDNN, AMX) splits a product by its shape, and for a 576-wide output with
1,024 or more rows it picks a split that runs at ~60 % of the rate it reaches on 512 rows. Measured on the
2-core AMX machine (TFLOP/s, whole → 512-row chunks): 1,024 × 1,536 → 576 1.42 → 2.48; 1,024 × 576 → 576
1.71 → 2.42; but 1,024 × 576 → 1,536 3.00 → 2.46 and 1,024 × 576 → 192 2.45 → 1.86, so only outputs 384–640 wide
are chunked, and only in bfloat16 on the CPU. In a SmolLM2-135M 4×256 QLoRA step the base matmuls went from 0.340
to 0.267 s (bench/step_profile.py's families, same session). The rule is a fixed function of the shape, not a
timing taken at run time, so every process of a run (resumed, or one of several ranks) computes the same bits.
"""

from __future__ import annotations

import torch

__all__ = ["base_matmul", "reference_matmul", "row_chunk"]

CHUNK_ROWS = 512
NARROW = (384, 640)  # output widths the chunking is used for (inclusive)


def row_chunk(rows: int, out: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk for a (rows × ·) · (· × out) product, or 0 for one product."""
    if device.type != "cpu" or dtype != torch.bfloat16 or rows < 2 * CHUNK_ROWS:
        return 0
    return CHUNK_ROWS if NARROW[0] <= out <= NARROW[1] else 0


def reference_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · w as one product (x of any leading shape)."""
    return x @ w


def base_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · w (x of any leading shape, w 2-D, both in the compute dtype), chunked by rows where ``row_chunk`` says."""
    flat = x.reshape(-1, x.shape[-1])
    chunk = row_chunk(flat.shape[0], w.shape[1], x.dtype, x.device)
    if not chunk or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        return reference_matmul(x, w)
    out = flat.new_empty(flat.shape[0], w.shape[1])
    for i in range(0, flat.shape[0], chunk):
        torch.mm(flat[i:i + chunk], w, out=out[i:i + chunk])
    return out.view(*x.shape[:-1], w.shape[1])
