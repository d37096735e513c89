"""Models in and out: safetensors and GGUF readers, quantize-on-load, PEFT adapters, merges and 4-bit exports."""

from .._lazy import exports

__all__ = ["load", "BaseInfo", "base_info", "SourceWeights", "load_tokenizer", "resolve_model", "BUILTIN_MODELS",
           "save_adapter", "load_adapter", "read_adapter", "save_quantized", "merge", "merge_report",
           "dequantize_model", "export_gguf"]
__getattr__, __dir__ = exports(__name__, {
    "load": ".loader", "BaseInfo": ".loader", "base_info": ".loader", "SourceWeights": ".loader",
    "load_tokenizer": ".tokenizer", "resolve_model": ".resolve", "BUILTIN_MODELS": ".resolve",
    "save_adapter": ".adapters", "load_adapter": ".adapters", "read_adapter": ".adapters",
    "save_quantized": ".export", "merge": ".merging", "merge_report": ".merging", "dequantize_model": ".merging",
    "export_gguf": ".gguf_export",
})
