"""Records from files, folders and built-in data sets; the fixed held-out split."""

import json

import pytest

from lowbit.data import load_records, load_splits


def _write(path, recs):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def test_folder_and_split(tmp_path):
    _write(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(5)])
    _write(tmp_path / "valid.jsonl", [{"text": "v"}])
    tr, va = load_splits(tmp_path)
    assert len(tr) == 5 and len(va) == 1
    f = _write(tmp_path / "all.jsonl", [{"text": f"t{i}"} for i in range(20)])
    tr, va = load_splits(f, 0.25, seed=1)
    assert len(va) == 5 and len(tr) == 15
    assert [r.data for r in load_splits(f, 0.25, seed=1)[1]] == [r.data for r in va], "the split must be fixed"
    js = tmp_path / "list.json"
    js.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert len(load_records(js)) == 2


@pytest.mark.parametrize("name,minimum", [("chatterbot", 1000), ("chitchat", 3500)])
def test_builtin_datasets(name, minimum):
    tr, va = load_splits(name, 0.05)
    assert len(tr) + len(va) >= minimum
    msgs = tr[0].data["messages"]
    assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant"
