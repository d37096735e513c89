"""k-bit blockwise quantization: data types, NF4 storage, double quantization, the quantized tensor."""

from .codebooks import CODEBOOKS, codebook, dynamic_map
from .tensor import QuantizedTensor, quantize

__all__ = ["CODEBOOKS", "codebook", "dynamic_map", "QuantizedTensor", "quantize"]
