"""Reading the small JSON files lowbit meets (config.json, adapter_config.json, trainer_state.json, …): a file that
is unreadable, not JSON, or not a JSON object is a one-line error naming it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LowbitError

__all__ = ["read_object"]


def read_object(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise LowbitError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
