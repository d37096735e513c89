"""The reward functions of a GRPO run: named in ``trl.reward_funcs``, imported, and called with one line of error
when they misbehave.

    "module.function"       an importable module (the working directory first, as Axolotl does)
    "path/to/file.py:name"  a file (a config's ``rewards.fn`` whose ``rewards.py`` sits beside it is rewritten so,
                            ``config.load_config``)

``score`` returns ``[completions, functions]`` float32 with NaN where a function returned None.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path

import torch

from ..errors import LowbitError

__all__ = ["load_reward_funcs", "score", "RewardError", "func_name"]


class RewardError(LowbitError):
    pass


def func_name(spec: str) -> str:
    """How metrics name a reward function: its last part."""
    return spec.replace(":", ".").rsplit(".", 1)[-1]


def _from_file(path: Path, name: str, spec: str):
    if not path.is_file():
        raise LowbitError(f"trl.reward_funcs: {spec}: no file {path}")
    mod_spec = importlib.util.spec_from_file_location(f"_lowbit_rewards_{path.stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
    except Exception as e:  # the user's file: say which and why, in one line
        raise LowbitError(f"trl.reward_funcs: {path} failed to import: {type(e).__name__}: {e}") from None
    return getattr(mod, name, None)


def _load(spec: str):
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path, name = spec.rsplit(":", 1)
        fn = _from_file(Path(path), name, spec)
    else:
        module, name = spec.rsplit(".", 1)
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            fn = getattr(importlib.import_module(module), name, None)
        except ImportError as e:
            raise LowbitError(f"trl.reward_funcs: {spec}: cannot import {module} ({e})") from None
        except Exception as e:
            raise LowbitError(f"trl.reward_funcs: {spec}: importing {module} failed: {type(e).__name__}: {e}") \
                from None
    if not callable(fn):
        raise LowbitError(f"trl.reward_funcs: {spec}: no function {name!r} there")
    return fn


def load_reward_funcs(specs) -> list:
    """The functions ``specs`` name (see the module docstring), checked to take ``prompts`` and ``completions``."""
    fns = []
    for spec in specs:
        fn = _load(spec)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = None  # a builtin or C function: its call will tell
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()) and \
                not {"prompts", "completions"} <= set(params):
            raise LowbitError(f"trl.reward_funcs: {spec} must take (prompts, completions, **columns)")
        fns.append(fn)
    return fns


def score(fns, names: list[str], prompts: list, completions: list, columns: dict, where: list[str]) -> torch.Tensor:
    """Every function on every completion: ``[completions, functions]`` (NaN for None). ``where`` names each
    completion's sample for errors."""
    out = torch.full((len(completions), len(fns)), float("nan"), dtype=torch.float32, device="cpu")
    for j, (fn, name) in enumerate(zip(fns, names)):
        try:
            got = fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            raise _blame(fn, name, prompts, completions, columns, where, e) from None
        if not isinstance(got, (list, tuple)) or len(got) != len(completions):
            raise RewardError(f"reward function {name} must return one value per completion ({len(completions)}), "
                              f"got {type(got).__name__}{f' of {len(got)}' if hasattr(got, '__len__') else ''}")
        for i, v in enumerate(got):
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"reward function {name} returned {v!r} for {where[i]} (a number or None is "
                                  "expected)") from None
            if not math.isfinite(v):
                raise RewardError(f"reward function {name} returned {v} for {where[i]}")
            out[i, j] = v
    return out


def _blame(fn, name, prompts, completions, columns, where, error) -> RewardError:
    """The error of a function that failed on a batch, naming the first sample it fails on alone."""
    for i in range(len(completions)):
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception as e:
            return RewardError(f"reward function {name} failed on {where[i]}: {type(e).__name__}: {e}")
    return RewardError(f"reward function {name} failed on the batch from {where[0]}: {type(error).__name__}: "
                       f"{error}")
