"""The quantization data types lowbit offers, and ``QuantSpec``: how a frozen base is stored.

``QUANT_TYPES`` is the one table of names (codebooks, config, command line and planner read it). Importing
this module does not import torch.

    QuantSpec(quant_type="nf4", blocksize=64, double_quant=True)

``blocksize`` is the number of weights sharing one absmax (a power of two, 32…4096); ``double_quant`` stores
those constants as 8-bit codes with one float32 per ``NESTED_BLOCKSIZE`` of them (≈0.127 instead of 0.5 bits
per weight at blocksize 64).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError

__all__ = ["QuantType", "QUANT_TYPES", "QuantSpec", "NESTED_BLOCKSIZE", "check_blocksize", "check_quant_type",
           "CALIBRATIONS", "CALIBRATION_STAGES", "calibration_stages", "PACKING", "packed_bytes",
           "LOWBIT_QUANT_METHOD", "INT8"]

NESTED_BLOCKSIZE = 256  # constants per nested absmax (bitsandbytes' double quantization)
# config.json's quantization_config.quant_method for checkpoints of types bitsandbytes does not have (io/export.py)
LOWBIT_QUANT_METHOD = "lowbit"

# how the codes and block scales of a k-bit weight are chosen; a method is one stage or several joined by "+",
# in this order (``calibration_stages``). The layout — codes, absmax field, double quantization — is the same for all.
CALIBRATION_STAGES = {
    "awq": "activation-aware per-channel scales folded into the norms / previous layers (quant/awq.py)",
    "clip": "each block's scale clipped below its absmax where the activation-weighted error drops "
            "(quant/clipping.py)",
    "gptq": "GPTQ's error-compensating rounding under calibration inputs (quant/gptq.py)",
    "blockwise": "block scales and rounding trained per decoder block against the float block's output "
                 "(io/blockwise.py)",
    "e2e": "the codes frozen, every block scale (and the LoRA start) trained end to end against the float model's "
           "output (io/e2e.py)",
}
CALIBRATIONS = {
    "none": "round to nearest (bitsandbytes' own choice)",
    **CALIBRATION_STAGES,
    "both": "awq's scales, then gptq's rounding of the scaled weights (= awq+gptq)",
}
_ALIASES = {"both": ("awq", "gptq")}


def calibration_stages(method: str, what: str = "quant_calibration") -> tuple[str, ...]:
    """The stages of a calibration method: ``"none"`` → (), ``"awq+clip+gptq"`` → ("awq", "clip", "gptq")."""
    if not isinstance(method, str) or not method:
        raise LowbitError(f"{what} must be none, a stage ({', '.join(CALIBRATION_STAGES)}) or stages joined by '+', "
                          f"got {method!r}")
    if method == "none":
        return ()
    stages = _ALIASES.get(method) or tuple(method.split("+"))
    order = list(CALIBRATION_STAGES)
    unknown = [s for s in stages if s not in CALIBRATION_STAGES]
    if unknown:
        names = ", ".join(CALIBRATIONS)
        raise LowbitError(f"{what} must be one of {names} or stages joined by '+' in the order {', '.join(order)}, "
                          f"got {method!r}")
    if [order.index(s) for s in stages] != sorted({order.index(s) for s in stages}):
        raise LowbitError(f"{what}: stages run once each in the order {', '.join(order)}, got {method!r}")
    if "gptq" in stages and "blockwise" in stages:
        raise LowbitError(f"{what}: gptq and blockwise both choose the codes; pick one, got {method!r}")
    return stages


@dataclass(frozen=True)
class QuantType:
    bits: int                  # information bits per code (NF3: 3)
    storage_bits: int          # bits one code takes in memory (its byte layout: quant/packing.py)
    bitsandbytes: bool         # transformers + bitsandbytes load a checkpoint of this type
    about: str
    zero_point: bool = False   # a k-bit zero point per block beside its scale (quant/zero_point.py)


QUANT_TYPES = {
    "nf4": QuantType(4, 4, True, "4-bit NormalFloat: normal quantiles (the QLoRA default)"),
    "fp4": QuantType(4, 4, True, "4-bit float E2M1, bitsandbytes' layout"),
    "int4": QuantType(4, 4, False, "symmetric integers -7..7"),
    "nf3": QuantType(3, 3, False, "3-bit NormalFloat, 8 codes in 3 bytes"),
    "nf2": QuantType(2, 2, False, "2-bit NormalFloat, 4 codes per byte"),
    "int3": QuantType(3, 3, False, "uniform 3-bit integers 0..7 with a 3-bit zero point per block", zero_point=True),
    "int2": QuantType(2, 2, False, "uniform 2-bit integers 0..3 with a 2-bit zero point per block", zero_point=True),
}


# LLM.int8 storage (load_in_8bit): row-wise absmax int8 codes, not a blockwise codebook (quant/int8.py)
INT8 = "int8"
ROWWISE = {INT8: QuantType(8, 8, True, "LLM.int8: row-wise absmax int8 + a float32 scale per row (bitsandbytes' "
                                      "Int8Params / SCB)")}

# how codes of each storage width lie in bytes (quant/packing.py): bits → (codes per group, bytes per group)
PACKING = {4: (2, 1), 3: (8, 3), 2: (4, 1)}
assert all(t.storage_bits in PACKING for t in QUANT_TYPES.values())


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take (the last group padded)."""
    codes, nbytes = PACKING[bits]
    return -(-n // codes) * nbytes


def check_quant_type(quant_type: str, what: str = "quant_type") -> str:
    if quant_type not in QUANT_TYPES:
        raise LowbitError(f"{what} must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    return quant_type


def check_blocksize(blocksize: int, lo: int = 32, hi: int = 4096) -> int:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or not lo <= blocksize <= hi \
            or blocksize & (blocksize - 1):
        raise LowbitError(f"blocksize must be a power of two from {lo} to {hi}, got {blocksize!r}")
    return blocksize


@dataclass(frozen=True)
class QuantSpec:
    """How a frozen weight is stored: data type, weights per absmax, and whether the absmax are quantized too."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if self.quant_type in ROWWISE:
            if self.double_quant:
                raise LowbitError("int8 storage has one float32 scale per row: no double quantization")
            return
        check_quant_type(self.quant_type)
        check_blocksize(self.blocksize)
        if not isinstance(self.double_quant, bool):
            raise LowbitError(f"double_quant must be true or false, got {self.double_quant!r}")

    @property
    def info(self) -> QuantType:
        return ROWWISE.get(self.quant_type) or QUANT_TYPES[self.quant_type]

    @property
    def rowwise(self) -> bool:
        return self.quant_type in ROWWISE

    def __str__(self) -> str:
        if self.rowwise:
            return f"{self.quant_type} (row-wise scales)"
        return f"{self.quant_type}{'+DQ' if self.double_quant else ''} (blocksize {self.blocksize})"
