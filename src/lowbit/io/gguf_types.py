"""The GGUF tensor types ``lowbit export`` writes: the ones the ``gguf`` package quantizes itself (it has no
quantizer for K- or I-quants). Torch-free, so the command line can list them without loading torch."""

__all__ = ["GGUF_TYPES", "check_gguf_type"]

GGUF_TYPES = {
    "f32": "32-bit float, exact",
    "f16": "16-bit float (the reference for llama.cpp's own conversions)",
    "bf16": "bfloat16",
    "q8_0": "8-bit, blocks of 32 with a f16 scale (8.5 bits/weight)",
    "q5_1": "5-bit, blocks of 32 with scale and minimum (6 bits/weight)",
    "q5_0": "5-bit, blocks of 32 with a scale (5.5 bits/weight)",
    "q4_1": "4-bit, blocks of 32 with scale and minimum (5 bits/weight)",
    "q4_0": "4-bit, blocks of 32 with a scale (4.5 bits/weight)",
}
"""The GGUF tensor types lowbit writes (one name each; ``--type``)."""


def check_gguf_type(name: str) -> None:
    """Refuse a type lowbit does not write, in one line naming the flag."""
    if name not in GGUF_TYPES:
        from ..errors import LowbitError

        raise LowbitError(f"--type must be one of {', '.join(GGUF_TYPES)}, got {name!r}")
