"""What ``datasets:`` names: a built-in name, a file or folder, or Axolotl's list of ``{path, type, …}`` entries —
each entry read and formatted on its own, then mixed.

    datasets: chatterbot                       # a built-in, a .jsonl/.json/.parquet/.csv file, or a folder
    datasets:
      - path: data/train.jsonl
        type: chat_template                    # Axolotl's names, or lowbit's (data/formats.py)
        field_messages: conversations
        message_property_mappings: {role: from, content: value}
      - path: more.parquet
        type: alpaca
        weight: 0.5                            # lowbit's: take half of it (2.0: twice), after the split
        limit: 1000                            # lowbit's: at most this many training records

``TYPE_ALIASES`` maps Axolotl's type names onto ``FORMATS``. Importing this module does not import torch.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from ..errors import LowbitError
from .chat_templates import check_chat_template
from .formats import FORMATS
from .preference import PREFERENCE_FORMATS
from .python_funcs import is_function_name

__all__ = ["DataSource", "parse_sources", "TYPE_ALIASES", "SOURCE_KEYS", "PYTHON_TYPE"]

# Axolotl's dataset ``type`` names that are not lowbit's own format names (data/formats.py FORMATS) → lowbit's
TYPE_ALIASES = {"chat_template": "chat", "completion": "text", "pretrain": "text"}

# the keys an entry may have: Axolotl's (the ones that change what is read) and lowbit's weight / limit
SOURCE_KEYS = ("path", "type", "split", "ds_type", "data_files", "field", "field_messages",
               "message_property_mappings", "message_field_role", "message_field_content", "roles",
               "roles_to_train", "field_instruction", "field_input", "field_output", "weight", "limit",
               "chat_template", "chat_template_jinja", "conversation", "train_on_eos", "train_on_eot",
               "field_thinking", "template_thinking_key", "drop_system_message", "field_chosen", "field_rejected")
READER_NAMES = ("json", "parquet", "csv")  # the datasets library's file readers (ds_type)
# the keys formats.py reads (column names and role mappings)
FIELD_KEYS = ("field", "field_messages", "message_property_mappings", "message_field_role", "message_field_content",
              "roles", "roles_to_train", "field_instruction", "field_input", "field_output", "chat_template",
              "chat_template_jinja", "field_thinking", "template_thinking_key", "drop_system_message", "field_chosen",
              "field_rejected")
# a source whose type is the user's own transform (``type: rewards.prompt_transform``, rl: grpo): "python:" + its name
PYTHON_TYPE = "python:"
# Axolotl's split names → the part of a folder lowbit reads; a slice follows HF datasets' syntax: train[:10%]
SPLIT_NAMES = ("train", "valid", "validation", "test")


@dataclass(frozen=True)
class DataSource:
    path: str
    fmt: str = "auto"               # a FORMATS name or "auto"
    split: str | None = None        # a folder's train / valid file
    ds_type: str | None = None      # force the reader: json | parquet | csv
    fields: dict = field(default_factory=dict)   # column and role mappings (formats.py reads them)
    weight: float = 1.0
    limit: int | None = None
    label: str = ""                 # how error messages name this entry ("datasets[1]")

    @property
    def key(self) -> tuple:
        """What the tokenized result depends on (for the tokenization cache)."""
        return self.path, self.fmt, self.ds_type, self.split, sorted((k, repr(v)) for k, v in self.fields.items())


def _format_name(value, where: str, custom: bool = False) -> str:
    if value in FORMATS or value in PREFERENCE_FORMATS or value == "auto":
        return value
    if value in TYPE_ALIASES:
        return TYPE_ALIASES[value]
    if custom and is_function_name(value):
        return PYTHON_TYPE + value
    names = sorted({*FORMATS, *TYPE_ALIASES, *PREFERENCE_FORMATS})
    near = difflib.get_close_matches(str(value), names, n=1)
    raise LowbitError(f"{where}.type: unknown {value!r}; choose one of {', '.join(names)}"
                      + (f" — did you mean {near[0]!r}?" if near else ""))


def _entry(d: dict, where: str, default_fmt: str, custom: bool = False, index: int = 0) -> DataSource:
    for k in d:
        if k not in SOURCE_KEYS:
            near = difflib.get_close_matches(str(k), SOURCE_KEYS, n=1)
            raise LowbitError(f"{where}: unknown key {k!r}" + (f" — did you mean {near[0]!r}?" if near else
                                                               f"; an entry takes {', '.join(SOURCE_KEYS)}"))
    path, files, ds_type = d.get("path"), d.get("data_files"), d.get("ds_type")
    if isinstance(files, list):
        if len(files) != 1:
            raise LowbitError(f"{where}.data_files: one file per entry here; give each file its own entry")
        files = files[0]
    if path in READER_NAMES and files:  # Axolotl's "path: json, data_files: file.jsonl"
        path, ds_type = files, ds_type or path
    path = path or files
    if not isinstance(path, str) or not path:
        raise LowbitError(f"{where}.path: a file, folder or built-in name is needed")
    for k in ("train_on_eos", "train_on_eot"):
        if d.get(k) not in ("turn", None):
            raise LowbitError(f"{where}.{k}: lowbit learns each trained turn's end-of-turn token (turn); "
                              f"{d[k]!r} is not supported")
    fields = {k: d[k] for k in FIELD_KEYS if k in d and d[k] is not None}
    if d.get("conversation") is not None:  # older Axolotl's name for the entry's chat format
        fields.setdefault("chat_template", d["conversation"])
    if isinstance(fields.get("chat_template"), str):
        try:
            check_chat_template(fields["chat_template"], fields.get("chat_template_jinja", ""))
        except LowbitError as e:
            raise LowbitError(f"{where}.{e!s}") from None
    if fields.get("chat_template") in ("tokenizer_default",):
        del fields["chat_template"]
    for k in ("field", "field_messages", "message_field_role", "message_field_content", "field_instruction",
              "field_input", "field_output", "chat_template", "chat_template_jinja", "field_thinking",
              "template_thinking_key", "field_chosen", "field_rejected"):
        if k in fields and not isinstance(fields[k], str):
            raise LowbitError(f"{where}.{k}: expects a column name, got {fields[k]!r}")
    for k in ("message_property_mappings", "roles"):
        if k in fields and not isinstance(fields[k], dict):
            raise LowbitError(f"{where}.{k}: expects a mapping, got {fields[k]!r}")
    if "roles_to_train" in fields and not (isinstance(fields["roles_to_train"], list)
                                           and all(isinstance(r, str) for r in fields["roles_to_train"])):
        raise LowbitError(f"{where}.roles_to_train: expects a list of role names")
    weight = d.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise LowbitError(f"{where}.weight: expects a number > 0, got {weight!r}")
    limit = d.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise LowbitError(f"{where}.limit: expects an integer > 0, got {limit!r}")
    if ds_type is not None and ds_type not in READER_NAMES:
        raise LowbitError(f"{where}.ds_type: expects json, parquet or csv, got {ds_type!r}")
    split = d.get("split")
    if split is not None and not re.fullmatch(r"(train|valid|validation|test)(\[-?\d*%?:-?\d*%?\])?", str(split)):
        raise LowbitError(f"{where}.split: expects train, valid, validation or test, optionally sliced as "
                          f"datasets does (train[:10%], train[100:200]), got {split!r}")
    fmt = _format_name(d.get("type", default_fmt), where, custom)
    if fmt.startswith(PYTHON_TYPE):  # Axolotl calls the transform's loader with the entry's index
        fields["dataset_idx"] = index
    return DataSource(path, fmt, split, ds_type, fields, float(weight), limit, where)


def parse_sources(datasets, default_fmt: str = "auto", custom: bool = False) -> list[DataSource]:
    """``datasets`` (a string, a comma list, or Axolotl's list of strings / mappings) as ``DataSource`` entries;
    ``default_fmt`` (``dataset_format``) applies where an entry names no type. ``custom``: a type spelled
    ``module.function`` (or ``file.py:function``) is the user's transform (``PYTHON_TYPE``; rl: grpo reads them)."""
    items = datasets if isinstance(datasets, list) else [datasets]
    if not items:
        raise LowbitError("datasets is empty")
    out = []
    for i, item in enumerate(items):
        where = f"datasets[{i}]" if isinstance(datasets, list) else "datasets"
        if isinstance(item, str):
            out.append(DataSource(item, _format_name(default_fmt, "dataset_format"), label=where))
        elif isinstance(item, dict):
            out.append(_entry(item, where, default_fmt, custom, i))
        else:
            raise LowbitError(f"{where}: expects a path, a built-in name or a mapping with 'path', got {item!r}")
    return out
