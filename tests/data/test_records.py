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


@pytest.mark.parametrize("name,tokens,count", [("passkey-2k", 2048, 200), ("passkey-8k", 8192, 100)])
def test_passkey_documents_hide_their_key_and_fit_the_length(name, tokens, count):
    """Each document holds "The pass key is N." once, at a seeded depth, ends with the question, and fits
    ``sequence_len`` = the name's length in SmolLM2's tokens (chat template included); the answer is N."""
    import re

    from lowbit.data.builtin import BUILTIN_DATASETS, PASSKEY_QUESTION
    from lowbit.io.tokenizer import load_tokenizer

    recs = BUILTIN_DATASETS[name]()
    assert len(recs) == count and recs[0].data == BUILTIN_DATASETS[name]()[0].data  # deterministic
    tok = load_tokenizer("smollm2-135m")
    depths = []
    for r in recs[:20]:
        user, answer = r.data["messages"][0]["content"], r.data["messages"][1]["content"]
        assert re.findall(r"The pass key is (\d{5})\.", user) == [answer] == [r.data["answer"]]
        assert user.endswith(PASSKEY_QUESTION)
        n = len(tok.apply_chat_template(r.data["messages"], tokenize=True, return_dict=False))
        assert 0.6 * tokens < n <= tokens, n
        depths.append(r.data["depth"])
    assert min(depths) < 0.3 and max(depths) > 0.7  # the key is hidden all through the documents
