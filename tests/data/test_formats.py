"""Data formats → token ids and labels, checked token by token; bad records."""

import json

import pytest

from lowbit.data import IGNORE, load_records, tokenize_records
from lowbit.errors import LowbitError

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
        tokenize_records(recs, tok, fmt="vicuna")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(LowbitError, match="not UTF-8"):
        load_records(tmp_path / "bin.jsonl")
