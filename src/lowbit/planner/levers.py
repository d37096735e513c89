"""Which memory lever buys how many tokens: the longest ``sequence_len`` that fits, as configured and then with each
technique the run does not use yet switched on, one after the other (torch-free)::

    as configured                          gradient checkpointing off, MLP whole
    + gradient_checkpointing: true         decoder layers recomputed in backward: one layer's activations live
    + tiled_mlp: true                      the MLP's intermediates one sequence shard at a time
    + gradient_checkpointing: offload      (GPU) the layers' inputs wait in host memory

Each row is ``memory.largest`` of the plan with the levers so far; packed rows never need an L×L mask
(``nn/document_attention.py``), so attention costs O(L) in every row.
"""

from __future__ import annotations

from .memory import largest

__all__ = ["LEVERS", "levers"]

LEVERS = (("gradient_checkpointing", True), ("tiled_mlp", True), ("gradient_checkpointing", "offload"))


def _on(settings: dict, key: str, value) -> bool:
    have = settings.get(key)
    if key == "gradient_checkpointing":
        return have == "offload" or (value is True and bool(have))
    return have is True


def levers(model, device_memory, **settings) -> list[dict]:
    """[{"change": "as configured" | "key: value", "max_sequence_len": n}, …] for ``model`` on ``device_memory``
    (``settings``: ``plan``'s keyword arguments, as ``memory.config_settings`` gives them)."""
    rows = [{"change": "as configured", "max_sequence_len": largest(model, "sequence_len", device_memory, **settings)}]
    for key, value in LEVERS:
        if _on(settings, key, value) or (value == "offload" and settings.get("device") != "cuda"):
            continue
        settings = {**settings, key: value}
        rows.append({"change": f"{key}: {str(value).lower()}",
                     "max_sequence_len": largest(model, "sequence_len", device_memory, **settings)})
    return rows
