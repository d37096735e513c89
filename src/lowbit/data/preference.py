"""Preference data: a record → prompt, chosen and rejected token ids (pairs), or prompt, completion and a label
(KTO's unpaired examples). ``PREFERENCE_FORMATS`` is the one table of their names.

    pairs        {"prompt", "chosen", "rejected"}       strings, or message lists (TRL's shapes); chosen / rejected
                                                         conversations that start with the user's turn carry their
                                                         prompt: all but their last message (a "prompt" field is
                                                         then not read)
    unpaired     {"prompt", "completion", "label"}      KTO's shape (label true: desirable)
    chat_template.default                               Axolotl's: field_messages (the prompt: messages or a
                                                         string), field_chosen / field_rejected (a message or a
                                                         string), message_property_mappings, roles
    chat_template.argilla, chat_template.argilla_chat   Axolotl's: chosen / rejected conversations (their shared
                                                         messages are the prompt; a "prompt" field is not read)
    chatml.X, llama3.X   X = intel, prompt_pairs, icr, argilla, argilla_chat, ultra (and for KTO the same names):
                         Axolotl's fixed layouts — system, a prompt (prompt / input / question / instruction), chosen /
                         rejected (or chosen_response / rejected_response, or conversations) — rendered with that
                         named chat template

Tokenized as TRL does: message lists are rendered with the chat template, the prompt with the generation prompt;
the completion is what the full conversation's tokens hold past their common prefix with the prompt's. Plain strings
are tokenized as they are, with the end-of-sequence token appended to each completion. ``max_prompt_len`` keeps the
prompt's last tokens; a prompt that fills ``sequence_len`` leaves nothing to compare and is dropped (counted);
``excess_length_strategy`` (truncate, drop, raise) and ``min_sample_len`` apply as to supervised samples.
Importing this module does not import torch.
"""

from __future__ import annotations

from ..errors import LowbitError
from .formats import _messages
from .records import Record

__all__ = ["PREFERENCE_FORMATS", "LAYOUTS", "is_preference_format", "detect_preference", "preference_row"]

PAIRED_FORMATS = ("pairs", "chat_template.default", "chat_template.argilla", "chat_template.argilla_chat")
UNPAIRED_FORMATS = ("unpaired",)
LAYOUTS = ("intel", "prompt_pairs", "icr", "argilla", "argilla_chat", "ultra")   # Axolotl's TEMPLATE.LAYOUT types
TEMPLATES = ("chatml", "llama3")
PREFERENCE_FORMATS = (*PAIRED_FORMATS, *UNPAIRED_FORMATS, *(f"{t}.{x}" for t in TEMPLATES for x in LAYOUTS))
PROMPT_KEYS = ("prompt", "input", "question", "instruction")


def is_preference_format(name: str) -> bool:
    return name in PREFERENCE_FORMATS


def detect_preference(rec: Record) -> str:
    if all(rec.data.get(k) is not None for k in ("chosen", "rejected")):
        return "pairs"
    if all(rec.data.get(k) is not None for k in ("prompt", "completion", "label")):
        return "unpaired"
    raise LowbitError(f"{rec.where}: not preference data: keys {sorted(rec.data)}; expected prompt + chosen + "
                      "rejected (pairs) or prompt + completion + label (KTO)")


def _get(rec: Record, key: str):
    v = rec.data.get(key)
    if v is None:
        raise LowbitError(f"{rec.where}: preference record is missing field {key!r}")
    return v


def _as_messages(rec: Record, value, key: str, role: str, opts: dict) -> list[dict]:
    """A string, one message, or a message list → messages (roles and property names mapped as in SFT data)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise LowbitError(f"{rec.where}: field {key!r} must be a string, a message or a non-empty list of messages")
    opts = {k: v for k, v in opts.items() if k != "default_system_message"}  # added once, to the prompt
    return _messages(Record({key: value}, rec.where), {**opts, "field_messages": key}, sharegpt=False)


def _text(rec: Record, key: str) -> str:
    v = _get(rec, key)
    if not isinstance(v, str):
        raise LowbitError(f"{rec.where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _layout(rec: Record, fmt: str) -> tuple[list[dict], list]:
    """Axolotl's TEMPLATE.LAYOUT records → (prompt messages, [[completion message], …])."""
    layout = fmt.split(".", 1)[1]
    d = rec.data
    answers = ["completion"] if "label" in d else [("chosen_response" if "chosen_response" in d else "chosen"),
                                                    ("rejected_response" if "rejected_response" in d else "rejected")]
    convs = [_get(rec, k) for k in answers]
    if layout == "argilla_chat" or all(isinstance(c, list) for c in convs):  # user + assistant conversations
        for k, c in zip(answers, convs):
            if not (isinstance(c, list) and len(c) >= 2 and all(isinstance(m, dict) and "content" in m for m in c)):
                raise LowbitError(f"{rec.where}: field {k!r} must be a conversation (user, then assistant)")
        prompt = str(convs[0][0]["content"]) if layout in ("argilla_chat", "ultra") and "prompt" not in d else \
            _text(rec, next((k for k in PROMPT_KEYS if k in d), "prompt"))
        answers = [[{"role": "assistant", "content": str(c[-1]["content"])}] for c in convs]
    else:
        prompt = _text(rec, next((k for k in PROMPT_KEYS if k in d), "prompt"))
        answers = [[{"role": "assistant", "content": _text(rec, k)}] for k in answers]
    system = [{"role": "system", "content": d["system"]}] if isinstance(d.get("system"), str) and d["system"] else []
    return [*system, {"role": "user", "content": prompt}], answers


