"""Prompt data for online training (``rl: grpo``): a record → the prompt's token ids, and its other columns for the
reward functions.

    {"prompt": "What is 2 + 3?", "answer": "5", …}                 text: tokenized as it is (TRL's standard form)
    {"prompt": [{"role": "user", "content": "…"}], "answer": …}    messages: the chat template with the generation
                                                                    prompt (TRL's conversational form)

``field`` names another prompt column. Every column (the prompt too, as given) is kept as JSON in ``columns``: each
reaches the reward functions as a keyword argument of that name. ``max_prompt_len`` keeps the prompt's last tokens;
a prompt that fills ``sequence_len`` is dropped (counted).

Axolotl's custom transform (``type: rewards.prompt_transform``, a source of ``PYTHON_TYPE``): its loader is called
as Axolotl calls it, ``loader(cfg, dataset_idx=i)`` — ``cfg`` an Axolotl-style config whose keys all read None
here —, and returns ``transform`` or ``(transform, {"remove_columns": [...] | "__all__"})``; each record becomes
its columns less the removed ones, updated with ``transform(record)`` (``tokenizer=`` passed when it takes one).
Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import inspect
import json
import os

from ..errors import LowbitError
from .preference import _template_kw
from .python_funcs import load_function
from .records import Record
from .sources import PYTHON_TYPE

__all__ = ["PROMPT_FORMAT", "prompt_row", "detect_prompt", "prompt_of"]

PROMPT_FORMAT = "prompt"


def detect_prompt(rec: Record) -> str:
    """Every record of a GRPO source is a prompt record (``prompt_of`` names a missing field, with ``field``)."""
    return PROMPT_FORMAT


def prompt_of(rec: Record, opts: dict):
    """The record's prompt: text, or a list of chat messages."""
    key = opts.get("field") or "prompt"
    if key not in rec.data:
        raise LowbitError(f"{rec.where}: rl: grpo reads prompts: field {key!r} (text or chat messages) is missing "
                          f"(fields: {', '.join(sorted(map(str, rec.data))) or 'none'}; name another with field:)")
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


class _AxolotlConfig(dict):
    """What a transform's loader gets as ``cfg``: every key reads None (Axolotl's ``DictDefault``)."""

    def __getattr__(self, name):
        return self.get(name)


@functools.lru_cache(maxsize=16)
def _transform(name: str, dataset_idx: int, version: str):
    """(transform, columns to remove, whether it takes the tokenizer) of the loader ``name`` (``version``: its
    file's text, so an edited file is read again)."""
    what = f"datasets[{dataset_idx}].type"
    loader = load_function(name, what)
    try:
        got = loader(_AxolotlConfig(), dataset_idx=dataset_idx)
    except Exception as e:
        raise LowbitError(f"{what}: {name}(cfg, dataset_idx={dataset_idx}) failed: {type(e).__name__}: {e}") \
            from None
    fn, kw = got if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict) else (got, {})
    if not callable(fn):
        raise LowbitError(f"{what}: {name} must return a transform function (or (function, map options)), got "
                          f"{type(fn).__name__}")
    try:
        takes_tok = "tokenizer" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_tok = False
    return fn, kw.get("remove_columns") or [], takes_tok


def _version(name: str) -> str:
    """The size and modification time of the file a ``file.py:function`` name reads ("" for a module)."""
    path = name.rsplit(":", 1)[0] if ":" in name else None
    try:
        st = os.stat(path) if path else None
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}" if st else ""


def _transformed(rec: Record, tok, fmt: str, opts: dict) -> Record:
    name = fmt[len(PYTHON_TYPE):]
    fn, remove, takes_tok = _transform(name, int(opts.get("dataset_idx", 0)), _version(name))
    try:
        new = fn(dict(rec.data), **({"tokenizer": tok} if takes_tok else {}))
    except Exception as e:
        raise LowbitError(f"{rec.where}: the transform {fmt[len(PYTHON_TYPE):]} failed: {type(e).__name__}: {e}") \
            from None
    if not isinstance(new, dict):
        raise LowbitError(f"{rec.where}: the transform {fmt[len(PYTHON_TYPE):]} must return a mapping of columns, got "
                          f"{type(new).__name__}")
    kept = {} if remove == "__all__" else {k: v for k, v in rec.data.items() if k not in remove}
    return Record({**kept, **new}, rec.where)


def prompt_row(rec: Record, tok, fmt: str, sequence_len: int, opts: dict) -> dict:
    """The columns of one record: prompt_ids, columns (JSON), length (0: dropped), truncated, why."""
    if fmt.startswith(PYTHON_TYPE):
        rec = _transformed(rec, tok, fmt, opts)
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
