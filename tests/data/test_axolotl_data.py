"""The data keys of Axolotl configs: split slices, length limits, deduplication, file order, padding multiples,
held-out files, speaker names, thinking fields, system messages and per-entry chat templates."""

import json

import pytest

from lowbit.data.formats import IGNORE
from lowbit.errors import LowbitError
from lowbit.training.config import TrainConfig
from lowbit.training.data import load_data

from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _chat(path, n, answer=lambda i: "paris", user=lambda i: f"capital of france {i}", key="messages", roles=None,
          extra=None):
    roles = roles or ("user", "assistant")
    rows = [{key: [{"role": roles[0], "content": user(i)}, {"role": roles[1], "content": answer(i),
                                                              **(extra or {})}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(tok, **kw):
    cfg = TrainConfig(**{"val_set_size": 0, "micro_batch_size": 4, "sequence_len": 64, **kw}).validate()
    return load_data(cfg, tok, log=lambda *a: None)


def test_split_slices_as_datasets_spells_them(tmp_path, tok):
    f = _chat(tmp_path / "d.jsonl", 200)
    for split, n in (("train[:10%]", 20), ("train[:25]", 25), ("train[150:]", 50)):
        batches, _ = _load(tok, datasets=[{"path": f, "type": "chat_template", "split": split}])
        assert len(batches.samples) == n, split
    with pytest.raises(LowbitError, match=r"datasets\[0\]\.split: expects train, valid, validation or test"):
        _load(tok, datasets=[{"path": f, "split": "train[:10%"}])


def test_length_limits(tmp_path, tok):
    f = _chat(tmp_path / "d.jsonl", 20, answer=lambda i: "paris " * (40 if i % 2 else 1), user=lambda i: "hello")
    batches, _ = _load(tok, datasets=f, excess_length_strategy="drop")
    assert len(batches.samples) == 10 and max(batches.lengths) <= 64
    batches, _ = _load(tok, datasets=f)  # lowbit's default: truncate
    assert len(batches.samples) == 20 and max(batches.lengths) == 64
    with pytest.raises(LowbitError, match=r"d\.jsonl:2: \d+ tokens, longer than sequence_len=64 "
                                          r"\(excess_length_strategy: raise\)"):
        _load(tok, datasets=f, excess_length_strategy="raise")
    short = min(batches.lengths)
    batches, _ = _load(tok, datasets=f, min_sample_len=short + 1)
    assert len(batches.samples) == 10


def test_deduplication_curriculum_and_padding(tmp_path, tok):
    f = _chat(tmp_path / "d.jsonl", 30, user=lambda i: f"capital {i % 10}" + " of france" * (i % 10 % 3))
    batches, _ = _load(tok, datasets=f, dataset_exact_deduplication=True)
    assert len(batches.samples) == 10
    batches, _ = _load(tok, datasets=f, curriculum_sampling=True)
    assert batches.order(0) == batches.order(1) == [list(range(i, min(i + 4, 30))) for i in range(0, 30, 4)]
    batches, _ = _load(tok, datasets=f, pad_to_multiple_of=16)
    assert all(batches.batch(k)["input_ids"].shape[1] % 16 == 0 for k in batches.order(0))


def test_test_datasets_and_eval_batch_size(tmp_path, tok):
    train, valid = _chat(tmp_path / "t.jsonl", 12), _chat(tmp_path / "v.jsonl", 5)
    batches, held = _load(tok, datasets=train, test_datasets=[{"path": valid, "type": "chat_template"}],
                          val_set_size=0.5, eval_batch_size=2)
    assert len(batches.samples) == 12 and len(held.samples) == 5 and held.mb == 2


def test_speakers_thinking_and_system_messages(tmp_path, tok):
    f = _chat(tmp_path / "d.jsonl", 4, key="conversations", roles=("human", "gpt"), extra={"thinking": "hmm"})
    entry = {"path": f, "type": "chat_template", "field_messages": "conversations", "field_thinking": "thinking",
             "template_thinking_key": "reasoning_content", "chat_template": "qwen3"}
    batches, _ = _load(tok, datasets=[entry], default_system_message="be brief", sequence_len=256)
    ids, labels = batches.samples[0]
    text = tok.decode(ids)
    assert "<|im_start|>system\nbe brief<|im_end|>" in text and "<think>\nhmm\n</think>" in text
    learned = tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])
    assert learned.startswith("<think>") and "capital" not in learned  # human → user (masked), gpt → assistant
    kw, _ = _load(tok, datasets=[{**entry, "field_thinking": None}], chat_template_kwargs={"enable_thinking": False},
                  sequence_len=256)
    ids, labels = kw.samples[0]  # the empty thinking block is part of the generation prompt, as at inference
    assert "assistant\n<think>\n\n</think>\n\nparis" in tok.decode(ids)
    assert tok.decode([t for t, y in zip(ids, labels) if y != IGNORE]).startswith("paris")
    g = tmp_path / "s.jsonl"
    g.write_text(json.dumps({"messages": [{"role": "system", "content": "old rules"}, {"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a"}]}) + "\n")
    dropped, _ = _load(tok, datasets=[{"path": str(g), "type": "chat_template", "drop_system_message": True}],
                       sequence_len=256)
    assert "old rules" not in tok.decode(dropped.samples[0][0])
