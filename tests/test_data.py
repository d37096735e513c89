"""Data formats → token ids and labels, checked token by token; bad input; built-in data sets."""

import json

import pytest
import torch

from lowbit.data import IGNORE, Batches, collate, load_records, load_splits, tokenize_records
from lowbit.models import LowbitError
from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _write(path, recs):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def _one(tok, rec, **kw):
    from lowbit.data import Record

    t = tokenize_records([Record(rec, "x:1")], tok, **kw)
    return t.samples[0], t


def _ids(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def test_text_learns_everything_and_eos(tok):
    (ids, labels), t = _one(tok, {"text": "hello how are you"})
    assert t.fmt == "text"
    assert ids == _ids(tok, "hello how are you") + [tok.eos_token_id]
    assert labels == ids


def test_completions_mask_prompt_token_by_token(tok):
    (ids, labels), t = _one(tok, {"prompt": "what is the capital of france? ", "completion": "paris"})
    p, c = _ids(tok, "what is the capital of france? "), _ids(tok, "paris")
    assert t.fmt == "completions"
    assert ids == p + c + [tok.eos_token_id]
    assert labels == [IGNORE] * len(p) + c + [tok.eos_token_id]


def test_alpaca_masks_the_prompt(tok):
    (ids, labels), t = _one(tok, {"instruction": "say hi", "input": "", "output": "hi"})
    out = _ids(tok, "hi")
    assert t.fmt == "alpaca"
    assert labels[-len(out) - 1:] == out + [tok.eos_token_id]
    assert all(x == IGNORE for x in labels[: -len(out) - 1])
    assert "### Instruction:\nsay hi" in tok.decode(ids)


def test_chat_learns_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "capital of france?"},
            {"role": "assistant", "content": "paris"}]
    (ids, labels), t = _one(tok, {"messages": msgs})
    assert t.fmt == "chat"
    assert tok.decode(ids) == tok.apply_chat_template(msgs, tokenize=False)
    learned = [i for i, y in enumerate(labels) if y != IGNORE]
    spans, cur = [], [learned[0]]
    for i in learned[1:]:
        if i == cur[-1] + 1:
            cur.append(i)
        else:
            spans.append(cur)
            cur = [i]
    spans.append(cur)
    texts = [tok.decode([ids[i] for i in s]) for s in spans]
    assert texts == ["hi there<|im_end|>\n", "paris<|im_end|>\n"]
    assert [labels[i] for i in learned] == [ids[i] for i in learned]


def test_train_on_inputs_learns_prompt_too(tok):
    (ids, labels), _ = _one(tok, {"prompt": "hello ", "completion": "you"}, train_on_inputs=True)
    assert labels == ids


def test_padding_masked_by_position_so_eos_as_pad_is_learned(tok):
    assert tok.pad_token_id == tok.eos_token_id
    a, _ = _one(tok, {"text": "hello"})
    b, _ = _one(tok, {"text": "hello how are you today"})
    batch = collate([a, b], tok.pad_token_id)
    row = batch["labels"][0]
    n = len(a[0])
    assert row[n - 1] == tok.eos_token_id, "the EOS must stay learned although it equals the pad id"
    assert torch.all(row[n:] == IGNORE) and torch.all(batch["attention_mask"][0, n:] == 0)


def test_truncation_and_dropping(tok):
    from lowbit.data import Record

    recs = [Record({"prompt": "what is the capital of france " * 5, "completion": "paris"}, "f:1"),
            Record({"prompt": "hi ", "completion": "hello how are you today " * 3}, "f:2")]
    t = tokenize_records(recs, tok, sequence_len=12)
    assert t.dropped == 1 and t.truncated == 2 and len(t.samples) == 1
    assert len(t.samples[0][0]) == 12
    with pytest.raises(LowbitError, match="sequence_len=4 shorter than the prompts"):
        tokenize_records(recs[:1], tok, sequence_len=4)


def test_bad_records(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(LowbitError, match=r"bad\.jsonl:2: malformed JSON"):
        load_records(bad)
    recs = load_records(_write(tmp_path / "m.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}]))
    with pytest.raises(LowbitError, match=r"m\.jsonl:2: completions record is missing field 'completion'"):
        tokenize_records(recs, tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LowbitError, match="empty"):
        load_records(tmp_path / "empty.jsonl")
    recs = load_records(_write(tmp_path / "u.jsonl", [{"foo": 1}]))
    with pytest.raises(LowbitError, match="cannot tell the format"):
        tokenize_records(recs, tok)
    recs = load_records(_write(tmp_path / "c.jsonl", [{"messages": [{"role": "user"}]}]))
    with pytest.raises(LowbitError, match=r"c\.jsonl:1: messages\[0\]"):
        tokenize_records(recs, tok)
    with pytest.raises(LowbitError, match="unknown data format"):
        tokenize_records(recs, tok, fmt="sharegpt")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LowbitError, match="not UTF-8"):
        load_records(tmp_path / "bin.jsonl")


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


def test_batches_are_deterministic_and_cover_the_epoch(tok):
    samples = [([1] * (i % 7 + 1), [1] * (i % 7 + 1)) for i in range(50)]
    b = Batches(samples, 4, 0, seed=3)
    o1, o2 = b.order(0), b.order(0)
    assert o1 == o2 and b.order(1) != o1
    assert sorted(i for batch in o1 for i in batch) == list(range(50))


@pytest.mark.parametrize("name,minimum", [("chatterbot", 1000), ("chitchat", 3500)])
def test_builtin_datasets(name, minimum):
    tr, va = load_splits(name, 0.05)
    assert len(tr) + len(va) >= minimum
    msgs = tr[0].data["messages"]
    assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant"
