"""Data formats: a record → token ids + loss labels. ``FORMATS`` is the one table of format names.

    text         {"text": ...}                                   every token is learned
    completions  {"prompt": ..., "completion": ...}              prompt masked, completion learned
    chat         {"messages": [{"role": ..., "content": ...}]}   rendered with the tokenizer's chat template;
                                                                 assistant turns learned, the rest masked
    alpaca       {"instruction": ..., "input": ..., "output": ...}  Alpaca prompt masked, output learned

A record's format is detected from its keys (``auto``) or named. ``train_on_inputs=True`` learns the masked
parts too. The end-of-sequence token is appended (when the rendering does not already end with it) and
learned. Labels use -100 (``IGNORE``) for "not learned". Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError
from .records import Record

__all__ = ["FORMATS", "IGNORE", "detect_format", "tokenize_records", "Tokenized"]

IGNORE = -100
ALPACA = ("Below is an instruction that describes a task{x}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


def _need(rec: Record, fmt: str, *keys: str):
    for k in keys:
        if k not in rec.data:
            raise LowbitError(f"{rec.where}: {fmt} record is missing field {k!r}")
        if not isinstance(rec.data[k], str) and k != "messages":
            raise LowbitError(f"{rec.where}: field {k!r} must be a string")


def _text(rec: Record, tok) -> list[tuple[str, bool]]:
    _need(rec, "text", "text")
    return [(rec.data["text"], True)]


def _completions(rec: Record, tok) -> list[tuple[str, bool]]:
    _need(rec, "completions", "prompt", "completion")
    return [(rec.data["prompt"], False), (rec.data["completion"], True)]


def _alpaca(rec: Record, tok) -> list[tuple[str, bool]]:
    d = rec.data
    _need(rec, "alpaca", "instruction", "output")
    inp = d.get("input") or ""
    if not isinstance(inp, str):
        raise LowbitError(f"{rec.where}: field 'input' must be a string")
    prompt = ALPACA.format(x=", paired with an input that provides further context" if inp else "",
                           instruction=d["instruction"], input=f"### Input:\n{inp}\n\n" if inp else "")
    return [(prompt, False), (d["output"], True)]


def _chat(rec: Record, tok) -> list[tuple[str, bool]]:
    """The conversation rendered turn by turn; each assistant turn (after its generation prompt) is learned."""
    _need(rec, "chat", "messages")
    msgs = rec.data["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LowbitError(f"{rec.where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LowbitError(f"{rec.where}: messages[{i}] needs string fields 'role' and 'content'")
    if not getattr(tok, "chat_template", None):
        raise LowbitError(f"{rec.where}: chat data needs a tokenizer with a chat template")
    pieces, prev = [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            if head.startswith(prev):
                pieces.append((head[len(prev):], False))
                prev = head
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not full.startswith(prev):
            raise LowbitError(f"{rec.where}: the chat template does not render messages incrementally")
        pieces.append((full[len(prev):], m["role"] == "assistant"))
        prev = full
    return pieces


# name → (the keys that identify it, record → [(text, learned), ...]); detection tries them in this order
FORMATS = {
    "chat": (("messages",), _chat),
    "completions": (("prompt", "completion"), _completions),
    "alpaca": (("instruction", "output"), _alpaca),
    "text": (("text",), _text),
}


def detect_format(rec: Record) -> str:
    for name, (keys, _) in FORMATS.items():
        if all(k in rec.data for k in keys):
            return name
    expected = " / ".join("+".join(keys) for keys, _ in FORMATS.values())
    raise LowbitError(f"{rec.where}: cannot tell the format from keys {sorted(rec.data)}; expected one of {expected}")


@dataclass
class Tokenized:
    samples: list[tuple[list[int], list[int]]]   # (input_ids, labels)
    truncated: int
    dropped: int
    fmt: str


def tokenize_records(records: list[Record], tok, fmt: str = "auto", sequence_len: int = 512,
                     train_on_inputs: bool = False) -> Tokenized:
    if fmt != "auto" and fmt not in FORMATS:
        raise LowbitError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    segments = FORMATS[fmt][1]
    eos = tok.eos_token_id
    samples, truncated, dropped, why = [], 0, 0, None
    for rec in records:
        ids, labels = [], []
        for text, learned in segments(rec, tok):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if (learned or train_on_inputs) else [IGNORE] * len(piece)
        if fmt == "text" and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            ids, labels = [tok.bos_token_id, *ids], [IGNORE, *labels]
        if eos is not None and eos not in ids[-2:]:  # a chat template already ends turns with EOS (+ newline)
            ids.append(eos)
            labels.append(eos)
        learnable = any(x != IGNORE for x in labels[1:])
        if len(ids) > sequence_len:
            ids, labels = ids[:sequence_len], labels[:sequence_len]
            truncated += 1
        if all(x == IGNORE for x in labels[1:]):
            dropped += 1
            why = why or (rec.where, f"is sequence_len={sequence_len} shorter than the prompts? this prompt "
                          "fills it" if learnable else
                          "it has nothing to learn (no assistant turn, or an empty answer)")
            continue
        samples.append((ids, labels))
    if not samples:
        raise LowbitError(f"{why[0]}: no usable samples in all {len(records)} records; this one: {why[1]}")
    return Tokenized(samples, truncated, dropped, fmt)
