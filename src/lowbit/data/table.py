"""Data at scale: each source read with the Hugging Face ``datasets`` library into a memory-mapped Arrow table
(never Python lists), tokenized in parallel (``num_proc``) with the result cached on disk — the next run with the
same file, format, tokenizer and ``sequence_len`` reads the cached token table and tokenizes nothing — then split
and mixed by row indices.

    file (.jsonl / .json / .parquet / .csv)  ──load_dataset──▶  Arrow rows  ──map(tokenize_record)──▶
    Arrow {input_ids, labels, length, truncated, why}  ──split / weight / limit──▶  TokenTable (rows + lengths)

Rows a format cannot read fail with the file and line (JSONL), index (JSON list) or row (Parquet, CSV) and the
field. Importing this module does not import torch or ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LowbitError
from .formats import detect_format, tokenize_record
from .images import processor_of
from .preference import detect_preference, preference_row
from .prompts import detect_prompt, prompt_row
from .python_funcs import function_source
from .records import Record, held_out_rows, load_records
from .sources import PYTHON_TYPE, DataSource

__all__ = ["TokenTable", "source_tables", "READERS", "deduplicate"]

READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "test"),
               "validation": ("valid", "validation", "val", "test"), "test": ("test",)}


@dataclass
class TokenTable:
    """Token rows of one or more Arrow tables, addressed by position: ``table[k] -> (input_ids, labels)``."""
    parts: list            # datasets.Dataset with input_ids / labels columns
    rows: list             # per part: numpy array of the part's row numbers, in order
    lengths: np.ndarray    # token count of every position

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, k: int) -> tuple[list[int], list[int]]:
        r = self.row(k)
        return r["input_ids"], r["labels"]

    def row(self, k: int) -> dict:
        """Every column of position ``k`` (a preference table's prompt / chosen / rejected ids and label)."""
        for part, rows in zip(self.parts, self.rows):
            if k < len(rows):
                return part[int(rows[k])]
            k -= len(rows)
        raise IndexError(k)

    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def deduplicate(table: TokenTable) -> TokenTable:
    """``table`` without the samples whose tokens and labels repeat an earlier one's (Axolotl's
    ``dataset_exact_deduplication``, on what is trained; a preference table: prompt, chosen, rejected and label)."""
    seen, rows, lengths = set(), [], []
    k = 0
    for part, part_rows in zip(table.parts, table.rows):
        keep = []
        for r in part_rows:
            row = part[int(r)]
            if "input_ids" in row:
                ids = row["input_ids"] + [-1] + row["labels"]
            elif "columns" in row:  # prompts: the prompt and every column the rewards see
                ids = row["prompt_ids"] + [-1] + list(row["columns"].encode())
            else:
                ids = row["prompt_ids"] + [-1] + row["chosen_ids"] + [-1] + row["rejected_ids"] + \
                    [-1, int(row["label"])]
            digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()
            if digest not in seen:
                seen.add(digest)
                keep.append(r)
                lengths.append(table.lengths[k])
            k += 1
        rows.append(np.asarray(keep, dtype=np.int64))
    return TokenTable(table.parts, rows, np.asarray(lengths, dtype=table.lengths.dtype))


class RowRef:
    """Where row ``row`` of ``path`` is, worked out only when an error message needs it (a JSONL line number
    means counting lines)."""

    def __init__(self, path: Path, row: int):
        self.path, self.row = path, row

    def __str__(self) -> str:
        ext = self.path.suffix.lower()
        if ext == ".jsonl":
            with open(self.path, encoding="utf-8", errors="replace") as f:
                n = -1
                for line_no, line in enumerate(f, 1):
                    n += bool(line.strip())
                    if n == self.row:
                        return f"{self.path}:{line_no}"
        if ext == ".json":
            return f"{self.path}[{self.row}]"
        return f"{self.path}: row {self.row + 1}"  # Parquet, CSV: data rows counted from 1

    __format__ = lambda self, spec: format(str(self), spec)


def _files(src: DataSource) -> tuple[Path, Path | None]:
    """(train file, held-out file or None) of an entry: a file, or a folder's train.* and valid.* files."""
    p = Path(src.path)
    if not p.exists():
        from .builtin import BUILTIN_DATASETS

        looks_like_hub = src.path.count("/") == 1 and not src.path.startswith((".", "/")) and \
            Path(src.path).suffix.lower() not in READERS  # "owner/name"
        hub = " — hub data sets are not fetched: download the files and give their path" if looks_like_hub else ""
        raise LowbitError(f"{src.label}: data not found: {src.path} (a .jsonl/.json/.parquet/.csv file, a folder, or "
                          f"one of: {', '.join(BUILTIN_DATASETS)}){hub}")
    if p.is_file():
        if (src.ds_type is None and p.suffix.lower() not in READERS):
            raise LowbitError(f"{p}: unknown data file type (expected {', '.join(READERS)}, or set ds_type)")
        return p, None
    found = {}
    for split, names in (("train", SPLIT_NAMES["train"]), ("valid", SPLIT_NAMES["valid"])):
        found[split] = next((p / f"{n}{ext}" for n in names for ext in READERS if (p / f"{n}{ext}").exists()), None)
    if _split_name(src.split) in ("valid", "validation", "test"):  # Axolotl's split: which part of a folder
        found = {"train": found["valid"], "valid": None}
    if found["train"] is None:
        raise LowbitError(f"{p}: a data folder needs a train file ({', '.join('train' + e for e in READERS)}) and "
                          "optionally a valid one")
    return found["train"], found["valid"]


def _split_name(split: str | None) -> str | None:
    return split.split("[", 1)[0] if split else None


def _split_slice(split: str | None) -> str:
    """The ``[start:end]`` of a split like ``train[:10%]`` (HF datasets' slicing), or ''."""
    return "[" + split.split("[", 1)[1] if split and "[" in split else ""


def _root_message(e: BaseException) -> str:
    """The first line of the innermost cause (``datasets`` wraps the reader's own error)."""
    while (e.__cause__ or e.__context__) is not None and str(e).startswith("An error occurred"):
        e = e.__cause__ or e.__context__
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


def _read(path: Path, ds_type: str | None, part: str = ""):
    """The file as an Arrow-backed ``datasets.Dataset`` (cached by ``datasets``; memory-mapped); ``part``: a slice
    of its rows as ``datasets`` spells it (``[:10%]``)."""
    import datasets

    kind = ds_type or READERS[path.suffix.lower()]
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors come back as ours, in one line
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train" + part)
    except Exception as e:  # pyarrow / pandas / datasets raise many kinds; find the line ourselves where we can
        if kind == "json":
            load_records(path)  # raises the one-line error naming the line when the JSON itself is broken
        raise LowbitError(f"{path}: could not read as {kind} ({_root_message(e)})") from None


def _fingerprint(path: Path, src: DataSource, fmt: str, tok, sequence_len: int, train_on_inputs: bool) -> str:
    st = path.stat()
    backend = getattr(tok, "backend_tokenizer", None)
    parts = [str(path.resolve()), st.st_size, st.st_mtime_ns, src.key, fmt, sequence_len, train_on_inputs,
             getattr(tok, "chat_template", None), tok.eos_token_id, tok.bos_token_id,
             getattr(tok, "add_bos_token", None), backend.to_str() if backend is not None else repr(tok),
             *((Path(__file__).parent / f).read_text() for f in ("formats.py", "preference.py", "prompts.py",
                                                                 "images.py")),
             _processor_options(tok),
             function_source(fmt[len(PYTHON_TYPE):]) if fmt.startswith(PYTHON_TYPE) else ""]
    return hashlib.sha256(json.dumps(parts, default=repr).encode()).hexdigest()[:24]


def _processor_options(tok) -> str:
    """What a vision-language processor expands images with (its image processor's options and its own)."""
    proc = processor_of(tok)
    if proc is None:
        return ""
    return json.dumps([proc.image_processor.to_dict(), {k: v for k, v in vars(proc).items()
                                                        if isinstance(v, (int, float, str, bool))}],
                      sort_keys=True, default=repr)


def _sft_row(rec: Record, tok, fmt: str, sequence_len: int, train_on_inputs: bool, opts: dict) -> dict:
    ids, labels, images, cut, why = tokenize_record(rec, tok, fmt, sequence_len, train_on_inputs, opts)
    return {"input_ids": ids, "labels": labels, "images": images, "length": len(ids), "truncated": cut,
            "why": why or ""}


def _pref_row(rec: Record, tok, fmt: str, sequence_len: int, train_on_inputs: bool, opts: dict) -> dict:
    return preference_row(rec, tok, fmt, sequence_len, opts)


def _prompt_row(rec: Record, tok, fmt: str, sequence_len: int, train_on_inputs: bool, opts: dict) -> dict:
    return prompt_row(rec, tok, fmt, sequence_len, opts)


# what a table holds: supervised samples, preference pairs (or KTO's examples), prompts (rl: grpo)
KINDS = {"sft": (_sft_row, detect_format), "preference": (_pref_row, detect_preference),
         "prompt": (_prompt_row, detect_prompt)}


def _features(kind: str):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    cols = {"sft": {"input_ids": ids, "labels": ids, "images": datasets.List(datasets.Value("string"))},
            "preference": {"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids, "label": datasets.Value("bool")},
            "prompt": {"prompt_ids": ids, "columns": datasets.Value("string")}}[kind]
    return datasets.Features({**cols, "length": datasets.Value("int32"), "truncated": datasets.Value("bool"),
                              "why": datasets.Value("string")})


def _tokenize(ds, path: Path, src: DataSource, tok, fmt: str, sequence_len: int, train_on_inputs: bool,
              processes: int, kind: str = "sft"):
    row_fn, detect = KINDS[kind]
    if fmt == "auto":
        if len(ds) == 0:
            raise LowbitError(f"{path}: the data set is empty")
        fmt = detect(Record(ds[0], RowRef(path, 0)))
    features = _features(kind)

    def run(batch, idx):
        out = {k: [] for k in features}
        for k, row in enumerate(idx):
            rec = Record({c: batch[c][k] for c in batch}, RowRef(path, row))
            for key, v in row_fn(rec, tok, fmt, sequence_len, train_on_inputs, src.fields).items():
                out[key].append(v)
        return out

    procs = processes or (min(2, os.cpu_count() or 1) if len(ds) >= 20000 else None)
    try:
        table = ds.map(run, batched=True, batch_size=1000, with_indices=True, remove_columns=ds.column_names,
                       features=features, num_proc=procs if procs and procs > 1 else None,
                       new_fingerprint=_fingerprint(path, src, fmt, tok, sequence_len, train_on_inputs),
                       desc=f"tokenizing {path.name}")
    except LowbitError:
        raise
    except Exception as e:  # a worker's LowbitError can come back wrapped
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LowbitError(msg if str(path) in msg else f"{path}: {msg}") from None
    return table, fmt


def _builtin(src: DataSource, tok, sequence_len: int, train_on_inputs: bool, kind: str = "sft"):
    """A built-in data set (small, in memory), tokenized into the same columns."""
    import datasets

    from .builtin import BUILTIN_DATASETS

    recs = BUILTIN_DATASETS[src.path]()
    row_fn, detect = KINDS[kind]
    fmt = detect(recs[0]) if src.fmt == "auto" else src.fmt
    features = _features(kind)
    cols = {k: [] for k in features}
    for rec in recs:
        row = row_fn(rec, tok, fmt, sequence_len, train_on_inputs, src.fields)
        row["why"] = f"{rec.where}: {row['why']}" if row["why"] else ""
        for key, v in row.items():
            cols[key].append(v)
    return datasets.Dataset.from_dict(cols, features=features), fmt


def _split(n: int, val_set_size: float, seed: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) as arrays: the records' own split (``records.held_out_rows``)."""
    train, held = held_out_rows(n, val_set_size, seed, label)
    return np.asarray(train, dtype=np.int64), np.asarray(held, dtype=np.int64)


def _weigh(rows: np.ndarray, src: DataSource, seed: int) -> np.ndarray:
    """``limit`` (the first N training rows) then ``weight`` (whole copies plus a seeded share)."""
    if src.limit is not None:
        rows = rows[: src.limit]
    whole, frac = divmod(src.weight, 1.0)
    extra = np.random.default_rng(seed).choice(rows, round(frac * len(rows)), replace=False) if frac else rows[:0]
    return np.concatenate([rows] * int(whole) + [np.sort(extra)])


@dataclass
class Loaded:
    train: TokenTable
    valid: TokenTable | None
    truncated: int
    dropped: int
    formats: list[str]


def _usable(table, rows: np.ndarray, lengths: np.ndarray, path: Path | None) -> np.ndarray:
    """The rows with something to learn (all of them dropped: the reason, for the first row)."""
    keep = rows[lengths[rows] > 0]
    if len(rows) and not len(keep):
        where, why = (RowRef(path, int(rows[0])), table[int(rows[0])]["why"]) if path else \
            table[int(rows[0])]["why"].split(": ", 1)
        raise LowbitError(f"{where}: no usable samples in all {len(rows)} records; this one: {why}")
    return keep


def source_tables(sources: list[DataSource], tok, val_set_size: float = 0.05, seed: int = 0,
                  sequence_len: int = 512, train_on_inputs: bool = False, processes: int = 0,
                  kind: str = "sft") -> Loaded:
    """Every source read, tokenized (cached), split and weighed; the train and held-out token tables
    (``kind``: ``KINDS`` — preference: prompt / chosen / rejected ids, ``data/preference.py``; prompt: prompt ids
    and columns, ``data/prompts.py``)."""
    from .builtin import BUILTIN_DATASETS

    parts, train_rows, valid_parts, valid_rows, fmts, truncated, dropped = [], [], [], [], [], 0, 0
    for src in sources:
        if src.path in BUILTIN_DATASETS and not Path(src.path).exists():
            pairs = [(*_builtin(src, tok, sequence_len, train_on_inputs, kind), "train", None)]
        else:
            train_file, valid_file = _files(src)
            pairs = [(*_tokenize(_read(f, src.ds_type, _split_slice(src.split) if part == "train" else ""), f, src,
                                 tok, src.fmt, sequence_len, train_on_inputs, processes, kind), part, f)
                     for f, part in ((train_file, "train"), (valid_file, "valid")) if f is not None]
        for table, fmt, part, path in pairs:
            lengths = table.data.column("length").to_numpy()
            if part == "valid":
                valid_parts.append(table)
                valid_rows.append(_usable(table, np.arange(len(table)), lengths, path))
                continue
            if len(pairs) == 2:  # a folder with its own held-out file: no split
                tr, va = np.arange(len(table)), np.arange(0)
            else:
                tr, va = _split(len(table), val_set_size, seed, src.label)
            cut = table.data.column("truncated").to_numpy(zero_copy_only=False)
            truncated += int(cut[tr].sum())
            dropped += int((lengths[tr] == 0).sum())
            parts.append(table)
            train_rows.append(_weigh(_usable(table, tr, lengths, path), src, seed))
            fmts.append(fmt)
            if len(va):
                valid_parts.append(table)
                valid_rows.append(_usable(table, va, lengths, path))

    def assemble(ps, rs):
        lengths = np.concatenate([p.data.column("length").to_numpy()[r] for p, r in zip(ps, rs)]) if ps else None
        return TokenTable(ps, rs, lengths) if ps and len(lengths) else None

    train = assemble(parts, train_rows)
    if train is None:
        raise LowbitError("datasets: no training samples")
    return Loaded(train, assemble(valid_parts, valid_rows), truncated, dropped, fmts)
