"""LoRA's named options (torch-free: the config and the planner read them).

``lora_target_modules`` is ``ALL_LINEAR`` (every linear layer but the output head), a list of layer names (the
last part(s) of a module path, as peft matches them), or a regular expression matched against the full path.
"""

from __future__ import annotations

__all__ = ["ALL_LINEAR", "LORA_INITS"]

ALL_LINEAR = "all-linear"

LORA_INITS = {
    "default": "A kaiming-uniform, B zero: training starts from the base model exactly",
    "loftq": "start from the quantization error: W ≈ deq(Q) + s·B·A (helps NF3/NF2)",
}
