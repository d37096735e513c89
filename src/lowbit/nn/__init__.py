"""Neural-network pieces: the frozen 4-bit linear layer, LoRA, leaner fused blocks, the chunked loss."""

from .._lazy import exports

__all__ = ["Linear4bit", "LoRALinear", "add_lora"]
__getattr__, __dir__ = exports(__name__, {"Linear4bit": ".linear", "LoRALinear": ".lora", "add_lora": ".lora"})
