"""Data at scale through ``datasets``: JSONL / JSON / Parquet / CSV files and folders, ShareGPT and mapped
columns, several sources of different formats mixed, the tokenization cache, weights and limits, and one-line
errors naming the file, line or row, and field."""

import json
import re

import pytest

from lowbit.data.formats import IGNORE, tokenize_records
from lowbit.data.records import Record
from lowbit.data.sources import parse_sources
from lowbit.data.table import source_tables
from lowbit.errors import LowbitError

from tiny import tiny_tokenizer

CHAT = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(20)]
SHAREGPT = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": f"question {i}"},
                               {"from": "gpt", "value": f"answer {i}"}]} for i in range(20)]
ALPACA = [{"instruction": f"say {i}", "input": "" if i % 2 else "politely", "output": f"said {i}"} for i in range(20)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(entries, tok, **kw):
    return source_tables(parse_sources(entries), tok, **{"val_set_size": 0, **kw})


def _all(table):
    return [table[k] for k in range(len(table))]


def test_jsonl_parquet_csv_and_json_read_the_same(tmp_path, tok):
    import pandas as pd

    want = tokenize_records([Record(r, "x") for r in ALPACA], tok).samples
    _jsonl(tmp_path / "a.jsonl", ALPACA)
    pd.DataFrame(ALPACA).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame(ALPACA).to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    for ext in ("jsonl", "parquet", "csv", "json"):
        got = _load([{"path": str(tmp_path / f"a.{ext}"), "type": "alpaca"}], tok)
        assert _all(got.train) == want, ext
        assert got.formats == ["alpaca"] and list(got.train.lengths) == [len(s[0]) for s in want]


def test_sharegpt_equals_the_same_chat_in_messages(tmp_path, tok):
    as_chat = [{"messages": [{"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]),
                              "content": m["value"]} for m in r["conversations"]]} for r in SHAREGPT]
    want = tokenize_records([Record(r, "x") for r in as_chat], tok).samples
    f = _jsonl(tmp_path / "sg.jsonl", SHAREGPT)
    assert _all(_load([{"path": str(f), "type": "sharegpt"}], tok).train) == want
    assert _all(_load(str(f), tok).train) == want  # detected from 'conversations'
    mapped = [{"chat": [{"speaker": m["from"], "text": m["value"]} for m in r["conversations"]]} for r in SHAREGPT]
    f2 = _jsonl(tmp_path / "mapped.jsonl", mapped)
    entry = {"path": str(f2), "type": "chat_template", "field_messages": "chat",
             "message_property_mappings": {"role": "speaker", "content": "text"},
             "roles": {"user": ["human"], "assistant": ["gpt"], "system": ["system"]}}
    assert _all(_load([entry], tok).train) == want


def test_two_sources_of_different_formats_mix_with_weight_and_limit(tmp_path, tok):
    chat = _jsonl(tmp_path / "chat.jsonl", CHAT)
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    got = _load([{"path": str(chat), "type": "chat_template"}, {"path": str(alpaca), "type": "alpaca", "limit": 5,
                                                                "weight": 2}], tok)
    chat_s = tokenize_records([Record(r, "x") for r in CHAT], tok).samples
    alp_s = tokenize_records([Record(r, "x") for r in ALPACA[:5]], tok).samples
    assert got.formats == ["chat", "alpaca"]
    assert _all(got.train) == chat_s + alp_s + alp_s
    half = _load([{"path": str(alpaca), "type": "alpaca", "weight": 0.5}], tok)
    assert len(half.train) == 10 and set(map(str, _all(half.train))) <= set(map(str, tokenize_records(
        [Record(r, "x") for r in ALPACA], tok).samples))


def test_split_is_fixed_and_matches_the_record_split(tmp_path, tok):
    from lowbit.data.records import load_splits

    f = _jsonl(tmp_path / "chat.jsonl", CHAT)
    got = _load(str(f), tok, val_set_size=0.25, seed=3)
    tr, va = load_splits(f, 0.25, 3)
    assert _all(got.train) == tokenize_records(tr, tok).samples
    assert _all(got.valid) == tokenize_records(va, tok).samples


def test_folder_with_train_and_valid_files(tmp_path, tok):
    import pandas as pd

    pd.DataFrame(ALPACA[:15]).to_parquet(tmp_path / "train.parquet")
    _jsonl(tmp_path / "valid.jsonl", ALPACA[15:])
    got = _load(str(tmp_path), tok, val_set_size=0.5)
    assert (len(got.train), len(got.valid)) == (15, 5)
    only_valid = _load([{"path": str(tmp_path), "split": "validation"}], tok)
    assert len(only_valid.train) == 5


def test_tokenization_is_cached_and_reused(tmp_path, tok, monkeypatch):
    import lowbit.data.table as table

    f = _jsonl(tmp_path / "chat.jsonl", CHAT)
    first = _all(_load(str(f), tok).train)
    monkeypatch.setattr(table, "tokenize_record", lambda *a, **k: pytest.fail("tokenized again"))
    assert _all(_load(str(f), tok).train) == first


def test_a_changed_setting_tokenizes_again(tmp_path, tok):
    f = _jsonl(tmp_path / "chat.jsonl", CHAT)
    longest = max(_load(str(f), tok).train.lengths)
    assert max(_load(str(f), tok, sequence_len=longest - 1).train.lengths) == longest - 1


def test_packed_rows_from_a_token_table(tmp_path, tok):
    from lowbit.data.packing import PackedBatches

    f = _jsonl(tmp_path / "chat.jsonl", CHAT)
    table = _load(str(f), tok).train
    packed = PackedBatches(table, 2, tok.pad_token_id, 64)
    assert sorted(i for row in packed.rows for i in row) == list(range(len(table)))
    b = packed.batch(packed.order(0)[0])
    assert int(b["tokens"]) == sum(int(table.lengths[i]) for r in packed.order(0)[0] for i in packed.rows[r])
    assert (b["labels"] != IGNORE).any()


@pytest.mark.parametrize("name,content,entry,message", [
    ("bad.jsonl", '{"messages": []}\n\n{"text": \n', {}, r"bad\.jsonl:3: malformed JSON line"),
    ("miss.jsonl", json.dumps(ALPACA[0]) + "\n\n" + json.dumps({"instruction": "x"}) + "\n", {"type": "alpaca"},
     r"miss\.jsonl:3: alpaca record is missing field 'output'"),
    ("types.jsonl", json.dumps(ALPACA[0]) + "\n" + json.dumps({**ALPACA[1], "output": ["x"]}) + "\n",
     {"type": "alpaca"}, r"types\.jsonl"),
    ("sg.jsonl", json.dumps({"conversations": [{"from": "robot", "value": "hi"}]}) + "\n", {"type": "sharegpt"},
     r"sg\.jsonl:1: conversations\[0\]\.from: unknown speaker 'robot'"),
    ("unknown.txt", "hello\n", {}, r"unknown\.txt: unknown data file type"),
    ("empty.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", {},
     r"empty\.jsonl:1: no usable samples in all 1 records; this one: it has nothing to learn"),
])
def test_bad_files_get_one_line_naming_file_line_and_field(tmp_path, tok, name, content, entry, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LowbitError, match=message) as e:
        _load([{"path": str(tmp_path / name), **entry}], tok)
    assert "\n" not in str(e.value)


def test_bad_parquet_and_csv_rows_are_named(tmp_path, tok):
    import pandas as pd

    rows = ALPACA[:3] + [{"instruction": "x", "input": "", "output": None}]
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(LowbitError, match=r"a\.parquet: row 4: alpaca record is missing field 'output'"):
        _load([{"path": str(tmp_path / "a.parquet"), "type": "alpaca"}], tok)
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    with pytest.raises(LowbitError, match=r"a\.csv: row 4: alpaca record is missing field 'output'"):
        _load([{"path": str(tmp_path / "a.csv"), "type": "alpaca"}], tok)
    from lowbit.data.builtin import BUILTIN_DATASETS

    missing = r"datasets\[0\]: data not found: nowhere\.jsonl \(a \.jsonl.*one of: " + \
        re.escape(", ".join(BUILTIN_DATASETS)) + r"\)$"
    with pytest.raises(LowbitError, match=missing):
        _load([{"path": "nowhere.jsonl"}], tok)
    with pytest.raises(LowbitError, match=r"data not found: tatsu-lab/alpaca .* hub data sets are not fetched"):
        _load([{"path": "tatsu-lab/alpaca", "type": "alpaca"}], tok)


def test_errors_from_tokenizing_processes_still_name_the_line(tmp_path, tok):
    rows = [json.dumps(r) for r in ALPACA * 3] + [json.dumps({"instruction": "x", "input": ""})] + \
        [json.dumps(r) for r in ALPACA]
    (tmp_path / "many.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(LowbitError, match=r"many\.jsonl:61: alpaca record is missing field 'output'") as e:
        _load([{"path": str(tmp_path / "many.jsonl"), "type": "alpaca"}], tok, processes=2)
    assert "\n" not in str(e.value)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in ALPACA * 4) + "\n")
    want = tokenize_records([Record(r, "x") for r in ALPACA * 4], tok).samples
    assert _all(_load([{"path": str(good), "type": "alpaca"}], tok, processes=2).train) == want
