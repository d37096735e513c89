"""Built-in reward functions for ``rl: grpo`` (``trl.reward_funcs: [lowbit.rewards.exact_answer, …]``), and the
shape every reward function has:

    def reward(prompts, completions, **columns) -> list[float | None]

``prompts`` as the data gave them (text, or a list of chat messages), ``completions`` as text (or, for chat
prompts, ``[{"role": "assistant", "content": text}]``), ``completion_ids`` the token ids, and every other column of
the data set by its name — one value per completion. ``None`` means "does not apply to this sample".
"""

from __future__ import annotations

import re

__all__ = ["exact_answer", "answer_format", "completion_text"]

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion) -> str:
    """The text of a completion given as text or as chat messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _final(text: str) -> str | None:
    """The answer a completion gives: after ``####`` or "answer:" when present, else its last number."""
    for mark in ("####", "answer:", "Answer:"):
        if mark in text:
            text = text.rsplit(mark, 1)[1]
            break
    nums = NUMBER.findall(text.replace(",", ""))
    return nums[-1] if nums else None


def exact_answer(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion's final number equals the ``answer`` column (compared as numbers), else 0.0;
    None where a sample has no answer."""
    out = []
    for c, a in zip(completions, answer if answer is not None else [None] * len(completions)):
        if a is None:
            out.append(None)
            continue
        got = _final(completion_text(c))
        want = _final(str(a))
        out.append(1.0 if got is not None and want is not None and float(got) == float(want) else 0.0)
    return out


def answer_format(prompts, completions, **_) -> list[float]:
    """1.0 when the completion is only a number (an optional sign, decimals and final period), else 0.0 — a strict
    answer format."""
    return [1.0 if re.fullmatch(r"\s*-?\d+(?:\.\d+)?\.?\s*", completion_text(c)) else 0.0
            for c in completions]
