"""k-bit blockwise quantization: data types, NF4 storage, double quantization, the quantized tensor."""

from .._lazy import exports

__all__ = ["CODEBOOKS", "codebook", "dynamic_map", "QuantizedTensor", "quantize", "QuantSpec", "QUANT_TYPES"]
__getattr__, __dir__ = exports(__name__, {
    "CODEBOOKS": ".codebooks", "codebook": ".codebooks", "dynamic_map": ".codebooks",
    "QuantizedTensor": ".tensor", "quantize": ".tensor", "QuantSpec": ".spec", "QUANT_TYPES": ".spec",
})
