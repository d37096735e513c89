"""Data formats: a record → token ids + loss labels. ``FORMATS`` is the one table of format names.

    chat          {"messages": [{"role": ..., "content": ...}]}   rendered with the tokenizer's chat template;
                                                                  assistant turns learned, the rest masked
    sharegpt      {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}   as chat
    completions   {"prompt": ..., "completion": ...}              prompt masked, completion learned
    alpaca        {"instruction": ..., "input": ..., "output": ...}  Alpaca prompt masked, output learned
    input_output  {"segments": [{"text": ..., "label": bool}]}    (Axolotl's template-free format) or
                  {"input": ..., "output": ...}                   text pieces as they are; label true learned
    text          {"text": ...}                                   every token is learned

Column names and roles can be mapped per data source (``data/sources.py``): ``field_messages``,
``message_property_mappings`` ({role: from, content: value}), ``roles`` ({user: [human], ...}),
``roles_to_train``, ``field`` (text), ``field_instruction`` / ``field_input`` / ``field_output``.

A record's format is detected from its keys (``auto``) or named. ``train_on_inputs=True`` learns the masked
parts too. The end-of-sequence token is appended (when the rendering does not already end with it) and
learned. Labels use -100 (``IGNORE``) for "not learned". Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError
from .images import content_parts, data_dir, image_column, image_token_id, piece_ids, processor_of
from .records import Record

__all__ = ["FORMATS", "IGNORE", "detect_format", "check_format", "tokenize_records", "tokenize_record", "Tokenized"]

IGNORE = -100
IMAGES = "lowbit_images"  # a message's images (parts mode), beside its content until the turn is tokenized
ALPACA = ("Below is an instruction that describes a task{x}. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
# ShareGPT's speaker names → chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool"}


def _str(rec: Record, fmt: str, key: str, optional: bool = False) -> str:
    value = rec.data.get(key)
    if value is None:
        if optional:
            return ""
        raise LowbitError(f"{rec.where}: {fmt} record is missing field {key!r}")
    if not isinstance(value, str):
        raise LowbitError(f"{rec.where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _text(rec: Record, tok, opts: dict) -> list[tuple[str, bool]]:
    return [(_str(rec, "text", opts.get("field", "text")), True)]


def _completions(rec: Record, tok, opts: dict) -> list[tuple[str, bool]]:
    return [(_str(rec, "completions", "prompt"), False), (_str(rec, "completions", "completion"), True)]


def _alpaca(rec: Record, tok, opts: dict) -> list[tuple[str, bool]]:
    instruction = _str(rec, "alpaca", opts.get("field_instruction", "instruction"))
    inp = _str(rec, "alpaca", opts.get("field_input", "input"), optional=True)
    output = _str(rec, "alpaca", opts.get("field_output", "output"))
    prompt = ALPACA.format(x=", paired with an input that provides further context" if inp else "",
                           instruction=instruction, input=f"### Input:\n{inp}\n\n" if inp else "")
    return [(prompt, False), (output, True)]


def _input_output(rec: Record, tok, opts: dict) -> list[tuple[str, bool]]:
    segs = rec.data.get("segments")
    if segs is None:
        return [(_str(rec, "input_output", "input"), False), (_str(rec, "input_output", "output"), True)]
    if not isinstance(segs, list) or not segs:
        raise LowbitError(f"{rec.where}: 'segments' must be a non-empty list")
    out = []
    for i, seg in enumerate(segs):
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str) or \
                not isinstance(seg.get("label", True), bool):
            raise LowbitError(f"{rec.where}: segments[{i}] needs a string 'text' and a true/false 'label'")
        out.append((seg["text"], seg.get("label", True) is not False))
    return out


def _messages(rec: Record, opts: dict, sharegpt: bool, parts: bool = False) -> list[dict]:
    """The record's conversation as [{"role", "content"}], column names and roles mapped. ``parts`` (a
    vision-language model): content as a list of text and image parts, the images under ``IMAGES``."""
    key = opts.get("field_messages", "conversations" if sharegpt else "messages")
    mapping = opts.get("message_property_mappings") or {}
    role_key = mapping.get("role", opts.get("message_field_role", "from" if sharegpt else "role"))
    content_key = mapping.get("content", opts.get("message_field_content", "value" if sharegpt else "content"))
    roles = {src: dst for dst, srcs in (opts.get("roles") or {}).items()
             for src in ([srcs] if isinstance(srcs, str) else srcs)}
    msgs = rec.data.get(key)
    if msgs is None:
        raise LowbitError(f"{rec.where}: {'sharegpt' if sharegpt else 'chat'} record is missing field {key!r}")
    if not isinstance(msgs, list) or not msgs:
        raise LowbitError(f"{rec.where}: {key!r} must be a non-empty list")
    thinking, think_key = opts.get("field_thinking"), opts.get("template_thinking_key") or "reasoning_content"
    out = []
    column = image_column(rec)
    if column and not parts:
        raise LowbitError(f"{rec.where}: this record has images, and the model is not a vision-language model (no "
                          "image processor beside its tokenizer)")
    pending = iter(column)
    for i, m in enumerate(msgs):
        content = m.get(content_key) if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or \
                not (isinstance(content, str) or (parts and isinstance(content, list))):
            raise LowbitError(f"{rec.where}: {key}[{i}] needs string fields {role_key!r} and {content_key!r}"
                              f"{' (or a list of text and image parts)' if parts else ''}")
        role = m[role_key]
        # Axolotl's default speaker names (human → user, gpt → assistant) unless the entry maps roles itself
        role = roles.get(role, role) if roles else SHAREGPT_ROLES.get(role, None if sharegpt else role)
        if role is None:
            raise LowbitError(f"{rec.where}: {key}[{i}].{role_key}: unknown speaker {m[role_key]!r} (expected "
                              f"{', '.join(SHAREGPT_ROLES)}; map others with 'roles')")
        if role == "system" and opts.get("drop_system_message"):
            continue
        msg = {"role": role, "content": content}
        if parts:  # a vision-language model's template reads content as parts; images travel beside them
            text_part = [{"type": "text", "text": content}] if isinstance(content, str) else None
            msg["content"], msg[IMAGES] = (text_part, []) if text_part else \
                content_parts(content, f"{rec.where}: {key}[{i}]", data_dir(rec), pending)
        if thinking and isinstance(m.get(thinking), str):
            msg[think_key] = m[thinking]
        out.append(msg)
    if column:
        _place_column_images(rec, out, column, pending)
    system = opts.get("default_system_message")
    if system and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": [{"type": "text", "text": system}] if parts else system})
    return out


def _place_column_images(rec: Record, msgs: list[dict], column: list, pending) -> None:
    """The ``images`` column's images that no image part took: all of them first in the first user turn when the
    messages have no image parts (Axolotl's rule); else a count that does not match, refused."""
    used = sum(len(m.get(IMAGES) or []) for m in msgs)
    left = list(pending)
    if not left:
        return
    if used:
        raise LowbitError(f"{rec.where}: {len(left)} of the {len(column)} images in 'images' have no image part "
                          "in the messages to go to")
    user = next((m for m in msgs if m["role"] == "user"), None)
    if user is None:
        raise LowbitError(f"{rec.where}: the record has images but no user turn to show them in")
    _, refs = content_parts([{"type": "image"} for _ in left], f"{rec.where}: images", data_dir(rec), iter(left))
    user["content"] = [{"type": "image"} for _ in refs] + user["content"]
    user[IMAGES] = refs


def _chat(rec: Record, tok, opts: dict, sharegpt: bool = False) -> list[tuple[str, bool, list[str]]]:
    """The conversation rendered turn by turn; each turn of a trained role (assistant unless ``roles_to_train``
    says otherwise), after its generation prompt, is learned. Each piece carries the images of its turn."""
    msgs = _messages(rec, opts, sharegpt, parts=processor_of(tok) is not None)
    trained = set(opts.get("roles_to_train") or ["assistant"])
    kw = dict(opts.get("chat_template_kwargs") or {})
    if opts.get("chat_template"):  # this entry's own template (Axolotl's per-dataset chat_template)
        from .chat_templates import resolve_chat_template

        kw["chat_template"] = resolve_chat_template(opts["chat_template"], opts.get("chat_template_jinja", ""), tok,
                                                    f"{rec.where}: chat_template")
    if not kw.get("chat_template") and not getattr(tok, "chat_template", None):
        raise LowbitError(f"{rec.where}: chat data needs a tokenizer with a chat template (or chat_template: NAME)")
    pieces, prev = [], ""
    try:
        for i, m in enumerate(msgs):
            full = tok.apply_chat_template(msgs[: i + 1], tokenize=False, **kw)
            if not full.startswith(prev):
                raise LowbitError(f"{rec.where}: the chat template does not render messages incrementally")
            start = len(prev)
            if m["role"] == "assistant" and m["role"] in trained and i:
                # what the generation prompt shares with the rendered answer is prompt, not learned (a template may
                # render an answer differently from its generation prompt: Qwen3's thinking blocks)
                head = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True, **kw)
                cut = next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
                if cut > start:
                    pieces.append((full[start:cut], False, []))
                    start = cut
            images = m.pop(IMAGES, None) or []
            if images and m["role"] in trained:
                raise LowbitError(f"{rec.where}: an image in a {m['role']} turn, which is learned; images go in the "
                                  "turns the model reads (user)")
            pieces.append((full[start:], m["role"] in trained, images))
            prev = full
    except LowbitError:
        raise
    except Exception as e:  # the template's own checks (jinja raise_exception: roles must alternate, …)
        raise LowbitError(f"{rec.where}: the chat template refused this conversation ({str(e).splitlines()[0]})"
                          ) from None
    return pieces


