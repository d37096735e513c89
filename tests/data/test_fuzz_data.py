"""Fuzzed data files and records: each loads, or is refused in one line naming the file (and line)."""

import json

from fuzzing import file_bytes, json_values, loads_or_says_where
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.data import Record, load_records, tokenize_records

from tiny import tiny_tokenizer

TOK = tiny_tokenizer()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=file_bytes, suffix=st.sampled_from([".jsonl", ".json"]))
def test_any_bytes_as_a_data_file(tmp_path, data, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(data)
    recs = loads_or_says_where(lambda: load_records(path), str(path))
    assert recs is None or all(isinstance(r.data, dict) for r in recs)


@SETTINGS
@given(rows=st.lists(json_values, min_size=1, max_size=4), fmt=st.sampled_from(["auto", "text", "chat",
                                                                               "completions", "alpaca"]))
def test_any_records_through_the_formats(rows, fmt):
    recs = [Record(r if isinstance(r, dict) else {"value": r}, f"f.jsonl:{i + 1}") for i, r in enumerate(rows)]
    out = loads_or_says_where(lambda: tokenize_records(recs, TOK, fmt, sequence_len=64), "")
    if out is not None:
        assert all(len(ids) == len(labels) <= 64 for ids, labels in out.samples)


@SETTINGS
@given(msgs=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
                                             "content": st.text(max_size=30)}), min_size=1, max_size=5))
def test_any_conversation(msgs):
    rec = Record({"messages": msgs}, "chat.jsonl:7")
    loads_or_says_where(lambda: tokenize_records([rec], TOK, "chat", sequence_len=128), "chat.jsonl:7")


def test_a_malformed_line_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "cut' + "\n")
    loads_or_says_where(lambda: load_records(path), f"{path}:2")
