"""Sample packing: rows hold every sample once within ``sequence_len``; a packed batch's loss equals the
unpacked samples' token-weighted loss (fp32, rtol 1e-4), and attention never crosses a sample boundary."""

import pytest
import torch

from lowbit.data.batching import collate
from lowbit.data.formats import IGNORE
from lowbit.data.packing import PackedBatches, collate_packed, pack_rows
from lowbit.errors import LowbitError
from lowbit.training.loss import lm_loss, tokens_in

from tiny import save_tiny


def _samples(n, seed=0, lo=3, hi=40, vocab=256):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(0, vocab, (t,), generator=g).tolist()
        masked = int(torch.randint(0, t - 1, (1,), generator=g))  # a prompt part not learned
        out.append((ids, [IGNORE] * masked + ids[masked:]))
    return out


def test_rows_hold_every_sample_once_and_fit():
    lengths = [len(s[0]) for s in _samples(500)]
    rows = pack_rows(lengths, 64, seed=1)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= -(-sum(lengths) // 64) * 1.1  # best-fit decreasing: within 10 % of the bound
    assert rows == pack_rows(lengths, 64, seed=1)
    with pytest.raises(LowbitError, match="does not fit sequence_len=8"):
        pack_rows([9], 8)


def test_order_is_a_function_of_seed_and_epoch():
    s = _samples(100)
    a, b = PackedBatches(s, 3, 0, 64, seed=5), PackedBatches(s, 3, 0, 64, seed=5)
    assert a.order(2) == b.order(2) and a.order(1) != a.order(2)
    assert sorted(r for batch in a.order(0) for r in batch) == list(range(len(a.rows)))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_packed_loss_equals_unpacked_token_weighted_loss(tmp_path, arch):
    model = save_tiny(tmp_path, arch).float().eval()
    samples = _samples(12, seed=2)
    rows = pack_rows([len(s[0]) for s in samples], 96, seed=0)
    packed = collate_packed([[samples[i] for i in r] for r in rows], pad_id=0)
    assert len(rows) < len(samples) and tokens_in(packed) == sum(len(s[0]) for s in samples)
    with torch.no_grad():
        got, n = lm_loss(model, packed)
        want = [lm_loss(model, collate([s], 0)) for s in samples]
    assert n == sum(k for _, k in want)
    torch.testing.assert_close(got, sum(x for x, _ in want), rtol=1e-4, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_attention_never_crosses_a_sample_boundary(tmp_path, arch):
    model = save_tiny(tmp_path, arch).float().eval()
    samples = _samples(3, seed=4, lo=10, hi=20)
    batch = collate_packed([samples], pad_id=0)
    changed = [list(s) for s in samples]
    changed[1] = ([(t + 7) % 256 for t in samples[1][0]], samples[1][1])
    other = collate_packed([changed], pad_id=0)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        b = model(input_ids=other["input_ids"], position_ids=other["position_ids"], use_cache=False).logits[0]
    n0, n1 = len(samples[0][0]), len(samples[1][0])
    torch.testing.assert_close(a[:n0], b[:n0], rtol=0, atol=0)          # before: untouched
    torch.testing.assert_close(a[n0 + n1:], b[n0 + n1:], rtol=0, atol=0)  # after: untouched
    assert not torch.equal(a[n0:n0 + n1], b[n0:n0 + n1])                 # the perturbed sample itself changed
