"""The memory planner: will a QLoRA run fit on a device? Imports no torch."""

from .._lazy import exports

__all__ = ["plan", "plan_config", "Plan", "largest", "parse_size", "known_families"]
__getattr__, __dir__ = exports(__name__, {
    "plan": ".memory", "plan_config": ".memory", "Plan": ".memory", "largest": ".memory", "parse_size": ".memory",
    "known_families": ".catalog",
})
