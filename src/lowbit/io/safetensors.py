"""Reading safetensors checkpoints one tensor at a time, with plain file reads (never unpickling).

A header is checked before anything is read or allocated: its length must fit the file (and the format's
100 MB limit), every entry must name a known dtype and a shape of non-negative integers, and its byte range must
lie inside the file and hold exactly shape × dtype bytes — so a hostile or broken header cannot make lowbit
allocate what the file does not contain. ``Reader`` reads a single-file or sharded (index.json)
checkpoint tensor by tensor without a memory map — a mapped checkpoint counts every page it touched in the
process's memory — optionally converting to another float dtype piece by piece.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from ..errors import LowbitError

__all__ = ["ST_DTYPES", "read_header", "checkpoint_files", "Reader", "open_safetensors"]

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
_ITEMSIZE = {k: torch.empty(0, dtype=v, device="cpu").element_size() for k, v in ST_DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (name → dtype, shape, offsets) and where the data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header")
            n = int.from_bytes(raw, "little")
            size = path.stat().st_size
            if n <= 0 or 8 + n > size or n > MAX_HEADER:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LowbitError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for k, v in header.items():
        if not _entry_ok(v, 8 + n, size):
            raise LowbitError(f"{path}: corrupt safetensors entry {k!r}")
    return header, 8 + n


MAX_HEADER = 100_000_000  # the format's own limit on the header's length


def _entry_ok(v, base: int, size: int) -> bool:
    """dtype known, shape of non-negative ints, offsets inside the file holding exactly shape × dtype bytes."""
    if not isinstance(v, dict) or v.get("dtype") not in ST_DTYPES:
        return False
    shape, offsets = v.get("shape"), v.get("data_offsets")
    ints = lambda xs, n=None: isinstance(xs, list) and (n is None or len(xs) == n) and \
        all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    if not ints(shape) or not ints(offsets, 2):
        return False
    a, b = offsets
    return a <= b and base + b <= size and math.prod(shape) * _ITEMSIZE[v["dtype"]] == b - a


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for a single-file or sharded (index.json) checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LowbitError(f"{index}: not a valid safetensors index ({e})") from None
        files = {k: folder / v for k, v in wm.items()}
        for f in set(files.values()):
            if not f.exists():
                raise LowbitError(f"{f}: shard named in {index.name} is missing")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise LowbitError(f"{folder}: only pickle (.bin/.pt) weights found; lowbit reads safetensors only "
                              "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise LowbitError(f"{folder}: no *.safetensors weights")
    return {k: f for f in shards for k in read_header(f)[0]}


@contextlib.contextmanager
def open_safetensors(path: Path):
    """safetensors' own reader (for metadata), with a one-line error for a corrupt file."""
    from safetensors import safe_open

    try:
        h = safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError
        raise LowbitError(f"{path}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
    with h:
        yield h


class Reader:
    """Tensors of a checkpoint folder by name, read one at a time (see the module docstring)."""

    def __init__(self, folder: Path):
        self.files = checkpoint_files(folder)
        self._headers = {f: read_header(f) for f in set(self.files.values())}
        self._fh = {}

    def __contains__(self, key):
        return key in self.files

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get(self, key: str, dtype: torch.dtype | None = None, chunk_bytes: int = 16 << 20) -> torch.Tensor:
        """The tensor, optionally converted to ``dtype`` piece by piece (never a full-size copy in the file's
        dtype)."""
        if key not in self.files:
            raise LowbitError(f"checkpoint has no tensor {key!r}")
        f = self.files[key]
        header, base = self._headers[f]
        if key not in header:
            raise LowbitError(f"{f}: tensor {key!r} is named in the index but missing from the file")
        meta = header[key]
        a, b = meta["data_offsets"]
        src = ST_DTYPES[meta["dtype"]]
        numel, esz = math.prod(meta["shape"]), _ITEMSIZE[meta["dtype"]]  # sizes checked by read_header
        fh = self._fh.get(f) or self._fh.setdefault(f, open(f, "rb"))
        fh.seek(base + a)
        dst = src if dtype is None or not src.is_floating_point else dtype
        out = torch.empty(meta["shape"], dtype=dst, device="cpu")
        if dst == src:
            if b > a and fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != b - a:
                raise LowbitError(f"{f}: truncated while reading {key!r}")
            return out
        flat = out.view(-1)
        step = max(1, chunk_bytes // esz)
        buf = torch.empty(min(step, numel), dtype=src, device="cpu")
        for lo in range(0, numel, step):
            piece = buf[: min(step, numel - lo)]
            if fh.readinto(memoryview(piece.view(torch.uint8).numpy())) != piece.numel() * esz:
                raise LowbitError(f"{f}: truncated while reading {key!r}")
            flat[lo : lo + piece.numel()].copy_(piece)
        return out

    def close(self):
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()
