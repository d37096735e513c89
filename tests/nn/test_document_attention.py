"""Packed rows attended document by document: the same loss and gradients as the unpacked samples, no L×L mask
built, sliding windows kept, and models the probe finds unfit keep transformers' mask."""

import pytest
import torch

from lowbit.data.batching import collate
from lowbit.data.formats import IGNORE
from lowbit.data.packing import collate_packed, pack_rows
from lowbit.nn.document_attention import NAME, document_spans, use_document_attention
from lowbit.training.loss import lm_loss

from tiny import ARCHITECTURES, save_tiny


def _samples(n, seed, lo=10, hi=40, vocab=256):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(0, vocab, (t,), generator=g).tolist()
        out.append((ids, [IGNORE] * 2 + ids[2:]))
    return out


def test_spans_split_at_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_spans(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, _ = lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _falcon_takes_the_interface() -> bool:
    """Whether transformers' Falcon attention goes through its attention interface (5.25 on), where lowbit's
    document attention can take it; before, it called SDPA itself."""
    import inspect

    from transformers.models.falcon import modeling_falcon

    return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(modeling_falcon)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_loss_and_gradients_equal_transformers_packed_mask(tmp_path, arch, monkeypatch):
    """Against transformers' own packed path (its block-diagonal mask) on the same model: the loss and every
    gradient (the unpacked samples are the reference for the attention-only models in tests/data/test_packing.py;
    hybrid models' recurrent layers carry state across documents either way)."""
    model = save_tiny(tmp_path, arch).float().eval()  # eval: no dropout; gradients flow all the same
    samples = _samples(6, seed=2)  # documents longer than the sliding windows of gemma3 / mistral tiny configs
    rows = pack_rows([len(s[0]) for s in samples], 128, seed=0)
    packed = collate_packed([[samples[i] for i in r] for r in rows], pad_id=0)
    want, g_want = _loss_and_grads(model, packed)
    switched = use_document_attention(model)
    kept = ("gemma2", "granitemoehybrid") + (() if _falcon_takes_the_interface() else ("falcon",))
    assert switched == (arch not in kept), arch  # eager / no positions / Falcon's own SDPA (< 5.25)
    if switched:  # no dense mask is ever built for the packed batch
        import transformers.masking_utils as mu

        def refuse(*a, **k):
            raise AssertionError("a dense mask was built")
        monkeypatch.setattr(mu, "sdpa_mask", refuse)
        assert model.config._attn_implementation == NAME
    got, g_got = _loss_and_grads(model, packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-3, atol=1e-5, msg=k)
    monkeypatch.undo()
    if arch == "llama":  # and both equal the samples one by one
        unpacked = sum(lm_loss(model, collate([s], 0))[0] for s in samples)
        torch.testing.assert_close(got, unpacked.detach(), rtol=1e-5, atol=0)


def test_sliding_window_is_kept_inside_a_long_document(tmp_path):
    """gemma3's tiny config has a window of 16: a 40-token document must not see past it."""
    model = save_tiny(tmp_path, "gemma3_text").float().eval()
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(40), torch.arange(20)])[None]
    with torch.no_grad():
        want = torch.cat([model(input_ids=ids[:, :40], use_cache=False).logits,
                          model(input_ids=ids[:, 40:], use_cache=False).logits], 1)
        assert use_document_attention(model)
        from lowbit.nn.document_attention import packed_rows

        with packed_rows():
            got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_padded_and_cached_forwards_are_transformers_own(tmp_path):
    """Outside a packed forward the implementation is transformers' SDPA: left padding and a KV cache."""
    model = save_tiny(tmp_path, "llama").float().eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        assert use_document_attention(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
