"""How many shards a tiled MLP cuts a sequence into (torch-free: the memory planner reads it too).

A shard's intermediates (≥ 3 × intermediate_size per token, plus LoRA's) should weigh about one hidden-size
activation of the whole sequence: ⌈4·intermediate / hidden⌉ shards (or ``num_shards``), never shards shorter than
``hidden`` tokens.
"""

from __future__ import annotations

import math

__all__ = ["shard_count", "AUTO_TILED_TOKENS", "tiles"]

AUTO_TILED_TOKENS = 8192  # tiled_mlp: auto tiles rows of this many tokens or more


def tiles(tiled_mlp, row_tokens: int) -> bool:
    """Whether ``tiled_mlp`` (true | false | "auto") tiles rows of ``row_tokens``."""
    return tiled_mlp is True or (tiled_mlp == "auto" and row_tokens >= AUTO_TILED_TOKENS)


def shard_count(tokens: int, hidden: int, intermediate: int, num_shards: int | None = None) -> int:
    """How many shards a sequence of ``tokens`` is cut into (see the module docstring)."""
    n = num_shards or math.ceil(4 * intermediate / hidden)
    return max(1, min(n, tokens // max(hidden, 1)))
