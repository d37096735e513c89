"""Model shapes the planner can read: a known family by name (``families/*.json``, shapes of public models
for planning without their weights), a model folder, or a config.json file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import LowbitError
from ..jsonfile import read_object

__all__ = ["known_families", "load_model_config"]


def _families():
    return resources.files("lowbit.planner").joinpath("families")


def known_families() -> list[str]:
    return sorted(p.name[:-5] for p in _families().iterdir() if p.name.endswith(".json"))


def load_model_config(model: str) -> dict:
    fam = _families().joinpath(f"{model}.json")
    if fam.is_file():
        return json.loads(fam.read_text())
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return read_object(p)
    raise LowbitError(f"unknown model {model!r}: not a folder or config.json, nor a known family "
                      f"({', '.join(known_families())})")
