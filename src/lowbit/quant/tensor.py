"""``QuantizedTensor``: packed k-bit codes + quant state, with bitsandbytes-compatible (de)serialisation.

State-dict layout (identical to what transformers + bitsandbytes save for a 4-bit weight)::

    weight                                   uint8   (packed_bytes(n, bits), 1)   packed codes (``packing.py``;
                                             4-bit: ((n+1)//2, 1), high nibble first)
    weight.absmax                            uint8 with double quant (float32 without)   (blocks,)
    weight.quant_map                         float32 (16,)           the codebook
    weight.nested_absmax                     float32 (ceil(blocks/256),)        [double quant only]
    weight.nested_quant_map                  float32 (256,)          signed dynamic map  [double quant only]
    weight.quant_state.bitsandbytes__<type>  uint8   UTF-8 JSON of quant_type, blocksize, dtype, shape
                                             (+ nested_blocksize, nested_dtype, nested_offset)

NF3 and NF2 (lowbit's own; bitsandbytes does not load them) use the same keys, ``quant_type`` ``nf3``/``nf2``, a
3-bit or 2-bit packing and ``"code_bits"`` in the JSON. A file without ``code_bits`` for NF3 / NF2 is from
before lowbit packed them densely (one code per nibble); it loads and is repacked. INT3 / INT2 (``zero_point.py``)
add ``weight.zeros``: uint8 ``(packed_bytes(blocks, bits), 1)``, each block's zero point packed like the codes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from ..errors import LowbitError
from .codebooks import bits_of, codebook
from .double_quant import NESTED_BLOCKSIZE, double_dequantize, double_quantize
from .nf4 import FLOAT_DTYPES, code_bits, dequantize, quantize_blockwise
from .packing import pack_codes, unpack_codes
from .spec import QUANT_TYPES, QuantSpec, packed_bytes
from .zero_point import dequantize_shifted, has_zero_point

__all__ = ["QuantizedTensor", "quantize", "check_finite"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(eq=False)
class QuantizedTensor:
    packed: torch.Tensor               # uint8 ((n+1)//2, 1)
    absmax: torch.Tensor               # float32 (blocks,) or uint8 codes with double quant
    shape: torch.Size
    dtype: torch.dtype                 # dtype of the original tensor
    blocksize: int
    quant_type: str
    code: torch.Tensor                 # float32 codebook (≤16 entries, index = code)
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    zeros: torch.Tensor | None = None  # packed k-bit zero point per block (INT3 / INT2), else None

    # ---- facts -------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.quant_type, self.blocksize, self.double_quant)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held per tensor: codes + constants (+ nested constants and the float32 offset).

        The 16-entry codebook and 256-entry nested map are shared by every tensor of a type, so they are
        not charged here.
        """
        n = self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            n += self.nested_absmax.numel() * 4 + 4
        if self.zeros is not None:
            n += self.zeros.numel()
        return n

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    @property
    def info_bits(self) -> int:
        """Bits per code (3 for NF3: eight codes in three bytes)."""
        return bits_of(self.quant_type)

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={tuple(self.shape)}, quant_type={self.quant_type!r}, "
                f"blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, bits_per_param={self.bits_per_param:.3f})")

    # ---- math --------------------------------------------------------------------------------
    def absmax_float(self) -> torch.Tensor:
        if self.double_quant:
            return double_dequantize(self.absmax, self.nested_absmax, self.nested_offset, self.nested_code,
                                     self.nested_blocksize)
        return self.absmax

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise LowbitError(f"dequantize: dtype must be one of float32, bfloat16, float16, got {dtype}")
        if self.zeros is not None:  # code·s in float32, minus the block's zero point, then one cast
            return dequantize_shifted(self.packed, self.absmax_float().float(), self.code, self.zeros, self.blocksize,
                                      self.shape, dtype, out)
        if self.double_quant:
            nested = (self.absmax, self.nested_absmax, self.nested_code, self.nested_offset, self.nested_blocksize)
            return dequantize(self.packed, None, self.code, self.blocksize, self.shape, dtype, out=out, nested=nested)
        return dequantize(self.packed, self.absmax, self.code, self.blocksize, self.shape, dtype, out=out)

    def to(self, device) -> QuantizedTensor:
        mv = lambda t: None if t is None else t.to(device)
        return replace(self, packed=mv(self.packed), absmax=mv(self.absmax), code=mv(self.code),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code), zeros=mv(self.zeros))

    # ---- bitsandbytes layout -----------------------------------------------------------------
    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.dtype],
                "shape": list(self.shape)}
        if QUANT_TYPES[self.quant_type].storage_bits != 4:
            meta["code_bits"] = QUANT_TYPES[self.quant_type].storage_bits
        sd = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.zeros is not None:
            sd[f"{prefix}.zeros"] = self.zeros
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.nested_offset)
        blob = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8, device="cpu")
        sd[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = blob
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
        """Rebuild from our own or a bitsandbytes-saved state dict (keys under ``prefix``)."""
        qs_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            raise LowbitError(f"{prefix}: expected one '{prefix}.quant_state.bitsandbytes__<type>' entry, "
                              f"found {len(qs_keys)}")
        try:
            meta = json.loads(bytes(sd[qs_keys[0]].to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LowbitError(f"{qs_keys[0]}: quant state is not valid JSON ({e})") from None
        for k in (prefix, f"{prefix}.absmax", f"{prefix}.quant_map"):
            if k not in sd:
                raise LowbitError(f"{prefix}: missing tensor {k!r}")
        qt = meta.get("quant_type")
        if qt not in QUANT_TYPES:
            raise LowbitError(f"{qs_keys[0]}: unknown quant_type {qt!r}")
        shape = torch.Size(meta["shape"])
        dtype = getattr(torch, meta.get("dtype", "float32"), None)
        if dtype not in FLOAT_DTYPES:
            raise LowbitError(f"{qs_keys[0]}: unsupported dtype {meta.get('dtype')!r}")
        blocksize = int(meta["blocksize"])
        n = math.prod(shape)
        bits = QUANT_TYPES[qt].storage_bits
        if meta.get("code_bits", bits) != bits:
            raise LowbitError(f"{qs_keys[0]}: code_bits {meta['code_bits']!r} does not fit quant_type {qt!r} "
                              f"({bits} bits)")
        if code_bits(sd[f"{prefix}.quant_map"]) != bits:
            raise LowbitError(f"{prefix}.quant_map: {sd[f'{prefix}.quant_map'].numel()} codes do not fit quant_type "
                              f"{qt!r} ({bits}-bit codes)")
        packed = sd[prefix].view(torch.uint8).reshape(-1, 1)
        if bits != 4 and "code_bits" not in meta and packed.numel() == (n + 1) // 2:  # one code per nibble
            zero = int(sd[f"{prefix}.quant_map"].float().abs().argmin())  # spare slots: the code of 0.0
            packed = pack_codes(unpack_codes(packed, 4, n), bits, pad=zero).view(-1, 1)
        if packed.numel() != packed_bytes(n, bits):
            raise LowbitError(f"{prefix}: {packed.numel()} packed bytes do not hold shape {tuple(shape)} of "
                              f"{bits}-bit codes (expected {packed_bytes(n, bits)})")
        absmax = sd[f"{prefix}.absmax"]
        if absmax.numel() != -(-n // blocksize):
            raise LowbitError(f"{prefix}.absmax: {absmax.numel()} constants, expected {-(-n // blocksize)}")
        zeros = sd.get(f"{prefix}.zeros")
        if has_zero_point(qt) and (zeros is None or zeros.numel() != packed_bytes(absmax.numel(), bits)):
            raise LowbitError(f"{prefix}.zeros: quant_type {qt!r} needs a zero point per block "
                              f"({packed_bytes(absmax.numel(), bits)} packed bytes), found "
                              f"{'none' if zeros is None else zeros.numel()}")
        if zeros is not None and not has_zero_point(qt):
            raise LowbitError(f"{prefix}.zeros: quant_type {qt!r} has no zero points")
        nested = f"{prefix}.nested_absmax" in sd
        return cls(packed=packed, absmax=absmax if nested else absmax.float(), shape=shape, dtype=dtype,
                   blocksize=blocksize,
                   quant_type=qt, code=sd[f"{prefix}.quant_map"].float(),
                   nested_absmax=sd[f"{prefix}.nested_absmax"].float() if nested else None,
                   nested_code=sd[f"{prefix}.nested_quant_map"].float() if nested else None,
                   nested_offset=float(meta["nested_offset"]) if nested else None,
                   nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
                   zeros=None if zeros is None else zeros.view(torch.uint8).reshape(-1, 1))


def quantize(w: torch.Tensor, quant_type: str | QuantSpec = "nf4", blocksize: int = 64,
             double_quant: bool = True) -> QuantizedTensor:
    """Quantize a float tensor blockwise to a k-bit data type (default NF4 with double quantization), on the
    tensor's own device (a GPU's weight is quantized there).

    ``quant_type`` may be a ``QuantSpec``, which then gives all three settings.
    """
    if not isinstance(w, torch.Tensor):
        raise LowbitError(f"quantize: expected a torch.Tensor, got {type(w).__name__}")
    try:
        spec = quant_type if isinstance(quant_type, QuantSpec) else QuantSpec(quant_type, blocksize, double_quant)
    except LowbitError as e:
        raise LowbitError(f"quantize: {e}") from None
    quant_type, blocksize, double_quant = spec.quant_type, spec.blocksize, spec.double_quant
    if w.dtype not in FLOAT_DTYPES:
        raise LowbitError(f"quantize: weight dtype must be float32, bfloat16 or float16, got {w.dtype}")
    if w.numel() == 0:
        raise LowbitError(f"quantize: cannot quantize an empty tensor (shape {tuple(w.shape)})")
    w = w.detach()
    check_finite(w)
    if has_zero_point(quant_type):
        from .clipping import quantize_with_scales  # the min-max range as each block's scale

        return quantize_with_scales(w, None, spec)
    packed, absmax = quantize_blockwise(w.contiguous(), quant_type, blocksize)  # on w's device
    q = QuantizedTensor(packed, absmax, torch.Size(w.shape), w.dtype, blocksize, quant_type,
                        codebook(quant_type).to(w.device))
    if double_quant:
        q.absmax, q.nested_absmax, q.nested_offset, nested_code = double_quantize(absmax)
        q.nested_code = nested_code.to(w.device)
    return q


def check_finite(w: torch.Tensor, chunk: int = 1 << 22) -> None:
    """Refuse a weight holding NaN or Inf (counted a chunk at a time: no full-size temporaries)."""
    flat = w.reshape(-1)
    bad = sum(int((~torch.isfinite(flat[i : i + chunk])).sum()) for i in range(0, flat.numel(), chunk))
    if bad:
        raise LowbitError(f"quantize: weight of shape {tuple(w.shape)} has {bad} non-finite values (NaN/Inf)")
