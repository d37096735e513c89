"""Optimizers by name (``registry.OPTIMIZERS``): 8-bit and paged AdamW; plain ``adamw`` is torch's."""

from .._lazy import exports

__all__ = ["AdamW", "PagerStats", "make", "OPTIMIZERS"]
__getattr__, __dir__ = exports(__name__, {"AdamW": ".paged", "PagerStats": ".paged", "make": ".paged",
                                          "OPTIMIZERS": ".registry"})
