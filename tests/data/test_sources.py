"""``datasets:`` entries: the string form, Axolotl's list of mappings, and one-line errors naming the entry."""

import pytest

from lowbit.data.sources import parse_sources
from lowbit.errors import LowbitError
from lowbit.training.config import TrainConfig


def test_string_and_axolotl_forms():
    (one,) = parse_sources("chatterbot")
    assert (one.path, one.fmt, one.weight, one.limit) == ("chatterbot", "auto", 1.0, None)
    a, b, c = parse_sources([
        {"path": "data/train.jsonl", "type": "chat_template", "field_messages": "conversations",
         "message_property_mappings": {"role": "from", "content": "value"}},
        {"path": "more.parquet", "type": "alpaca", "split": "train", "weight": 0.5, "limit": 10},
        "plain.jsonl"], default_fmt="text")
    assert (a.fmt, a.fields["field_messages"], a.fields["message_property_mappings"]["role"]) == \
        ("chat", "conversations", "from")
    assert (b.fmt, b.split, b.weight, b.limit) == ("alpaca", "train", 0.5, 10)
    assert (c.path, c.fmt) == ("plain.jsonl", "text")
    assert [s.fmt for s in parse_sources([{"path": "x", "type": t} for t in
                                          ("sharegpt", "completion", "pretrain", "input_output", "completions")])] == \
        ["sharegpt", "text", "text", "input_output", "completions"]


@pytest.mark.parametrize("entry,message", [
    ({"path": "x", "typ": "alpaca"}, "datasets[0]: unknown key 'typ' — did you mean 'type'?"),
    ({"path": "x", "type": "alpacca"}, "datasets[0].type: unknown 'alpacca'"),
    ({"type": "alpaca"}, "datasets[0].path: a file, folder or built-in name is needed"),
    ({"path": "x", "weight": 0}, "datasets[0].weight: expects a number > 0"),
    ({"path": "x", "limit": 1.5}, "datasets[0].limit: expects an integer > 0"),
    ({"path": "x", "split": "dev"}, "datasets[0].split: expects train, valid"),
    ({"path": "x", "message_property_mappings": "from"}, "datasets[0].message_property_mappings: expects a mapping"),
    (3, "datasets[0]: expects a path, a built-in name or a mapping"),
])
def test_bad_entries_name_the_entry_and_key(entry, message):
    with pytest.raises(LowbitError, match="^" + message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_sources([entry])


def test_config_checks_datasets_before_anything_loads():
    with pytest.raises(LowbitError, match=r"^config: datasets\[1\]\.type: unknown 'chatml'"):
        TrainConfig(datasets=["chatterbot", {"path": "a.jsonl", "type": "chatml"}]).validate()


def test_axolotl_local_file_spellings():
    (a,) = parse_sources([{"path": "json", "data_files": "data/train.jsonl", "type": "alpaca"}])
    assert (a.path, a.ds_type, a.fmt) == ("data/train.jsonl", "json", "alpaca")
    (b,) = parse_sources([{"path": "parquet", "data_files": ["x.parquet"], "chat_template": "tokenizer_default",
                           "train_on_eos": "turn"}])
    assert (b.path, b.ds_type) == ("x.parquet", "parquet")
    with pytest.raises(LowbitError, match=r"datasets\[0\]\.data_files: one file per entry"):
        parse_sources([{"path": "json", "data_files": ["a.jsonl", "b.jsonl"]}])
    (c,) = parse_sources([{"path": "a.jsonl", "type": "sharegpt", "conversation": "chatml"}])
    assert c.fields["chat_template"] == "chatml"  # older Axolotl's name for the entry's template
    with pytest.raises(LowbitError, match=r"datasets\[0\]\.chat_template: unknown template 'vicuna_v1.1'"):
        parse_sources([{"path": "a.jsonl", "type": "sharegpt", "conversation": "vicuna_v1.1"}])
    with pytest.raises(LowbitError, match=r"datasets\[0\]\.train_on_eos: lowbit learns each trained turn"):
        parse_sources([{"path": "a.jsonl", "type": "sharegpt", "train_on_eos": "all"}])
