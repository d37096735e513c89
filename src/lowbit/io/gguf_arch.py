"""What llama.cpp expects of each architecture lowbit exports to GGUF: its architecture name, metadata and the
few tensor changes its converter makes.

    llama (LLaMA, SmolLM, Mistral)   q and k rows permuted from transformers' half-split rotary layout to
                                     llama.cpp's interleaved one: per head, rows [0..d/2) and [d/2..d) interleave
                                         W'[h, 2j + s] = W[h, s·d/2 + j]      (s ∈ {0, 1}, j < d/2)
    gemma2, gemma3                   RMSNorm weights + 1 (transformers computes x̂·(1 + w), llama.cpp x̂·w)
    qwen2, qwen3, phi3               as they are

Tensor names come from the ``gguf`` package's own map (``gguf.get_tensor_name_map``); metadata keys are the ones
transformers' GGUF reader maps back (``transformers.integrations.ggml``) plus what llama.cpp also reads (head
dimension, soft-capping, sliding window). Tied output heads are left out: llama.cpp then uses ``token_embd``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError

__all__ = ["GGUFArch", "GGUF_ARCHS", "gguf_arch", "write_metadata", "transform"]


@dataclass(frozen=True)
class GGUFArch:
    name: str                  # llama.cpp's architecture name
    permute_qk: bool = False   # rotary layout: transformers' half-split → llama.cpp's interleaved
    norm_plus_one: bool = False


GGUF_ARCHS = {
    "llama": GGUFArch("llama", permute_qk=True),
    "mistral": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2"),
    "qwen3": GGUFArch("qwen3"),
    "gemma2": GGUFArch("gemma2", norm_plus_one=True),
    "gemma3_text": GGUFArch("gemma3", norm_plus_one=True),
    "phi3": GGUFArch("phi3"),
}
"""transformers model type → llama.cpp architecture (the types lowbit exports; one name each)."""


def gguf_arch(config) -> GGUFArch:
    """The llama.cpp architecture of a transformers config, or a one-line refusal."""
    t = getattr(config, "model_type", None)
    if getattr(config, "vision_config", None) is not None:
        raise LowbitError(f"GGUF export: {t} is a vision-language model; llama.cpp reads its vision tower from a "
                          "separate mmproj file, which lowbit does not write yet — merge (lowbit merge) and use "
                          "transformers")
    if t not in GGUF_ARCHS:
        raise LowbitError(f"GGUF export supports {', '.join(GGUF_ARCHS)}; this model is {t!r}")
    rope = _rope(config)
    kind = rope.get("rope_type") or "default"
    if kind not in ROPE_SCALINGS or any(k in rope for k in _YARN_TUNING):
        raise LowbitError(f"GGUF export: rope scaling {kind!r} of this {t} model is not written yet (plain, linear "
                          f"and yarn without {'/'.join(_YARN_TUNING)} are)")
    return GGUF_ARCHS[t]


ROPE_SCALINGS = ("default", "linear", "yarn")
"""The RoPE scalings written as llama.cpp's ``rope.scaling.*`` keys (type, factor, yarn's original length)."""
_YARN_TUNING = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim")


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma 3): the global one
        params = params["full_attention"]
    return dict(params) if isinstance(params, dict) else {}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_metadata(writer, config, arch: GGUFArch) -> None:
    """The architecture keys llama.cpp reads (``{arch}.context_length`` …) from a transformers config."""
    d = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_vocab_size(config.vocab_size)
    rotary = int(d * float(_rope(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))))
    writer.add_rope_dimension_count(rotary)
    rope = _rope(config)
    if rope.get("rope_type") in ("linear", "yarn"):
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if rope["rope_type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if arch.name in ("gemma2", "gemma3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if arch.name == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first halves; second halves] to interleaved pairs."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(name: str, w: torch.Tensor, config, arch: GGUFArch) -> torch.Tensor:
    """A transformers tensor as llama.cpp expects it (float32 in, float32 out)."""
    if arch.permute_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return _permute(w, config.num_attention_heads)
    if arch.permute_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return _permute(w, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    if arch.norm_plus_one and name.endswith("norm.weight"):
        return w + 1
    return w
