"""Built-in data sets, from PyPI packages (nothing is downloaded at run time): dialogues as chat records.

    chatterbot   chatterbot-corpus 1.3.3 (BSD): ~2,000 question → answer exchanges on 17 topics
    chitchat     chitchat-dataset 0.9.0 (MIT): 7,168 dialogues, the first 6 turns of each
    chatterbot-pairs   preference pairs made from chatterbot: each first question, chosen = its own answer,
                       rejected = the answer of a question half the corpus away (another topic)
    arithmetic   800 prompts "What is a + b?" / "a - b" (1 ≤ a, b ≤ 20) with the answer column, generated (seeded):
                 a task with checkable answers for rl: grpo (lowbit.rewards.exact_answer, answer_format)
    passkey-2k, passkey-8k, passkey-32k
                 long-context retrieval (seeded): chatterbot's answers strung into one long text with "The pass key
                 is N. Remember it." hidden at a random depth, then the question; the answer is N (5 digits). The
                 documents run to ~75 % of the name's length in SmolLM2's tokens (they fit ``sequence_len`` 2,048 /
                 8,192 / 32,768); 200 / 100 / 50 of them, an ``answer`` column for scoring
    shapes       360 generated pictures of a coloured shape with their description (``data/shapes.py``): a task
                 for vision-language models, the images inside the records
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from ..errors import LowbitError
from .records import Record

__all__ = ["BUILTIN_DATASETS", "PASSKEY_QUESTION", "passkey"]


def _dialogue(turns: list[str]) -> dict | None:
    """Alternating user/assistant messages ending on an assistant turn (None if there is no answer)."""
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
    if msgs and msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    return {"messages": msgs} if len(msgs) >= 2 else None


def _package_dir(module: str, requirement: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)  # the files, without importing the package
    if spec is None or spec.origin is None:
        raise LowbitError(f"built-in data set {name!r} needs: pip install --no-deps {requirement}")
    return Path(spec.origin).parent


def chatterbot() -> list[Record]:
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3", "chatterbot") / "data" / "english"
    out = []
    for f in sorted(root.glob("*.yml")):
        for i, conv in enumerate(yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", [])):
            rec = _dialogue([str(t).strip() for t in conv if t is not None and str(t).strip()])
            if rec:
                out.append(Record(rec, f"chatterbot:{f.stem}:{i}"))
    return out


def chitchat() -> list[Record]:
    root = _package_dir("chitchat_dataset", "chitchat-dataset==0.9.0", "chitchat")
    data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    out = []
    for key in sorted(data):
        turns = [" ".join(u["text"].strip() for u in turn if u.get("text")) for turn in data[key]["messages"]]
        rec = _dialogue([t for t in turns if t][:6])
        if rec:
            out.append(Record(rec, f"chitchat:{key}"))
    return out


def chatterbot_pairs() -> list[Record]:
    """Preference pairs, offline and deterministic: the right answer against another topic's answer."""
    firsts = [(r.data["messages"][0]["content"], r.data["messages"][1]["content"], r.where) for r in chatterbot()]
    n, out = len(firsts), []
    for i, (question, answer, where) in enumerate(firsts):
        j = (i + n // 2) % n
        while firsts[j][1].strip().lower() == answer.strip().lower():
            j = (j + 1) % n
        out.append(Record({"prompt": [{"role": "user", "content": question}],
                           "chosen": [{"role": "assistant", "content": answer}],
                           "rejected": [{"role": "assistant", "content": firsts[j][1]}]}, f"{where}:pair"))
    return out


def arithmetic() -> list[Record]:
    """Every a + b and a − b for 1 ≤ a, b ≤ 20, in a seeded order, as chat prompts with their answers."""
    import random

    problems = [(a, op, b) for a in range(1, 21) for b in range(1, 21) for op in "+-"]
    random.Random(0).shuffle(problems)
    return [Record({"prompt": [{"role": "user", "content": f"What is {a} {op} {b}? Answer with only the number."}],
                    "answer": str(a + b if op == "+" else a - b)}, f"arithmetic:{i}")
            for i, (a, op, b) in enumerate(problems)]


PASSKEY_QUESTION = "What is the pass key? Answer with only the number."


def passkey(tokens: int, n: int) -> list[Record]:
    """``n`` passkey documents of about 0.75 × ``tokens`` tokens (plain English words only, ≈ 4.5 characters a
    token), seeded by length."""
    import random
    import re

    words = [w for r in chatterbot() for w in r.data["messages"][1]["content"].split()
             if re.fullmatch(r"[A-Za-z]+[,.;:!?']?[a-z]*", w)]
    rng = random.Random(tokens)
    out = []
    for i in range(n):
        start, filler, size = rng.randrange(len(words)), [], 0
        while size < 0.75 * tokens * 4.5:
            filler.append(words[(start + len(filler)) % len(words)])
            size += len(filler[-1]) + 1
        key = str(rng.randrange(10000, 100000))
        at = rng.randrange(len(filler) + 1)
        text = " ".join([*filler[:at], f"The pass key is {key}. Remember it.", *filler[at:]])
        out.append(Record({"messages": [{"role": "user", "content": f"{text}\n\n{PASSKEY_QUESTION}"},
                                        {"role": "assistant", "content": key}],
                           "answer": key, "depth": round(at / max(len(filler), 1), 3)}, f"passkey-{tokens}:{i}"))
    return out


def _shapes() -> list[Record]:
    from .shapes import shapes

    return shapes()


BUILTIN_DATASETS = {"chatterbot": chatterbot, "chitchat": chitchat, "chatterbot-pairs": chatterbot_pairs,
                    "arithmetic": arithmetic, "passkey-2k": functools.partial(passkey, 2048, 200),
                    "passkey-8k": functools.partial(passkey, 8192, 100),
                    "passkey-32k": functools.partial(passkey, 32768, 50), "shapes": _shapes}
