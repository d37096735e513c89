"""The model's tokenizer (transformers'), with a pad token: the EOS token when the tokenizer names none."""

from __future__ import annotations

import os

from ..errors import LowbitError
from .resolve import resolve_model

__all__ = ["load_tokenizer", "TOKENIZER_FILES"]

# any of these in a folder means it carries a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(model: str | os.PathLike, required: bool = True):
    """The tokenizer of ``model`` (a built-in name, GGUF file or folder).

    ``required=False``: None for a folder with no tokenizer files at all (a broken one is still an error).
    """
    from transformers import AutoTokenizer

    folder = resolve_model(model)
    if not required and not any((folder / f).exists() for f in TOKENIZER_FILES):
        return None
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise LowbitError(f"{folder}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
