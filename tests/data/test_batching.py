"""Batches: padding masked by position, a deterministic epoch order."""


import pytest
import torch

from lowbit.data import IGNORE, Batches, collate, tokenize_records

from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _one(tok, rec, **kw):
    from lowbit.data import Record

    t = tokenize_records([Record(rec, "x:1")], tok, **kw)
    return t.samples[0], t


def test_padding_masked_by_position_so_eos_as_pad_is_learned(tok):
    assert tok.pad_token_id == tok.eos_token_id
    a, _ = _one(tok, {"text": "hello"})
    b, _ = _one(tok, {"text": "hello how are you today"})
    batch = collate([a, b], tok.pad_token_id)
    row = batch["labels"][0]
    n = len(a[0])
    assert row[n - 1] == tok.eos_token_id, "the EOS must stay learned although it equals the pad id"
    assert torch.all(row[n:] == IGNORE) and torch.all(batch["attention_mask"][0, n:] == 0)


def test_batches_are_deterministic_and_cover_the_epoch(tok):
    samples = [([1] * (i % 7 + 1), [1] * (i % 7 + 1)) for i in range(50)]
    b = Batches(samples, 4, 0, seed=3)
    o1, o2 = b.order(0), b.order(0)
    assert o1 == o2 and b.order(1) != o1
    assert sorted(i for batch in o1 for i in batch) == list(range(50))
