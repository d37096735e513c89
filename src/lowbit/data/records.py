"""Records from the user's files: JSONL (one object a line) or a JSON list, a folder with train/valid files,
or a built-in data set; and the fixed train/held-out split.

Every record remembers where it came from (``file:line`` or ``file[index]``) for one-line error messages.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import LowbitError

__all__ = ["Record", "load_records", "load_splits", "held_out_rows"]


@dataclass
class Record:
    data: dict
    where: str  # "file:line" or "file[index]", for error messages


def _parse(path: Path, text: str):
    """(object, where) for each record of a .json list or a JSONL file."""
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise LowbitError(f"{path}: expected a JSON list of records")
        yield from ((rec, f"{path}[{i}]") for i, rec in enumerate(data))
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line), f"{path}:{n}"
            except json.JSONDecodeError as e:
                raise LowbitError(f"{path}:{n}: malformed JSON line ({e.msg})") from None


def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    for rec, where in _parse(path, text):
        if not isinstance(rec, dict):
            raise LowbitError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append(Record(rec, where))
    if not out:
        raise LowbitError(f"{path}: the data set is empty")
    return out


def load_splits(source: str | Path, val_set_size: float | int = 0.05,
                seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, valid): a built-in name, a folder with train.jsonl/valid.jsonl, or one file split by ``val_set_size``
    (a fraction, or a number of records when ≥ 1; the held-out records are fixed by ``seed``)."""
    from .builtin import BUILTIN_DATASETS

    s = str(source)
    if s in BUILTIN_DATASETS:
        recs = BUILTIN_DATASETS[s]()
    else:
        p = Path(s)
        if p.is_dir():
            if not (p / "train.jsonl").exists():
                raise LowbitError(f"{p}: a data folder needs train.jsonl (and optionally valid.jsonl)")
            train = load_records(p / "train.jsonl")
            valid = load_records(p / "valid.jsonl") if (p / "valid.jsonl").exists() else []
            return train, valid
        if not p.exists():
            raise LowbitError(f"data not found: {s} (a .jsonl/.json file, a folder, or one of: "
                              f"{', '.join(BUILTIN_DATASETS)})")
        recs = load_records(p)
    train, held = held_out_rows(len(recs), val_set_size, seed)
    return [recs[i] for i in train], [recs[i] for i in held]


def held_out_rows(n: int, val_set_size: float | int, seed: int, label: str = "") -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of ``n`` records, each in file order: a fraction (or, when ≥ 1, a number)
    of the rows held out, chosen by ``seed`` — the one fixed split every reader uses."""
    if not val_set_size:
        return list(range(n)), []
    n_val = int(val_set_size) if val_set_size >= 1 else max(1, round(n * float(val_set_size)))
    if n_val >= n:
        raise LowbitError(f"{label + ': ' if label else ''}val_set_size={val_set_size} leaves no training data "
                          f"({n} records)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [i for i in range(n) if i not in held], sorted(held)
