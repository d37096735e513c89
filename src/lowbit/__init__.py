"""lowbit: QLoRA fine-tuning — NF4 storage, double quantization, paged optimizers, LoRA adapters.

The public API (small and stable; each name is imported on first use, so ``import lowbit`` is instant)::

    quantize, QuantizedTensor, QuantSpec          the 4-bit storage (quant/)
    load, load_tokenizer                          a model quantized while it streams in (io/)
    add_lora, save_adapter, load_adapter, merge   LoRA adapters in the PEFT format (nn/, io/)
    generate                                      text from a (4-bit, adapted) model
    train, TrainConfig, train_loop                fine-tuning: one call from a config, or the loop itself
    plan                                          will a run fit? (no torch needed)
    LowbitError                                   the error every user-facing problem raises
"""

from ._lazy import exports

__version__ = "0.2.0"
__all__ = ["quantize", "QuantizedTensor", "QuantSpec", "load", "load_tokenizer", "add_lora", "save_adapter",
           "load_adapter", "merge", "generate", "train", "TrainConfig", "train_loop", "plan", "LowbitError",
           "__version__"]
__getattr__, __dir__ = exports(__name__, {
    "quantize": ".quant.tensor", "QuantizedTensor": ".quant.tensor", "QuantSpec": ".quant.spec",
    "load": ".io.loader", "load_tokenizer": ".io.tokenizer", "add_lora": ".nn.lora", "save_adapter": ".io.adapters",
    "load_adapter": ".io.adapters", "merge": ".io.merging", "generate": ".generation", "train": ".training.recipe",
    "TrainConfig": ".training.config", "train_loop": ".training.loop", "plan": ".planner.memory",
    "LowbitError": ".errors",
})
