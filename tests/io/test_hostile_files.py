"""Malicious or broken safetensors files are refused before any large allocation, in one line naming the file."""

import json
import struct

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.safetensors import Reader, read_header


def _file(path, header, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
HOSTILE = {
    "header longer than the file": (GOOD, bytes(16), 1 << 60),
    "header past the format's limit": (GOOD, bytes(16), 200_000_000),
    "offsets past the end": ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1 << 40]}}, bytes(16), None),
    "a terabyte shape in 16 bytes": ({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}},
                                     bytes(16), None),
    "negative dimension": ({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16), None),
    "shape of strings": ({"w": {"dtype": "F32", "shape": ["2", "2"], "data_offsets": [0, 16]}}, bytes(16), None),
    "unknown dtype": ({"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, bytes(32), None),
    "offsets backwards": ({"w": {"dtype": "U8", "shape": [0], "data_offsets": [8, 0]}}, bytes(16), None),
    "header not JSON": (b"{not json", b"", None),
    "header a list": ([1, 2, 3], b"", None),
    "entry not an object": ({"w": [1, 2]}, b"", None),
    "too short for a header": (b"", b"", 0),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_headers_are_refused_before_allocating(tmp_path, monkeypatch, name):
    header, data, length = HOSTILE[name]
    path = _file(tmp_path / "model.safetensors", header, data, length)
    big = []
    real_empty = torch.empty

    def watching_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        big.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "empty", watching_empty)
    with pytest.raises(LowbitError) as e:
        Reader(tmp_path).get("w")
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert not big or max(big) <= path.stat().st_size, "nothing larger than the file may be allocated"


def test_truncated_data_is_refused(tmp_path):
    _file(tmp_path / "model.safetensors", GOOD, bytes(8))  # 16 bytes promised, 8 there
    with pytest.raises(LowbitError, match="corrupt"):
        read_header(tmp_path / "model.safetensors")


def test_a_good_file_still_reads(tmp_path):
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    _file(tmp_path / "model.safetensors", GOOD, data)
    assert torch.equal(Reader(tmp_path).get("w"), torch.arange(4, dtype=torch.float32).view(2, 2))
