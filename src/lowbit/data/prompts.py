"""Prompt data for online training (``rl: grpo``): a record → the prompt's token ids, and its other columns for the
reward functions.

    {"prompt": "What is 2 + 3?", "answer": "5", …}                 text: tokenized as it is (TRL's standard form)
    {"prompt": [{"role": "user", "content": "…"}], "answer": …}    messages: the chat template with the generation
                                                                    prompt (TRL's conversational form)

``field`` names another prompt column. Every column (the prompt too, as given) is kept as JSON in ``columns``: each
reaches the reward functions as a keyword argument of that name. ``max_prompt_len`` keeps the prompt's last tokens;
a prompt that fills ``sequence_len`` is dropped (counted). Importing this module does not import torch.
"""

from __future__ import annotations

import json

from ..errors import LowbitError
from .preference import _template_kw
from .records import Record

__all__ = ["PROMPT_FORMAT", "prompt_row", "detect_prompt", "prompt_of"]

PROMPT_FORMAT = "prompt"


def detect_prompt(rec: Record) -> str:
    if "prompt" not in rec.data:
        raise LowbitError(f"{rec.where}: rl: grpo reads prompts: a 'prompt' field (text or chat messages) is "
                          f"missing (fields: {', '.join(sorted(map(str, rec.data))) or 'none'})")
    return PROMPT_FORMAT


def prompt_of(rec: Record, opts: dict):
    """The record's prompt: text, or a list of chat messages."""
    key = opts.get("field") or "prompt"
    if key not in rec.data:
        raise LowbitError(f"{rec.where}: field {key!r} (the prompt) is missing")
    p = rec.data[key]
    if isinstance(p, str) and p.strip():
        return p
    if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                                         isinstance(m.get("content"), str) for m in p):
        return [{"role": m["role"], "content": m["content"]} for m in p]
    raise LowbitError(f"{rec.where}: field {key!r} must be text or a list of {{role, content}} messages, got "
                      f"{type(p).__name__}")


def _ids(tok, rec: Record, prompt, opts: dict) -> list[int]:
    if isinstance(prompt, str):
        return list(tok(prompt, add_special_tokens=False)["input_ids"])
    system = opts.get("default_system_message")
    if system and not any(m["role"] == "system" for m in prompt):
        prompt = [{"role": "system", "content": system}, *prompt]
    kw = _template_kw(rec, "prompt", tok, opts)
    try:
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kw)
    except Exception as e:  # the template's own checks
        raise LowbitError(f"{rec.where}: the chat template refused this prompt "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prompt_row(rec: Record, tok, fmt: str, sequence_len: int, opts: dict) -> dict:
    """The columns of one record: prompt_ids, columns (JSON), length (0: dropped), truncated, why."""
    prompt = prompt_of(rec, opts)
    ids = _ids(tok, rec, prompt, opts)
    keep = opts.get("max_prompt_len") or 0
    cut = bool(keep and len(ids) > keep)
    if cut:
        ids = ids[-keep:]
    try:
        columns = json.dumps({**rec.data, "prompt": prompt}, ensure_ascii=False)
    except (TypeError, ValueError):
        raise LowbitError(f"{rec.where}: its fields must be JSON values (text, numbers, lists, mappings)") from None
    if len(ids) >= sequence_len:
        return {"prompt_ids": [], "columns": columns, "length": 0, "truncated": True,
                "why": f"the prompt fills sequence_len={sequence_len}"}
    return {"prompt_ids": ids, "columns": columns, "length": len(ids), "truncated": cut, "why": ""}
