"""Functions from the user's Python, named in a config: ``"module.function"`` (importable; the working directory is
searched first, as Axolotl does) or ``"path/to/file.py:function"``. Every failure is one line that starts with the
config key naming it. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from ..errors import LowbitError

__all__ = ["load_function", "function_source", "is_function_name", "beside"]

_NAME = re.compile(r"(?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*|.+\.py:[A-Za-z_]\w*")


def is_function_name(value) -> bool:
    """Whether ``value`` is spelled as ``module.function`` or ``file.py:function``."""
    return isinstance(value, str) and bool(_NAME.fullmatch(value))


def beside(spec, folder: Path):
    """``module.fn`` as ``/folder/module.py:fn`` when that file exists (Axolotl imports a config's functions from
    where it runs; a config read from elsewhere finds them beside it too); anything else as it is."""
    if not is_function_name(spec) or ":" in spec:
        return spec
    module, name = spec.rsplit(".", 1)
    path = Path(folder) / (module.replace(".", "/") + ".py")
    return f"{path.resolve()}:{name}" if path.is_file() else spec


def _split(spec: str) -> tuple[str, str, bool]:
    """(module or file, function, is a file)."""
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path, name = spec.rsplit(":", 1)
        return path, name, True
    module, name = spec.rsplit(".", 1)
    return module, name, False


def _module_from_file(path: Path, what: str, spec: str):
    if not path.is_file():
        raise LowbitError(f"{what}: {spec}: no file {path}")
    key = "_lowbit_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    mod_spec = importlib.util.spec_from_file_location(key, path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
    except Exception as e:  # the user's file: say which and why, in one line
        raise LowbitError(f"{what}: {path} failed to import: {type(e).__name__}: {e}") from None
    return mod


def load_function(spec: str, what: str):
    """The function ``spec`` names (see the module docstring); ``what`` is the config key for errors."""
    where, name, is_file = _split(spec)
    if is_file:
        mod = _module_from_file(Path(where), what, spec)
    else:
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            mod = importlib.import_module(where)
        except ImportError as e:
            raise LowbitError(f"{what}: {spec}: cannot import {where} ({e})") from None
        except Exception as e:
            raise LowbitError(f"{what}: {spec}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise LowbitError(f"{what}: {spec}: no function {name!r} there")
    return fn


def function_source(spec: str) -> str:
    """The text of the file that defines ``spec`` (for caches keyed by what the function does), or ``""``."""
    where, _, is_file = _split(spec)
    if not is_file:
        found = importlib.util.find_spec(where.split(".")[0]) if where else None
        origin = getattr(found, "origin", None) if found else None
        if origin is None:
            return ""
        where = str(Path(origin).parent / (where.replace(".", "/") + ".py")) if "." in where else origin
    try:
        return Path(where).read_text(errors="replace")
    except OSError:
        return ""
