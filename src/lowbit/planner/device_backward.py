"""What a checkpointed training step on a GPU holds beyond the tensors it saves: the transients of one decoder
layer's backward. Simulated, not measured (no GPU has been lent): bench/device_memory.py runs lowbit's own eager
step on fake tensors and sums the bytes of every storage while it lives, FlashAttention-2's backward workspace
included (Llama-3.1-8B and Llama-2-7B shapes, bfloat16, checkpointing offload and true, tiled and untiled MLP,
2,048–131,072 tokens)::

    max(4.25 × shard_tokens × i × 4 B,  1.3 × tokens × h × 4 B)

the larger of two phases: the MLP's backward over one shard of the row (nn/fused.py's SwiGLU backward computes in
float32, in place: ≈4 float32 intermediates of the shard and its bfloat16 outputs) and the norms' backward over the
whole row (≈1.3 float32 hidden states beside the saved tensors). Before those backwards worked in place (2026-12-03)
the same rows needed 7.25 and 2.3. ``shard_tokens`` is tokens ÷ tiled_mlp's shards (the whole row untiled). Over
the simulated rows it is 0–0.6 GiB above the simulation, never below.

What the simulation cannot see is added by the caller as estimates: the caching allocator's rounding and
fragmentation (5 % of the plan) and the CUDA context (framework_overhead).
"""

from __future__ import annotations

__all__ = ["device_backward_bytes"]

MLP_SHARD_FLOAT32 = 4.25  # float32 intermediates of one MLP shard alive in its backward
NORM_FLOAT32 = 1.3  # float32 hidden states alive in a norm's backward, beyond the saved tensors


def device_backward_bytes(tokens: int, hidden: int, intermediate: float, shards: int) -> int:
    """The GPU's checkpointed backward transients (see the module docstring) for ``tokens`` tokens in a step."""
    shard_tokens = -(-tokens // max(shards, 1))
    return int(max(MLP_SHARD_FLOAT32 * shard_tokens * intermediate * 4, NORM_FLOAT32 * tokens * hidden * 4))