def _conversation(rec: Record, fmt: str, opts: dict):
    """(prompt: messages or a string, [completions: messages or strings]) of a record."""
    d = rec.data
    if fmt.split(".")[0] in TEMPLATES:
        return _layout(rec, fmt)
    if fmt == "chat_template.default":
        prompt = _as_messages(rec, _get(rec, opts.get("field_messages", "messages")), opts.get("field_messages",
                              "messages"), "user", opts)
        return prompt, [_as_messages(rec, _get(rec, opts.get(f, k)), opts.get(f, k), "assistant", opts)
                        for f, k in (("field_chosen", "chosen"), ("field_rejected", "rejected"))]
    keys = ("completion",) if fmt == "unpaired" else (opts.get("field_chosen", "chosen"),
                                                      opts.get("field_rejected", "rejected"))
    values = [_get(rec, k) for k in keys]
    role = (opts.get("message_property_mappings") or {}).get("role", "role")
    whole = all(isinstance(v, list) and len(v) >= 2 and isinstance(v[0], dict) and
                v[0].get(role) not in ("assistant", "gpt") for v in values)  # carrying their prompt (ultrafeedback)
    if fmt in ("chat_template.argilla", "chat_template.argilla_chat") or (fmt == "pairs" and
                                                                         ("prompt" not in d or whole)):
        convs = [_as_messages(rec, v, k, "assistant", opts) for k, v in zip(keys, values)]
        if len(convs[0]) < 2 or convs[0][:-1] != convs[1][:-1]:
            raise LowbitError(f"{rec.where}: the chosen and rejected conversations must share every message but the "
                              "last (the prompt)")
        return convs[0][:-1], [c[-1:] for c in convs]
    prompt = _get(rec, "prompt")
    if isinstance(prompt, str) and all(isinstance(v, str) for v in values):
        return prompt, values
    return (_as_messages(rec, prompt, "prompt", "user", opts),
            [_as_messages(rec, v, k, "assistant", opts) for k, v in zip(keys, values)])


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _template_kw(rec: Record, fmt: str, tok, opts: dict) -> dict:
    from .chat_templates import resolve_chat_template

    kw = dict(opts.get("chat_template_kwargs") or {})
    name = fmt.split(".")[0] if fmt.split(".")[0] in TEMPLATES else opts.get("chat_template")
    if name:
        kw["chat_template"] = resolve_chat_template(name, opts.get("chat_template_jinja", ""), tok,
                                                    f"{rec.where}: chat_template")
    if not kw.get("chat_template") and not getattr(tok, "chat_template", None):
        raise LowbitError(f"{rec.where}: conversations need a tokenizer with a chat template (or chat_template: NAME)")
    return kw


def _ids(encoded) -> list[int]:
    """The token ids ``apply_chat_template(tokenize=True)`` returned (a list, or a mapping holding them)."""
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


def _tokenize(rec: Record, tok, prompt, completions: list, fmt: str, opts: dict) -> tuple[list[int], list[list[int]]]:
    if isinstance(prompt, str):
        eos = tok.eos_token or ""
        p = tok(prompt)["input_ids"]
        fulls = [tok(prompt + (c if c.endswith(eos) else c + eos))["input_ids"] for c in completions]
    else:
        kw = _template_kw(rec, fmt, tok, opts)
        system = opts.get("default_system_message")
        if system and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": system}, *prompt]
        try:
            p = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, **kw)
            fulls = [tok.apply_chat_template(prompt + c, tokenize=True, **kw) for c in completions]
        except Exception as e:  # the template's own checks (roles must alternate, …)
            raise LowbitError(f"{rec.where}: the chat template refused this conversation "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        p, fulls = _ids(p), [_ids(f) for f in fulls]
    cut = min(_common(p, f) for f in fulls)
    return p[:cut], [f[cut:] for f in fulls]


def preference_row(rec: Record, tok, fmt: str, sequence_len: int, opts: dict) -> dict:
    """The token columns of one record: prompt_ids, chosen_ids, rejected_ids (KTO: the completion in chosen_ids,
    rejected_ids empty), label, length (0: dropped), truncated, why."""
    prompt, completions = _conversation(rec, fmt, opts)
    p, outs = _tokenize(rec, tok, prompt, completions, fmt, opts)
    unpaired = len(outs) == 1
    label = True
    if unpaired:
        label = rec.data.get("label")
        if not isinstance(label, bool):
            raise LowbitError(f"{rec.where}: field 'label' must be true or false, got {label!r}")
    keep = opts.get("max_prompt_len") or 0
    cut = bool(keep and len(p) > keep)
    if cut:
        p = p[-keep:]
    dropped = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "label": label, "length": 0}
    if any(not o for o in outs):
        return {**dropped, "truncated": False, "why": "a completion is empty"}
    if len(p) >= sequence_len:
        return {**dropped, "truncated": True, "why": f"the prompt fills sequence_len={sequence_len}"}
    cut = cut or any(len(p) + len(o) > sequence_len for o in outs)
    if cut and opts.get("excess_length_strategy") == "raise":
        raise LowbitError(f"{rec.where}: longer than sequence_len={sequence_len} (excess_length_strategy: raise)")
    if cut and opts.get("excess_length_strategy") == "drop":
        return {**dropped, "truncated": False, "why": f"longer than sequence_len={sequence_len} "
                                                      "(excess_length_strategy: drop)"}
    if min(len(p) + len(o) for o in outs) < (opts.get("min_sample_len") or 0):
        return {**dropped, "truncated": False, "why": f"shorter than min_sample_len={opts['min_sample_len']} tokens"}
    rejected = [] if unpaired else outs[1]
    return {"prompt_ids": p, "chosen_ids": outs[0], "rejected_ids": rejected, "label": label,
            "length": min(sequence_len, len(p) + len(outs[0])) + (min(sequence_len, len(p) + len(rejected))
                                                                   if rejected else 0),
            "truncated": cut, "why": ""}
