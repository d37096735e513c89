"""GGUF files (llama.cpp's format) in: converted once, with transformers, to a cached safetensors folder.

The folder is named by the file's path, size and modification time, written to a temporary name and renamed,
so a second process (or a second run) reuses it and an interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from ..atomic import writing_dir
from ..cache import cache_root
from ..errors import LowbitError

__all__ = ["gguf_to_folder"]


def gguf_to_folder(gguf: Path, name: str) -> Path:
    """The cached safetensors folder for ``gguf`` (converting it the first time)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key}"
    if (out / "config.json").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise LowbitError(f"{gguf}: reading GGUF needs the 'gguf' package (pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to safetensors once (cached in {out}) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds here
        first = str(e).splitlines()[0] if str(e) else ""
        raise LowbitError(f"{gguf}: could not read GGUF ({type(e).__name__}: {first})") from None
    if hasattr(model.config, "quantization_config"):  # the weights are plain floats now
        del model.config.quantization_config
    model.hf_quantizer = None
    with writing_dir(out, overwrite=True) as tmp:  # a concurrent conversion of the same file just wins the rename
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out
