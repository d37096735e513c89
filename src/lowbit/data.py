"""Data: records from JSONL/JSON files (or built-in data sets) → token ids + loss labels.

Formats (detected from the first record's keys, or named):

    text         {"text": ...}                                   every token is learned
    completions  {"prompt": ..., "completion": ...}              prompt masked, completion learned
    chat         {"messages": [{"role": ..., "content": ...}]}   rendered with the tokenizer's chat template;
                                                                 assistant turns learned, the rest masked
    alpaca       {"instruction": ..., "input": ..., "output": ...}  Alpaca prompt masked, output learned

``train_on_inputs=True`` learns the masked parts too. The end-of-sequence token is appended (when the
rendering does not already end with it) and learned; padding is masked by position, never by token id,
so an EOS that doubles as the pad token is still learned. Labels use -100 for "not learned".
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import LowbitError

__all__ = ["FORMATS", "BUILTIN_DATASETS", "load_records", "load_splits", "detect_format", "tokenize_records", "Batches"]

FORMATS = ("text", "completions", "chat", "alpaca")
IGNORE = -100
ALPACA = ("Below is an instruction that describes a task{x}. Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclass
class Record:
    data: dict
    where: str  # "file:line" for error messages


# ---- reading -------------------------------------------------------------------------------------

def load_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise LowbitError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    out = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LowbitError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise LowbitError(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise LowbitError(f"{path}: record {i} is not a JSON object")
            out.append(Record(rec, f"{path}[{i}]"))
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LowbitError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            if not isinstance(rec, dict):
                raise LowbitError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            out.append(Record(rec, f"{path}:{n}"))
    if not out:
        raise LowbitError(f"{path}: the data set is empty")
    return out


def _dialogue(turns: list[str]) -> dict | None:
    """Alternating user/assistant messages ending on an assistant turn (None if there is no answer)."""
    msgs = [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(turns)]
    if msgs and msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    return {"messages": msgs} if len(msgs) >= 2 else None


def _chatterbot() -> list[Record]:
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise LowbitError("built-in data set 'chatterbot' needs: pip install --no-deps chatterbot-corpus==1.3.3")
    root = Path(spec.origin).parent / "data" / "english"
    out = []
    for f in sorted(root.glob("*.yml")):
        for i, conv in enumerate(yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", [])):
            rec = _dialogue([str(t).strip() for t in conv if t is not None and str(t).strip()])
            if rec:
                out.append(Record(rec, f"chatterbot:{f.stem}:{i}"))
    return out


def _chitchat() -> list[Record]:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None:
        raise LowbitError("built-in data set 'chitchat' needs: pip install --no-deps chitchat-dataset==0.9.0")
    data = json.loads((Path(spec.origin).parent / "dataset.json").read_text(encoding="utf-8"))
    out = []
    for key in sorted(data):
        turns = [" ".join(u["text"].strip() for u in turn if u.get("text")) for turn in data[key]["messages"]]
        rec = _dialogue([t for t in turns if t][:6])
        if rec:
            out.append(Record(rec, f"chitchat:{key}"))
    return out


BUILTIN_DATASETS = {"chatterbot": _chatterbot, "chitchat": _chitchat}


def load_splits(source: str | Path, val_set_size: float | int = 0.05, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """(train, valid): a built-in name, a folder with train.jsonl/valid.jsonl, or one file split by ``val_set_size``."""
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
            raise LowbitError(f"data not found: {s} (a .jsonl/.json file, a folder, or one of: {', '.join(BUILTIN_DATASETS)})")
        recs = load_records(p)
    if not val_set_size:
        return recs, []
    n_val = int(val_set_size) if val_set_size >= 1 else max(1, int(round(len(recs) * float(val_set_size))))
    if n_val >= len(recs):
        raise LowbitError(f"val_set_size={val_set_size} leaves no training data ({len(recs)} records)")
    order = list(range(len(recs)))
    random.Random(seed).shuffle(order)  # a fixed held-out split
    val = set(order[:n_val])
    return [r for i, r in enumerate(recs) if i not in val], [recs[i] for i in sorted(val)]


# ---- tokenizing ----------------------------------------------------------------------------------

def detect_format(rec: Record) -> str:
    d = rec.data
    if "messages" in d:
        return "chat"
    if "prompt" in d and "completion" in d:
        return "completions"
    if "instruction" in d and "output" in d:
        return "alpaca"
    if "text" in d:
        return "text"
    raise LowbitError(f"{rec.where}: cannot tell the format from keys {sorted(d)}; expected one of "
                      "text / prompt+completion / messages / instruction+output")


def _need(rec: Record, fmt: str, *keys: str):
    for k in keys:
        if k not in rec.data:
            raise LowbitError(f"{rec.where}: {fmt} record is missing field {k!r}")
        if not isinstance(rec.data[k], str) and k != "messages":
            raise LowbitError(f"{rec.where}: field {k!r} must be a string")


def _segments(rec: Record, fmt: str, tok) -> list[tuple[str, bool]]:
    """The record as (text, learned) pieces in order."""
    d = rec.data
    if fmt == "text":
        _need(rec, fmt, "text")
        return [(d["text"], True)]
    if fmt == "completions":
        _need(rec, fmt, "prompt", "completion")
        return [(d["prompt"], False), (d["completion"], True)]
    if fmt == "alpaca":
        _need(rec, fmt, "instruction", "output")
        inp = d.get("input") or ""
        prompt = ALPACA.format(x=", paired with an input that provides further context" if inp else "",
                               instruction=d["instruction"], input=f"### Input:\n{inp}\n\n" if inp else "")
        return [(prompt, False), (d["output"], True)]
    _need(rec, fmt, "messages")
    msgs = d["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LowbitError(f"{rec.where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LowbitError(f"{rec.where}: messages[{i}] needs string fields 'role' and 'content'")
    if not getattr(tok, "chat_template", None):
        raise LowbitError(f"{rec.where}: chat data needs a tokenizer with a chat template")
    pieces, prev = [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
            if head.startswith(prev):
                pieces.append((head[len(prev):], False))
                prev = head
        full = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not full.startswith(prev):
            raise LowbitError(f"{rec.where}: the chat template does not render messages incrementally")
        pieces.append((full[len(prev):], m["role"] == "assistant"))
        prev = full
    return pieces


@dataclass
class Tokenized:
    samples: list[tuple[list[int], list[int]]]   # (input_ids, labels)
    truncated: int
    dropped: int
    fmt: str


def tokenize_records(records: list[Record], tok, fmt: str = "auto", sequence_len: int = 512,
                     train_on_inputs: bool = False) -> Tokenized:
    if fmt != "auto" and fmt not in FORMATS:
        raise LowbitError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    fmt = detect_format(records[0]) if fmt == "auto" else fmt
    eos = tok.eos_token_id
    samples, truncated, dropped = [], 0, 0
    for rec in records:
        ids, labels = [], []
        for text, learned in _segments(rec, fmt, tok):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if (learned or train_on_inputs) else [IGNORE] * len(piece)
        if fmt == "text" and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            ids, labels = [tok.bos_token_id] + ids, [IGNORE] + labels
        if eos is not None and eos not in ids[-2:]:  # a chat template already ends turns with EOS (+ newline)
            ids.append(eos)
            labels.append(eos)
        if len(ids) > sequence_len:
            ids, labels = ids[:sequence_len], labels[:sequence_len]
            truncated += 1
        if all(x == IGNORE for x in labels[1:]):
            dropped += 1  # nothing left to learn (the prompt alone fills sequence_len)
            continue
        samples.append((ids, labels))
    if not samples:
        raise LowbitError(f"no usable samples: all {len(records)} records are empty after masking "
                          f"(is sequence_len={sequence_len} shorter than the prompts?)")
    return Tokenized(samples, truncated, dropped, fmt)


# ---- batching ------------------------------------------------------------------------------------

def collate(samples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding is masked by position (attention_mask 0, label -100)."""
    n = max(len(s[0]) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for i, (x, y) in enumerate(samples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Batches:
    """Deterministic epoch order from (seed, epoch); position is (epoch, batch index) for exact resume.

    ``group_by_length``: within each epoch, samples are shuffled, then sorted by length inside windows of
    ``micro_batch_size × 64`` so batches carry little padding (sample packing without cross-attention
    would need a block-diagonal mask that sdpa on CPU does not take; this gets most of the speed).
    """

    def __init__(self, samples, micro_batch_size: int, pad_id: int, seed: int = 0, group_by_length: bool = True):
        self.samples, self.mb, self.pad_id, self.seed, self.group = samples, micro_batch_size, pad_id, seed, group_by_length

    def __len__(self) -> int:
        return -(-len(self.samples) // self.mb)

    def order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        perm = torch.randperm(len(self.samples), generator=g).tolist()
        if self.group:
            w = self.mb * 64
            perm = [i for k in range(0, len(perm), w) for i in sorted(perm[k : k + w], key=lambda j: len(self.samples[j][0]))]
        batches = [perm[k : k + self.mb] for k in range(0, len(perm), self.mb)]
        bperm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in bperm]

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.samples[i] for i in idx], self.pad_id)
