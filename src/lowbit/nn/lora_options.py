"""LoRA's named options (torch-free: the config and the planner read them).

``lora_target_modules`` is ``ALL_LINEAR`` (every linear layer but the output head and, in a mixture-of-experts
model, the experts: attention and dense/shared MLPs), ``ALL_LINEAR_EXPERTS`` (also every expert's projections),
layer names (the last
part(s) of a module path, as peft matches them: a list, or a string like ``q_proj`` or ``q_proj,v_proj``), or a
regular expression matched against the full path (any other string). ``target_names`` tells the forms apart,
for the training code and the planner alike.
"""

from __future__ import annotations

import math
import re

__all__ = ["ALL_LINEAR", "ALL_LINEAR_EXPERTS", "LORA_INITS", "target_names", "PEFT_REFUSED", "lora_scaling"]

ALL_LINEAR = "all-linear"
ALL_LINEAR_EXPERTS = "all-linear+experts"

# (model types, layer names): peft refuses LoRA on layers of these names in these state-space (Mamba) models —
# it checks the name wherever the layer sits — so all-linear leaves them out
PEFT_REFUSED = (frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}),
                frozenset({"out_proj", "conv1d"}))

LORA_INITS = {
    "default": "A kaiming-uniform, B zero: training starts from the base model exactly",
    "loftq": "start from the quantization error: W ≈ deq(Q) + s·B·A (helps NF3/NF2)",
}


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s in W + s·B·A: α/r, or α/√r with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def target_names(targets) -> list[str] | None:
    """The layer names ``targets`` lists, or None when it is a keyword (``ALL_LINEAR``…) or a regular expression."""
    if not isinstance(targets, str):
        return [str(t) for t in targets]
    if targets not in (ALL_LINEAR, ALL_LINEAR_EXPERTS) and re.fullmatch(r"\s*[\w.]+(\s*,\s*[\w.]+)*\s*", targets):
        return [t.strip() for t in targets.split(",")]
    return None
