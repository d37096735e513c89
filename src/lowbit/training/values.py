"""A config value as the key's type wants it, read the way Axolotl's configs are written (torch-free).

    null (an empty YAML value)        the key's default: the caller leaves the key as it is (``UNSET``)
    numbers                           ``2e-5`` and ``1.0e-05`` are numbers in every numeric key — YAML 1.1 reads
                                      ``2e-5`` (no dot) as a string, and many configs spell learning rates so
    booleans                          YAML's true/false/yes/no/on/off, also as strings ("true", "False")
    lists, mappings                   as YAML gives them; from the command line a comma list or a YAML flow
                                      value (``--special-tokens '{pad_token: "<pad>"}'``)

A value that fits none of the key's types is a one-line error naming the key, the value and what it expects.
"""

from __future__ import annotations

import typing

from ..errors import LowbitError

__all__ = ["UNSET", "read_value", "kinds_of"]

UNSET = object()  # "leave the key at its default"
_TRUE, _FALSE = ("true", "1", "yes", "on", "y"), ("false", "0", "no", "off", "n")


def kinds_of(hint) -> tuple:
    """The types a type hint allows (``int | float`` → (int, float); ``list | None`` → (list, NoneType))."""
    return typing.get_args(hint) or (hint,)


def _number(kind, value):
    try:
        number = float(value) if kind is float else int(str(value).strip())
    except ValueError:
        return UNSET
    return number


def read_value(key: str, value, kinds: tuple, from_string: bool = False):
    """``value`` converted to one of ``kinds`` (see the module docstring); ``UNSET`` for null."""
    if value is None:
        return UNSET
    if isinstance(value, str) and from_string and (dict in kinds or list in kinds) and value.strip()[:1] in "[{":
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise LowbitError(f"config: {key} expects a YAML list or mapping, got {value!r}") from None
    if bool in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1) and not (int in kinds or float in kinds):
            return bool(value)
        if not any(k in kinds for k in (str, int, float)):
            raise LowbitError(f"config: {key} expects true/false, got {value!r}")
    if isinstance(value, bool):  # true/false where a number or text is expected
        raise LowbitError(f"config: {key} expects {_names(kinds)}, got {value!r}")
    if int in kinds and isinstance(value, int):
        return value
    if float in kinds and isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        if list in kinds and from_string and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        for kind in (int, float):
            if kind in kinds:
                number = _number(kind, value)
                if number is not UNSET:
                    return number
                if str not in kinds:
                    what = "an integer" if kind is int and float not in kinds else "a number"
                    raise LowbitError(f"config: {key} expects {what}, got {value!r}")
        if str in kinds:
            return value
        if list in kinds and from_string:
            return [value]
    if float in kinds and int in kinds and isinstance(value, float):
        return value
    if int in kinds and float not in kinds and isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise LowbitError(f"config: {key} expects an integer, got {value!r}")
    for kind in (list, dict):
        if kind in kinds and isinstance(value, kind):
            return value
    raise LowbitError(f"config: {key} expects {_names(kinds)}, got {value!r} ({type(value).__name__})")


def _names(kinds) -> str:
    words = {bool: "true/false", int: "an integer", float: "a number", str: "text", list: "a list",
             dict: "a mapping"}
    return " or ".join(words[k] for k in kinds if k in words)
