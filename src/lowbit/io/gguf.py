"""GGUF files (llama.cpp's format) in: converted once, with transformers, to a cached safetensors folder.

The folder is named by the file's content (size and sampled bytes, not its path: the built-in model installed in
a fresh virtual environment reuses the conversion), written to a temporary name and renamed, so a second process
(or a second run) reuses it and an interrupted conversion leaves nothing behind.
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


def _content_key(path: Path, sample: int = 1 << 20) -> str:
    """A key for the file's content, not its place: size, first and last MiB and one from the middle (the same
    model installed in another virtual environment or clone reuses its conversion; reading it all would cost
    seconds for a multi-GB file)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for at in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
            f.seek(at)
            h.update(f.read(sample))
    return h.hexdigest()[:12]


def gguf_to_folder(gguf: Path, name: str) -> Path:
    """The cached safetensors folder for ``gguf`` (converting it the first time)."""
    key = _content_key(gguf)
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
