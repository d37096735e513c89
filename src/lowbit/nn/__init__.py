from .linear import Linear4bit

__all__ = ["Linear4bit"]
