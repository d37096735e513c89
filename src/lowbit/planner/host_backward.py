"""What a training step on the CPU holds beyond the tensors it saves: backward's transients (activation gradients,
a recomputed layer's temporaries) and the freed memory glibc's heap keeps until training trims it
(training/host_memory.py). Measured, not derived; ``layer`` is one decoder layer's saved activations.

Without gradient checkpointing (bench/plan_validate.py: bare training loops of a tiny model and SmolLM2-135M)::

    0.2 × the saved activations + TRIM_SLACK_BYTES / 2    steps whose hidden states reach TRIM_MIN_BYTES (trimmed)
    1.2 × the saved activations                           shorter steps

With it (bench/long_context.py's worker: SmolLM2-135M, one row of 2,048–106,496 tokens, tiled MLP, compiled
layers; ten float32 steps on a 2-core AVX2 CPU, six bfloat16 ones on AMX; one min–max fit, worst error 6.4 % of
the step's peak)::

    max(238 MiB, 1.90 × layer + 104 MiB)    a layer's hidden states under 32 MiB: freed blocks wait in the heap
    max(238 MiB, 0.72 × layer + 140 MiB)    from 32 MiB (glibc's largest mmap threshold): each block is mapped
                                            on its own and handed back when freed
    + 132 MiB with offload_disk             (measured beside plain checkpointing; the cause not isolated)

never more than without checkpointing (a model of few layers). The floor is what the runtime and the heap keep at
short lengths: from 2,048 to 5,120 tokens the steps sat 216–291 MiB above the saved tensors whatever the length
(an eager run too: 259 MiB at 2,048). The fit before it — 3.2 layers + half the trim slack — held for bfloat16
from 8,192 tokens, planned 15–21 % low below that and 17–22 % high in float32.
"""

from __future__ import annotations

from ..io.allocator import TRIM_MIN_BYTES, TRIM_SLACK_BYTES

__all__ = ["host_backward_bytes", "GLIBC_MMAP_MAX"]

GLIBC_MMAP_MAX = 32 << 20  # glibc (64-bit) serves blocks from this size up with mmap, whatever its dynamic threshold
CHECKPOINTED_FLOOR = 238 << 20
CHECKPOINTED_HEAP = (1.90, 104 << 20)  # (per layer's activations, constant) under GLIBC_MMAP_MAX hidden states
CHECKPOINTED_MMAP = (0.72, 140 << 20)  # ... from it
DISK_EXTRA = 132 << 20


def host_backward_bytes(layer: float, act_without_checkpointing: float, checkpointing, hidden_bytes: float) -> int:
    """The CPU's backward-and-allocator bytes (see the module docstring): ``layer`` one decoder layer's saved
    activations, ``act_without_checkpointing`` every layer's, ``hidden_bytes`` one layer's output (all rows)."""
    trimmed = hidden_bytes >= TRIM_MIN_BYTES
    without = (0.2 if trimmed else 1.2) * act_without_checkpointing + trimmed * TRIM_SLACK_BYTES // 2
    if not checkpointing:
        return int(without)
    k, c = CHECKPOINTED_MMAP if hidden_bytes >= GLIBC_MMAP_MAX else CHECKPOINTED_HEAP
    held = min(max(CHECKPOINTED_FLOOR, k * layer + c), without)
    return int(held + DISK_EXTRA * (checkpointing == "offload_disk"))
