"""Preference records → prompt / chosen / rejected token ids, in every shape lowbit reads."""

import json

import pytest

from lowbit.data.preference import preference_row
from lowbit.data.preference_batches import PreferenceBatches
from lowbit.data.records import Record
from lowbit.data.sources import parse_sources
from lowbit.data.table import source_tables
from lowbit.errors import LowbitError

from tiny import tiny_tokenizer

Q, A, B = "what is the capital of france", "paris", "hello"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _text(tok, row):
    return tok.decode(row["prompt_ids"]), tok.decode(row["chosen_ids"]), tok.decode(row["rejected_ids"])


def _chat(tok, messages, gen=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("fmt,data,opts", [
    ("pairs", {"prompt": [{"role": "user", "content": Q}], "chosen": [{"role": "assistant", "content": A}],
               "rejected": [{"role": "assistant", "content": B}]}, {}),
    ("pairs", {"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
               "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]}, {}),
    ("pairs", {"prompt": Q, "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
               "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]}, {}),
    ("chat_template.default", {"conversation": [{"r": "user", "c": Q}], "good": {"r": "assistant", "c": A},
                               "bad": {"r": "assistant", "c": B}},
     {"field_messages": "conversation", "field_chosen": "good", "field_rejected": "bad",
      "message_property_mappings": {"role": "r", "content": "c"}}),
    ("chat_template.argilla", {"prompt": Q,
                               "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
                               "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]}, {}),
    ("chatml.intel", {"question": Q, "chosen": A, "rejected": B}, {}),
    ("chatml.argilla", {"instruction": Q, "chosen_response": A, "rejected_response": B}, {}),
    ("chatml.ultra", {"prompt": Q, "chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
                      "rejected": [{"role": "user", "content": Q}, {"role": "assistant", "content": B}]}, {}),
])
def test_every_paired_shape_renders_prompt_and_completions(tok, fmt, data, opts):
    row = preference_row(Record(data, "f.jsonl:1"), tok, fmt, 512, opts)
    prompt, chosen, rejected = _text(tok, row)
    assert prompt == _chat(tok, [{"role": "user", "content": Q}], gen=True)
    assert prompt + chosen == _chat(tok, [{"role": "user", "content": Q}, {"role": "assistant", "content": A}])
    assert prompt + rejected == _chat(tok, [{"role": "user", "content": Q}, {"role": "assistant", "content": B}])
    assert row["label"] and row["length"] > 0 and not row["truncated"]


def test_system_messages_strings_and_kto_examples(tok):
    row = preference_row(Record({"system": "be brief", "prompt": Q, "chosen": A, "rejected": B}, "x"), tok,
                         "chatml.prompt_pairs", 512, {})
    assert _text(tok, row)[0].startswith("<|im_start|>system\nbe brief<|im_end|>")
    s = preference_row(Record({"prompt": Q, "chosen": A, "rejected": B}, "x"), tok, "pairs", 512, {})
    assert _text(tok, s)[1:] == (A + "<|im_end|>", B + "<|im_end|>")  # plain strings: EOS appended, as TRL does
    k = preference_row(Record({"prompt": Q, "completion": A, "label": False}, "x"), tok, "unpaired", 512, {})
    assert k["rejected_ids"] == [] and k["label"] is False and tok.decode(k["chosen_ids"]) == A + "<|im_end|>"


def test_truncation_and_drops_are_counted(tok):
    long = " ".join([Q] * 20)
    rec = Record({"prompt": long, "chosen": A, "rejected": B}, "x")
    cut = preference_row(rec, tok, "pairs", 512, {"max_prompt_len": 10})
    assert len(cut["prompt_ids"]) == 10 and cut["truncated"]
    dropped = preference_row(rec, tok, "pairs", 16, {})
    assert dropped["length"] == 0 and "fills sequence_len=16" in dropped["why"]
    short = Record({"prompt": Q, "chosen": A, "rejected": " ".join([B] * 30)}, "x")
    assert preference_row(short, tok, "pairs", 40, {})["truncated"]
    assert "excess_length_strategy: drop" in preference_row(short, tok, "pairs", 40,
                                                            {"excess_length_strategy": "drop"})["why"]
    with pytest.raises(LowbitError, match="x: longer than sequence_len=40"):
        preference_row(short, tok, "pairs", 40, {"excess_length_strategy": "raise"})
    assert "min_sample_len" in preference_row(short, tok, "pairs", 512, {"min_sample_len": 1000})["why"]


@pytest.mark.parametrize("data,fmt,match", [
    ({"prompt": Q, "chosen": A}, "pairs", "missing field 'rejected'"),
    ({"prompt": Q, "completion": A, "label": "yes"}, "unpaired", "'label' must be true or false"),
    ({"chosen": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": B}]}, "pairs",
     "must share every message but the last"),
    ({"prompt": Q, "chosen": 3, "rejected": B}, "pairs", "'chosen' must be a string, a message"),
])
def test_bad_records_fail_in_one_line_naming_the_record(tok, data, fmt, match):
    with pytest.raises(LowbitError, match=match) as e:
        preference_row(Record(data, "f.jsonl:7"), tok, fmt, 512, {})
    assert str(e.value).startswith("f.jsonl:7") and "\n" not in str(e.value)


def test_files_are_read_and_cached_and_kto_unpairs_pairs(tok, tmp_path):
    rows = [{"prompt": f"{Q} {i}", "chosen": A, "rejected": B} for i in range(10)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = source_tables(parse_sources(str(path)), tok, 2, 0, 64, kind="preference")
    assert len(loaded.train) == 8 and len(loaded.valid) == 2 and loaded.formats == ["pairs"]
    again = source_tables(parse_sources(str(path)), tok, 2, 0, 64, kind="preference")  # from the cache
    assert again.train.row(0) == loaded.train.row(0)
    pairs = PreferenceBatches(loaded.train, 4, tok.pad_token_id, 64).batch([0, 1])
    assert pairs["input_ids"].shape[0] == 4 and pairs["units"] == 2
    kto = PreferenceBatches(loaded.train, 4, tok.pad_token_id, 64, kto=True)
    assert len(kto.samples) == 16  # each pair: its chosen (desirable) and its rejected (undesirable)
    b = kto.batch([0, 1, 2])
    assert b["desirable"].tolist() == [True, False, True] and b["kl"]["input_ids"].shape[0] == 3


def test_unpaired_examples_are_refused_for_paired_methods(tok, tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{Q} {i}", "completion": A, "label": i % 2 == 0}) + "\n"
                            for i in range(6)))
    loaded = source_tables(parse_sources(str(path)), tok, 0, 0, 64, kind="preference")
    assert len(PreferenceBatches(loaded.train, 2, tok.pad_token_id, 64, kto=True).samples) == 6
    with pytest.raises(LowbitError, match="unpaired examples .* train with rl: kto"):
        PreferenceBatches(loaded.train, 2, tok.pad_token_id, 64)


def test_exact_deduplication_of_pairs(tok, tmp_path):
    from lowbit.data.table import deduplicate

    path = tmp_path / "dup.jsonl"
    rows = [{"prompt": Q, "chosen": A, "rejected": B}] * 3 + [{"prompt": Q, "chosen": B, "rejected": A}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = source_tables(parse_sources(str(path)), tok, 0, 0, 64, kind="preference").train
    assert len(table) == 4 and len(deduplicate(table)) == 2
