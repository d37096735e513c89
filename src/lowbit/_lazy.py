"""Lazy package attributes (PEP 562): a package lists what it exports and the module each name lives in; the
module is imported on first use. This keeps torch-free parts (the planner, the config, the registries) and the
command line's start free of torch."""

from __future__ import annotations

import importlib


def exports(package: str, table: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``table`` maps an exported name to its module (relative)."""

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    def __dir__():
        return sorted(table)

    return __getattr__, __dir__
