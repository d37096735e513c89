"""The reward functions of a GRPO run: named in ``trl.reward_funcs``, imported (``data/python_funcs.py``: an
importable ``module.function`` or ``file.py:function``; a config's ``rewards.fn`` whose ``rewards.py`` sits beside it
is read from there, ``config.load_config``), and called with one line of error when they misbehave.

``score`` returns ``[completions, functions]`` float32 with NaN where a function returned None.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..data.python_funcs import load_function
from ..errors import LowbitError

__all__ = ["load_reward_funcs", "score", "RewardError", "func_name"]


class RewardError(LowbitError):
    pass


def func_name(spec: str) -> str:
    """How metrics name a reward function: its last part."""
    return spec.replace(":", ".").rsplit(".", 1)[-1]


def load_reward_funcs(specs) -> list:
    """The functions ``specs`` name (see the module docstring), checked to take ``prompts`` and ``completions``."""
    fns = []
    for spec in specs:
        fn = load_function(spec, "trl.reward_funcs")
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
