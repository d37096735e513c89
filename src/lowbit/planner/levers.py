"""Which memory lever buys how many tokens: the longest ``sequence_len`` that fits, as configured and then with each
technique the run does not use yet switched on, one after the other (torch-free)::

    as configured                          gradient checkpointing off, MLP whole
    + gradient_checkpointing: true         decoder layers recomputed in backward: one layer's activations live
    + tiled_mlp: true                      the MLP's intermediates one sequence shard at a time
    + gradient_checkpointing: offload      (GPU) the layers' inputs wait in host memory
    + gradient_checkpointing: offload_disk (CPU) the layers' inputs wait in files (TMPDIR), out of host memory

Each row is ``memory.largest`` of the plan with the levers so far; packed rows never need an L×L mask
(``nn/document_attention.py``), so attention costs O(L) in every row.
"""

from __future__ import annotations

from .memory import largest

__all__ = ["LEVERS", "levers"]

LEVERS = (("gradient_checkpointing", True), ("tiled_mlp", True), ("gradient_checkpointing", "offload"),
          ("gradient_checkpointing", "offload_disk"))
_CHECKPOINTING = (True, "offload", "offload_disk")  # each keeps less than the one before it


def _on(settings: dict, key: str, value) -> bool:
    have = settings.get(key)
    if key == "gradient_checkpointing":
        return bool(have) and _CHECKPOINTING.index(have if have in _CHECKPOINTING else True) >= \
            _CHECKPOINTING.index(value)
    return have is True


def levers(model, device_memory, **settings) -> list[dict]:
    """[{"change": "as configured" | "key: value", "max_sequence_len": n}, …] for ``model`` on ``device_memory``
    (``settings``: ``plan``'s keyword arguments, as ``memory.config_settings`` gives them)."""
    rows = [{"change": "as configured", "max_sequence_len": largest(model, "sequence_len", device_memory, **settings)}]
    for key, value in LEVERS:
        gpu = settings.get("device") == "cuda"  # a GPU's offload already takes the checkpoints off the device
        if _on(settings, key, value) or (value == "offload" and not gpu) or (value == "offload_disk" and gpu):
            continue
        settings = {**settings, key: value}
        rows.append({"change": f"{key}: {str(value).lower()}",
                     "max_sequence_len": largest(model, "sequence_len", device_memory, **settings)})
    return rows
