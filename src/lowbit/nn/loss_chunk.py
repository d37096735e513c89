"""How many tokens the chunked loss handles at a time (torch-free: the memory planner reads it too).

About ``LOSS_CHUNK_LOGITS`` logits exist at once (8M: ≈120 MB of transient float32 work), whatever the vocabulary.
"""

LOSS_CHUNK_LOGITS = 1 << 23


def loss_chunk_tokens(vocab: int) -> int:
    """Tokens per loss chunk for a vocabulary of ``vocab`` entries (at least 64)."""
    return max(64, LOSS_CHUNK_LOGITS // max(vocab, 1))
