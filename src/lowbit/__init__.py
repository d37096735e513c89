"""lowbit: QLoRA fine-tuning — NF4 storage, double quantization, paged optimizers, LoRA adapters."""

from .quant import QuantizedTensor, quantize

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "quantize", "__version__"]
