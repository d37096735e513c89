"""Attention over packed rows without an L×L mask: each document of a row attends causally to itself alone.

    row = [d₁ | d₂ | … | dₖ]   (position_ids restart at 0 where a document starts)
    out[dᵢ] = SDPA(q[dᵢ], k[dᵢ], v[dᵢ], is_causal=True)        for each document, rows one by one

This equals attention under transformers' block-diagonal packed mask (a query sees exactly the earlier keys of its
own document), but no mask tensor is built, so PyTorch's flash kernel runs (O(L) memory in forward and backward,
on the CPU and on a GPU) instead of the masked kernel over a dense [L, L] mask (a 65,536-token row: 4 GiB of
booleans); a sliding-window layer masks only a document longer than its window.

It is registered with transformers as the attention implementation ``"lowbit_sdpa"``; outside a packed
forward (``packed_rows()``) it is transformers' SDPA, mask and all (padding, caches, sliding windows), unchanged.

The documents are read from the ``position_ids`` transformers hands each attention layer (also when a checkpointed
layer is recomputed in backward). A model whose attention layers are not handed them cannot tell documents apart:
its packed forward stops with an error instead of letting documents see each other — ``use_document_attention``
probes a model before switching it, so such a model keeps transformers' attention.
"""

from __future__ import annotations

import contextlib

import torch

from ..dtypes import autocast
from ..errors import LowbitError
from .causal_attention import causal_attention, suits

__all__ = ["NAME", "use_document_attention", "packed_rows", "recompute_contexts", "document_spans",
           "document_attention"]

NAME = "lowbit_sdpa"
# whether a packed forward is running: a plain flag of the process (training runs one forward at a time), because
# compiled layers read it too and torch.compile reads a module flag (a guard: packed and unpacked get their own
# graphs) but not a ContextVar
_PACKED = [False]
_spans_cache: list = [None, None]  # [position_ids tensor, its spans]: every layer of one forward shares them


@contextlib.contextmanager
def packed_rows():
    """Within it, a model using ``"lowbit_sdpa"`` gets no mask for an unpadded batch: the attention splits its rows
    into documents at the position restarts."""
    with _packed_as(True):
        yield


def recompute_contexts():
    """``context_fn`` for ``torch.utils.checkpoint``: a checkpointed layer is recomputed in backward (outside
    ``packed_rows()``) with the packed flag its forward had, so both take the same attention path."""
    return contextlib.nullcontext(), _packed_as(_PACKED[0])


@contextlib.contextmanager
def _packed_as(flag: bool):
    was, _PACKED[0] = _PACKED[0], flag
    try:
        yield
    finally:
        _PACKED[0] = was


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each document: a new one starts wherever a position is not its predecessor + 1."""
    pos = position_ids.detach().to("cpu")
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    width = pos.shape[1]
    out = []
    for row in starts:
        s = row.nonzero().flatten().tolist()
        out.append(list(zip(s, [*s[1:], width])))
    return out


def _spans(position_ids: torch.Tensor, rows: int):
    if _spans_cache[0] is not position_ids:
        _spans_cache[:] = [position_ids, document_spans(position_ids.expand(rows, -1))]
    return _spans_cache[1]


def document_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: ``query`` [B, H, L, D], ``key``/``value`` [B, Hkv, L, D] → ([B, L, H, D],
    None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    asked = kwargs.pop("is_causal", None)
    causal = asked if asked is not None else getattr(module, "is_causal", True)  # a vision tower's is not
    if attention_mask is not None or query.shape[2] != key.shape[2] or query.shape[2] < 2 or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **({} if asked is None else {"is_causal": asked}),
                                      **kwargs)
    if position_ids is None and _PACKED[0]:
        raise LowbitError(f"sample_packing: this model's attention ({type(module).__name__}) is not given the "
                          "token positions, so packed documents cannot be kept apart; set sample_packing: false")
    window = kwargs.get("sliding_window")
    # eager: the documents from the positions whenever they are given (a checkpointed layer's recompute runs outside
    # packed_rows()); a compiled layer reads them in packed forwards only (its recomputes carry the flag:
    # recompute_contexts), because finding them breaks the graph
    if position_ids is not None and (_PACKED[0] or not torch.compiler.is_compiling()):
        spans = _spans(position_ids, query.shape[0])
        if not all(len(s) == 1 for s in spans) or window:
            return _document_rows(module, query, key, value, spans, dropout, scaling, kwargs)
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and suits(query, key, dropout):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return causal_attention(query, key, value, scale).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                  is_causal=True, **kwargs)


@torch.compiler.disable  # the documents are found from the positions' values: outside any compiled graph
def _document_rows(module, query, key, value, spans, dropout, scaling, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    rows = []
    for b, row in enumerate(spans):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                        _band(e - s, window, query.device), dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)[0]
                 for s, e in row]
        rows.append(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
    return torch.cat(rows, 0), None


def _band(n: int, window: int | None, device) -> torch.Tensor | None:
    """A sliding-window layer's mask for a document of ``n`` tokens (query q sees keys q − window < k ≤ q) — None
    (plain causal) when the document fits in the window."""
    if not window or n <= window:
        return None
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _mask(*args, **kwargs):
    """transformers' SDPA mask, except in a packed forward of an unpadded batch without a cache: no mask at all."""
    from transformers.masking_utils import sdpa_mask

    if _PACKED[0] and kwargs.get("attention_mask") is None and not kwargs.get("q_offset") and \
            not kwargs.get("kv_offset") and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, document_attention)
    AttentionMaskInterface.register(NAME, _mask)


def use_document_attention(model) -> bool:
    """Switch a model that uses transformers' SDPA attention to ``"lowbit_sdpa"`` if a packed probe (two documents
    of two tokens) gives the same logits both ways; whether it was switched. Models whose attention is not handed
    the positions, or that use the mask themselves (ALiBi), keep transformers' SDPA and its packed mask."""
    configs = [c for c in [model.config, *(getattr(model.config, k, None) for k in model.config.sub_configs)]
               if c is not None]
    if any(getattr(c, "_attn_implementation", None) != "sdpa" or getattr(c, "alibi", False) for c in configs):
        return False  # ALiBi (Falcon's alibi: true) adds its bias to the mask: not left to the probe to find out
    _register()
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % model.config.get_text_config().vocab_size
    pos = torch.tensor([[0, 1, 0, 1]], device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast_like(model):
            try:
                want = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
                _set(configs, NAME)
                with packed_rows():
                    got = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
                same = torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
            except Exception:  # any failure of the probe keeps transformers' attention
                same = False
    finally:
        model.train(was)
    if not same:
        _set(configs, "sdpa")
    return same


def _autocast_like(model):
    """The probe runs as training does: under autocast in the dtype the frozen weights compute in (trained float32
    parts, such as whole embeddings, then mix with them as they do in a step)."""
    dtype = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()), None)
    return autocast(dtype, next(model.parameters()).device.type)


def _set(configs, name: str) -> None:
    for c in configs:
        c._attn_implementation = name