def _sharegpt(rec: Record, tok, opts: dict) -> list[tuple[str, bool, list[str]]]:
    return _chat(rec, tok, opts, sharegpt=True)


# name → (key sets that identify it — any one will do —, record → [(text, learned), ...]); detection tries them
# in this order
FORMATS = {
    "chat": ((("messages",),), _chat),
    "sharegpt": ((("conversations",),), _sharegpt),
    "completions": ((("prompt", "completion"),), _completions),
    "alpaca": ((("instruction", "output"),), _alpaca),
    "input_output": ((("segments",), ("input", "output")), _input_output),
    "text": ((("text",),), _text),
}


def detect_format(rec: Record) -> str:
    for name, (alternatives, _) in FORMATS.items():
        if any(all(rec.data.get(k) is not None for k in keys) for keys in alternatives):
            return name
    expected = " / ".join("+".join(keys) for alternatives, _ in FORMATS.values() for keys in alternatives)
    raise LowbitError(f"{rec.where}: cannot tell the format from keys {sorted(rec.data)}; expected one of {expected}")


@dataclass
class Tokenized:
    samples: list[tuple[list[int], list[int]]]   # (input_ids, labels)
    truncated: int
    dropped: int
    fmt: str


def tokenize_record(rec: Record, tok, fmt: str, sequence_len: int, train_on_inputs: bool = False,
                    opts: dict | None = None) -> tuple[list[int], list[int], list[str], bool, str | None]:
    """(input_ids, labels, images, truncated, why dropped) of one record in format ``fmt``; a dropped record (nothing
    left to learn, or images cut off) has empty ids and the reason. ``images``: the record's images in order, as
    ``data/images.py`` writes them (chat data for a vision-language model)."""
    opts = opts or {}
    ids, labels, images = [], [], []
    for text, learned, *pictures in FORMATS[fmt][1](rec, tok, opts):  # chat pieces carry their turn's images
        pictures = pictures[0] if pictures else []
        piece = piece_ids(tok, text, pictures, rec.where)
        images += pictures
        ids += piece
        labels += piece if (learned or train_on_inputs) else [IGNORE] * len(piece)
    if fmt == "text" and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
        ids, labels = [tok.bos_token_id, *ids], [IGNORE, *labels]
    eos = tok.eos_token_id
    if eos is not None and eos not in ids[-2:]:  # a chat template already ends turns with EOS (+ newline)
        ids.append(eos)
        labels.append(eos)
    learnable = any(x != IGNORE for x in labels[1:])
    truncated = len(ids) > sequence_len
    if truncated and opts.get("excess_length_strategy") == "raise":
        raise LowbitError(f"{rec.where}: {len(ids)} tokens, longer than sequence_len={sequence_len} "
                          "(excess_length_strategy: raise)")
    if truncated and opts.get("excess_length_strategy") == "drop":
        return [], [], [], False, f"longer than sequence_len={sequence_len} (excess_length_strategy: drop)"
    if len(ids) < (opts.get("min_sample_len") or 0):
        return [], [], [], False, f"shorter than min_sample_len={opts['min_sample_len']} tokens"
    if truncated and images and ids[sequence_len:].count(image_token_id(processor_of(tok))):
        return [], [], [], False, f"its image tokens go past sequence_len={sequence_len}"
    ids, labels = ids[:sequence_len], labels[:sequence_len]
    if all(x == IGNORE for x in labels[1:]):
        return [], [], [], truncated, (f"is sequence_len={sequence_len} shorter than the prompts? this prompt fills it"
                                       if learnable else "it has nothing to learn (no assistant turn, or an empty "
                                       "answer)")
    return ids, labels, images, truncated, None


def check_format(fmt: str) -> None:
    if fmt != "auto" and fmt not in FORMATS:
        raise LowbitError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")


def tokenize_records(records: list[Record], tok, fmt: str = "auto", sequence_len: int = 512,
                     train_on_inputs: bool = False, opts: dict | None = None) -> Tokenized:
    """Every record tokenized (in memory: for small data, evaluation files and tests; training reads through
    ``data/table.py``)."""
    check_format(fmt)
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    samples, truncated, dropped, why = [], 0, 0, None
    for rec in records:
        ids, labels, _, cut, reason = tokenize_record(rec, tok, fmt, sequence_len, train_on_inputs, opts)
        truncated += cut
        if reason:
            dropped += 1
            why = why or (rec.where, reason)
            continue
        samples.append((ids, labels))
    if not samples:
        raise LowbitError(f"{why[0]}: no usable samples in all {len(records)} records; this one: {why[1]}")
    return Tokenized(samples, truncated, dropped, fmt)
