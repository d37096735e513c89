"""A transformers tokenizer as GGUF metadata, so llama.cpp needs no other file.

    tokenizer.ggml.model        "gpt2" for byte-level BPE (SmolLM, Qwen, Llama 3, GPT-2), with its merges;
                                "llama" for SentencePiece-style byte-fallback BPE (LLaMA 2, Mistral, TinyLlama):
                                  scores = −(rank of the merge that makes the token), so llama.cpp's
                                  highest-score-first merging is transformers' lowest-rank-first BPE; <0xXX> BYTE
                                  tokens; add_space_prefix from the "▁" prepend
    tokenizer.ggml.pre          how llama.cpp pre-splits text, read from the tokenizer's own pre-tokenizer:
                                  ByteLevel (GPT-2 regex)                      → gpt-2
                                  Digits(individual) + ByteLevel               → smollm
                                  Split(Qwen2's regex) + ByteLevel             → qwen2
                                  Split(Llama 3's regex, digits in 1–3)        → llama-bpe
                                anything else → "default", with a warning (llama.cpp may split differently)
    tokenizer.ggml.tokens / token_type / merges, special token ids, add_bos / add_eos (what the tokenizer
                                adds around a text), the chat template

The vocabulary is padded to the model's embedding rows with unused ``[PAD{i}]`` tokens, as llama.cpp's converter
does. Other tokenizer models (Unigram, WordPiece) are refused in one line.
"""

from __future__ import annotations

import json
import re
import warnings

from ..errors import LowbitError

__all__ = ["write_vocab", "check_vocab", "pre_tokenizer_name"]

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


_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _prepends_space(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Prepend normalizer, or a Metaspace pre-tokenizer that
    prepends)."""
    norm = spec.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               for p in _parts(spec.get("pre_tokenizer")))


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _write_spm(writer, tokens: list[str], types: list, model: dict, spec: dict) -> str:
    """SentencePiece-style: tokens, scores (−merge rank), types, the "▁" prefix."""
    rank = {}
    for r, m in enumerate(_merges(model)):
        rank.setdefault(m.replace(" ", ""), r)  # the first merge that makes a token ranks it
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(rank[t]) if t in rank else 0.0 for t in tokens])
    writer.add_token_types(types)
    writer.add_add_space_prefix(_prepends_space(spec))
    return "default"


def _write_bpe(writer, tokens: list[str], types: list, model: dict, spec: dict) -> str:
    """Byte-level BPE: tokens, types, merges and llama.cpp's pre-tokenizer name."""
    pre = pre_tokenizer_name(spec)
    if pre is None:
        warnings.warn("GGUF export: this tokenizer's pre-tokenizer has no llama.cpp name; writing 'default', "
                      "so llama.cpp may split text differently from transformers", stacklevel=3)
        pre = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(model))
    return pre


def check_vocab(tokenizer) -> dict:
    """The tokenizer's ``tokenizer.json`` spec, or a one-line refusal if llama.cpp could not tokenize like it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    kind = (spec.get("model") or {}).get("type")
    if kind != "BPE":
        raise LowbitError(f"GGUF export writes BPE tokenizers (byte-level or SentencePiece-style); this tokenizer "
                          f"is {kind}")
    return spec


def write_vocab(writer, tokenizer, vocab_size: int) -> str:
    """Write ``tokenizer`` (a transformers fast tokenizer) into ``writer``. Returns the pre-tokenizer name."""
    import gguf

    spec = check_vocab(tokenizer)
    model = spec["model"]
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise LowbitError(f"the tokenizer has ids up to {max(vocab.values())}, the model only {vocab_size} "
                          "embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    spm = bool(model.get("byte_fallback"))
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        a = added.get(i)
        types.append(gguf.TokenType.BYTE if spm and _BYTE.fullmatch(by_id[i]) else
                     gguf.TokenType.UNKNOWN if spm and by_id[i] == model.get("unk_token") else
                     gguf.TokenType.NORMAL if a is None else
                     gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    pre = _write_spm(writer, tokens, types, model, spec) if spm else _write_bpe(writer, tokens, types, model, spec)
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
