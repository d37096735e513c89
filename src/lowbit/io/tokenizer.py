"""The model's tokenizer (transformers'), with a pad token (the EOS token when the tokenizer names none), and what a
training config changes in it.

    chat_template         a named format, a Jinja template of your own, or the tokenizer's (data/chat_templates.py)
    special_tokens        {pad_token, bos_token, eos_token, unk_token}: a token the vocabulary has is only named;
                          a new one is added
    tokens                new tokens, added to the vocabulary
    eot_tokens            the tokens that end a turn: each must appear in the chat template; one the vocabulary
                          lacks is added (so it is one token, learned after every trained turn)

New tokens get new rows in the embeddings and the head (``training/model.py``), which train. The tokenizer is
saved with the adapter (``save_tokenizer``), so merge, generate, export and the Ollama Modelfile read the same
vocabulary and template; ``load_tokenizer(adapter_dir or model)`` prefers the adapter's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LowbitError
from .processor import PROCESSOR_FILE, load_processor
from .resolve import resolve_model

__all__ = ["load_tokenizer", "TOKENIZER_FILES", "prepare_tokenizer", "TokenizerChanges", "tokenizer_for",
           "end_token_ids"]

# any of these in a folder means it carries a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
SPECIAL_KEYS = ("pad_token", "bos_token", "eos_token", "unk_token")


def load_tokenizer(model: str | os.PathLike, required: bool = True):
    """The tokenizer of ``model`` (a built-in name, GGUF file or folder).

    ``required=False``: None for a folder with no tokenizer files at all (a broken one is still an error).
    A folder with an image processor (a vision-language model): its processor's tokenizer, the processor as
    ``tok.lowbit_processor`` (``io/processor.py``).
    """
    from transformers import AutoTokenizer

    folder = resolve_model(model) if not _has_tokenizer(model) else Path(model)
    if not required and not any((folder / f).exists() for f in TOKENIZER_FILES):
        return None
    if (folder / PROCESSOR_FILE).is_file():  # a vision-language model (or its adapter): the processor's tokenizer
        proc = load_processor(folder)
        tok = proc.tokenizer
        tok.lowbit_processor = proc
        if not getattr(tok, "chat_template", None):
            tok.chat_template = getattr(proc, "chat_template", None)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as e:
            raise LowbitError(f"{folder}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _has_tokenizer(folder) -> bool:
    """A folder holding tokenizer files but no model (an adapter saved with its run's tokenizer)."""
    p = Path(folder)
    return p.is_dir() and not (p / "config.json").exists() and any((p / f).exists() for f in TOKENIZER_FILES)


def tokenizer_for(model, adapter=None, required: bool = True):
    """The tokenizer an adapter was trained with (saved in its folder), else the model's."""
    if adapter is not None and _has_tokenizer(adapter):
        return load_tokenizer(adapter)
    return load_tokenizer(model, required=required)


def end_token_ids(tok, adapter=None) -> list[int]:
    """The tokens generation stops at: the EOS token, and the turn-ending tokens a run recorded beside its adapter
    (``generation_config.json``)."""
    ids = [tok.eos_token_id]
    gen = Path(adapter) / "generation_config.json" if adapter is not None else None
    if gen is not None and gen.is_file():
        from ..jsonfile import read_object

        eos = read_object(gen).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return [i for i in dict.fromkeys(ids) if isinstance(i, int)]


@dataclass
class TokenizerChanges:
    added: list[int] = field(default_factory=list)   # ids of new tokens (rows the model must grow and train)
    notes: list[str] = field(default_factory=list)   # what was changed, for the run's log
    eot_ids: list[int] = field(default_factory=list)  # the tokens that end a turn (generation stops there too)

    @property
    def changed(self) -> bool:
        return bool(self.notes)


def _single_id(tok, text: str) -> int | None:
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def prepare_tokenizer(tok, chat_template: str = "tokenizer_default", chat_template_jinja: str = "",
                      special_tokens: dict | None = None, tokens: list | None = None,
                      eot_tokens: list | None = None) -> TokenizerChanges:
    """Apply a config's tokenizer keys to ``tok`` in place (see the module docstring)."""
    from tokenizers import AddedToken

    from ..data.chat_templates import resolve_chat_template

    ch = TokenizerChanges()
    before = len(tok)
    template = resolve_chat_template(chat_template, chat_template_jinja, tok)
    if chat_template not in (None, "", "tokenizer_default") and template != getattr(tok, "chat_template", None):
        tok.chat_template = template
        ch.notes.append(f"chat template: {chat_template}")
    elif chat_template not in (None, "", "tokenizer_default", "jinja") and getattr(tok, "lowbit_processor", None):
        ch.notes.append(f"chat template: the model's own for {chat_template!r} (it places the images)")
    for key, value in (special_tokens or {}).items():
        if key not in SPECIAL_KEYS:
            raise LowbitError(f"special_tokens: unknown {key!r}; lowbit sets {', '.join(SPECIAL_KEYS)}")
        if not isinstance(value, str) or not value:
            raise LowbitError(f"special_tokens.{key}: expects a token, got {value!r}")
        if getattr(tok, key, None) == value:
            continue
        existing = _single_id(tok, value)
        tok.add_special_tokens({key: value if existing is not None else
                                AddedToken(value, rstrip=False, lstrip=False, normalized=False, special=True)})
        ch.notes.append(f"{key}: {value!r}" + ("" if existing is not None else " (new)"))
    new = [t for t in tokens or [] if _single_id(tok, t) is None]
    if tokens:
        tok.add_tokens([AddedToken(t, rstrip=False, lstrip=False, normalized=False) for t in new])
        ch.notes.append(f"tokens: {len(new)} new of {len(tokens)}")
    for t in eot_tokens or []:
        if not isinstance(t, str) or not t:
            raise LowbitError(f"eot_tokens: expects tokens, got {t!r}")
        if tok.chat_template and t not in tok.chat_template and t != tok.eos_token:
            raise LowbitError(f"eot_tokens: {t!r} does not appear in the chat template, so it never ends a turn "
                              "(choose the template's turn-ending token)")
        if _single_id(tok, t) is None:
            tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, rstrip=False, lstrip=False,
                                                                             normalized=False, special=True)]},
                                   replace_extra_special_tokens=False)
            ch.notes.append(f"eot token {t!r} (new)")
        ch.eot_ids.append(_single_id(tok, t))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ch.added = list(range(before, len(tok)))
    return ch
