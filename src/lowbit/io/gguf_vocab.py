"""A transformers tokenizer as GGUF metadata, so llama.cpp needs no other file.

    tokenizer.ggml.model        "gpt2" (byte-level BPE; the kind lowbit writes)
    tokenizer.ggml.pre          how llama.cpp pre-splits text, read from the tokenizer's own pre-tokenizer:
                                  ByteLevel (GPT-2 regex)                      → gpt-2
                                  Digits(individual) + ByteLevel               → smollm
                                  Split(Qwen2's regex) + ByteLevel             → qwen2
                                  Split(Llama 3's regex, digits in 1–3)        → llama-bpe
                                anything else → "default", with a warning (llama.cpp may split differently)
    tokenizer.ggml.tokens / token_type / merges, special token ids, add_bos / add_eos (what the tokenizer
                                adds around a text), the chat template

The vocabulary is padded to the model's embedding rows with unused ``[PAD{i}]`` tokens, as llama.cpp's converter
does. SentencePiece-style tokenizers (``tokenizer.model``, byte-fallback BPE) are refused in one line.
"""

from __future__ import annotations

import json
import warnings

from ..errors import LowbitError

__all__ = ["write_vocab", "pre_tokenizer_name"]

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def _parts(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a ``tokenizer.json`` (None: not one it has under a name)."""
    parts = _parts(spec.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None:
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" in regex:
            return "qwen2"
    return None


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def write_vocab(writer, tokenizer, vocab_size: int) -> str:
    """Write ``tokenizer`` (a transformers fast tokenizer) into ``writer``. Returns the pre-tokenizer name."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "byte-fallback BPE (SentencePiece)" if model.get("byte_fallback") else model.get("type")
        raise LowbitError(f"GGUF export writes byte-level BPE tokenizers (SmolLM, Qwen, Llama 3, GPT-2); this "
                          f"tokenizer is {kind}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise LowbitError(f"the tokenizer has ids up to {max(vocab.values())}, the model only {vocab_size} "
                          "embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        a = added.get(i)
        types.append(gguf.TokenType.NORMAL if a is None else
                     gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    pre = pre_tokenizer_name(spec)
    if pre is None:
        warnings.warn("GGUF export: this tokenizer's pre-tokenizer has no llama.cpp name; writing 'default', "
                      "so llama.cpp may split text differently from transformers", stacklevel=2)
        pre = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(model))
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{kind}_token_id")(tid)
    probe = tokenizer("a").input_ids  # what the tokenizer adds around text on its own
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return pre
