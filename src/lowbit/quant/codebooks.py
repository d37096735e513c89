"""k-bit data types ("codebooks"): a sorted float32 tensor of the values a code can stand for.

Each data type is built from its definition; ``CODEBOOKS`` maps every name of ``spec.QUANT_TYPES`` (the one
table of names) to its builder.

- **NF-k (NormalFloat)**: quantiles of N(0, 1), equal probability mass per bin, normalised to [-1, 1].
  2^(k-1) non-negative-side quantiles from ``linspace(offset, 0.5, 2^(k-1)+1)`` and 2^(k-1)-1 negative ones
  from ``linspace(offset, 0.5, 2^(k-1))`` plus an exact zero, divided by the largest. ``offset`` is the
  midpoint of 1-1/(2(2^k-1)) and 1-1/(2·2^k); for k=4 bitsandbytes writes it as 0.9677083.
- **FP4 (E2M1, bitsandbytes layout)**: sign bit, 2 exponent bits, 1 mantissa bit; bnb's exponent order
  gives magnitude ``2^(4-e)·(1+m/2)`` for e>0 and ``m·0.0625`` for e=0, normalised by 12. Stored by bit
  pattern (code = 4-bit value), so the table is *not* sorted; ``quant_order`` handles that.
- **INT4**: symmetric integers -7…7 divided by 7 (15 codes; code 15 unused).
- **INT3 / INT2**: the integers 0…2^k−1 divided by 2^k−1, uniform on [0, 1]; a block's zero point shifts them
  (``zero_point.py``).
- **dynamic (8-bit)**: bitsandbytes' signed/unsigned dynamic-exponent map, used for double quantization
  and 8-bit optimizer state.
"""

from __future__ import annotations

import functools

import torch

from .spec import QUANT_TYPES, check_quant_type

__all__ = ["codebook", "quant_order", "zero_code", "dynamic_map", "CODEBOOKS", "bits_of"]


def _normal_float(bits: int, offset: float | None = None) -> torch.Tensor:
    n = 2**bits
    if offset is None:
        offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    half = n // 2
    # float32 linspace, float64 quantile, float32 normalise: the order bitsandbytes' generator uses.
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float32, device="cpu")[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float32, device="cpu")[:-1].double())
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64, device="cpu"), neg]).float()
    values = values.sort().values
    return values / values.max()


def nf4() -> torch.Tensor:
    return _normal_float(4, offset=0.9677083)


def nf3() -> torch.Tensor:
    return _normal_float(3)


def nf2() -> torch.Tensor:
    return _normal_float(2)


def fp4() -> torch.Tensor:
    values = []
    for code in range(16):
        sign = -1.0 if code & 0b1000 else 1.0
        e, m = (code >> 1) & 0b11, code & 1
        mag = m * 0.0625 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)
        values.append(sign * mag if mag else 0.0)  # bnb stores +0 for both zero codes
    t = torch.tensor(values, dtype=torch.float32, device="cpu")
    return t / t.abs().max()


def int4() -> torch.Tensor:
    return torch.arange(-7, 8, dtype=torch.float32, device="cpu") / 7


def _uniform(bits: int) -> torch.Tensor:
    return torch.arange(2**bits, dtype=torch.float32, device="cpu") / (2**bits - 1)


def int3() -> torch.Tensor:
    return _uniform(3)


def int2() -> torch.Tensor:
    return _uniform(2)


CODEBOOKS = {"nf4": nf4, "fp4": fp4, "int4": int4, "nf3": nf3, "nf2": nf2, "int3": int3, "int2": int2}
assert CODEBOOKS.keys() == QUANT_TYPES.keys(), "every quant type needs a codebook builder"


def bits_of(quant_type: str) -> int:
    """Information bits of a data type (NF3 is 3 even though we store it in a 4-bit nibble)."""
    return QUANT_TYPES[check_quant_type(quant_type)].bits


@functools.cache
def _cached(quant_type: str) -> torch.Tensor:
    return CODEBOOKS[quant_type]()


def codebook(quant_type: str) -> torch.Tensor:
    """The code table of ``quant_type``: ``table[code]`` is the normalised value. Returns a fresh copy."""
    check_quant_type(quant_type)
    return _cached(quant_type).clone()


@functools.cache
def quant_order(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(midpoints, order)``: bucketize against ``midpoints`` gives a rank; ``order[rank]`` is the code.

    Ties (FP4's +0 and -0) resolve as bitsandbytes does, by ``torch.argsort`` of the table.
    """
    code = codebook(quant_type)
    order = torch.argsort(code)
    s = code[order]
    return (s[:-1] + s[1:]) / 2, order.to(torch.uint8)


@functools.cache
def zero_code(quant_type: str) -> int:
    """The code round-to-nearest gives 0.0 (what spare slots of a packed byte group hold, as in bitsandbytes)."""
    midpoints, order = quant_order(quant_type)
    return int(order[torch.bucketize(torch.zeros(1, device="cpu"), midpoints)])


@functools.cache
def _dynamic_map(signed: bool) -> torch.Tensor:
    max_exponent_bits, total_bits = 7, 8
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        width = i + non_sign_bits - max_exponent_bits
        items = 2**width + 1 if signed else 2 ** (width + 1) + 1
        b = torch.linspace(0.1, 1, items, dtype=torch.float32, device="cpu")
        means = ((b[:-1] + b[1:]) / 2.0)
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:  # never for 7 exponent bits; kept for other widths
        b = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32, device="cpu")
        means = (b[:-1] + b[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device="cpu")


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map: exponent 10^-6…10^0 by a unary prefix, the rest linear fraction."""
    return _dynamic_map(signed).clone()
