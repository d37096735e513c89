"""The linear layers of a decoder, read from its config.json (no torch): what the planner counts.

    LLaMA-style   per layer: q, k, v, o (h → heads·d, kv·d, kv·d; heads·d → h); MLP gate, up (h → i), down (i → h)
    Phi-3         the same, fused: qkv_proj (h → (heads + 2·kv)·d), gate_up_proj (h → 2i)
    GPT-2         c_attn (h → 3h), attn.c_proj (h → h), c_fc (h → n_inner), mlp.c_proj (n_inner → h)
    MoE layers    per expert (E of them) gate_up_proj (h → 2I), down_proj (I → h), I = moe_intermediate_size;
                  a router (E × h, kept in the compute dtype); a shared expert as a dense MLP (+ its 1-wide gate)

Which layers are MoE: every one (Mixtral), or as ``decoder_sparse_step`` / ``mlp_only_layers`` (Qwen-MoE) and
``first_k_dense_replace`` say. Every token passes through ``num_experts_per_tok`` experts, so activations
count top-k experts while the weights count all E. Module paths are those of the model lowbit loads
(``model.layers.0.mlp.experts.0.gate_up_proj``), for regular-expression targets.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hybrid import HYBRID, hybrid_shapes

__all__ = ["Layer", "Shapes", "shapes", "KNOWN"]


@dataclass(frozen=True)
class Layer:
    path: str      # module path in layer 0 (expert 0)
    fan_in: int
    fan_out: int
    count: int     # how many such matrices the model has
    expert: bool = False

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Shapes:
    layers: list[Layer]
    h: int            # hidden size
    L: int            # decoder layers
    heads: int
    kv: int           # key/value width (kv heads · head dim)
    mlp_per_token: float   # MLP intermediate width a token passes through, averaged over layers (MoE: top-k)
    topk: int
    experts: int      # per MoE layer (1: dense)
    vocab: int
    tied: bool
    other_params: int  # never quantized: embeddings, untied head, norms, biases, routers, positions


def _moe_layers(cfg: dict, L: int) -> list[int]:
    only = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1
    first_dense = cfg.get("first_k_dense_replace") or 0
    return [n for n in range(L) if n not in only and (n + 1) % step == 0 and n >= first_dense]


# model type → how its attention and MLP are laid out (default: LLaMA's q/k/v/o and gate/up/down)
ATTENTION = {"phi3": "qkv_proj", "gpt_neox": "attention.query_key_value", "falcon": "self_attention.query_key_value"}
MLP = {"phi3": "gate_up", "starcoder2": "fc", "gpt_neox": "h_to_4h", "falcon": "h_to_4h"}
PREFIX = {"gpt_neox": "gpt_neox.layers.0.", "falcon": "transformer.h.0."}
KNOWN = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2", "gpt_neox",
         "falcon", "starcoder2", "granite", "smollm3", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe",
         "granitemoe", *HYBRID)
"""Model types whose layer counts are checked against the loaded model (tests/planner/test_shapes.py); others
are read as LLaMA-style."""
LAYER_NORM = ("gpt_neox", "falcon", "starcoder2", "phimoe")  # norms with a bias
ALL_BIASED = ("gpt_neox", "starcoder2")                      # a bias on every linear layer (use_bias)
QKV_BIASED = ("qwen2", "qwen2_moe")


def shapes(cfg: dict) -> Shapes:
    """The linear layers and shape facts of ``cfg`` (a transformers config as a dict). KeyError: a field is
    missing."""
    t = cfg.get("model_type", "")
    if t == "gpt2" or "n_embd" in cfg:
        return _gpt2(cfg)
    if t in HYBRID:
        return hybrid_shapes(cfg, Layer, Shapes)
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads") or nh
    d = cfg.get("head_dim") or h // nh
    if t == "gpt_neox":
        nkv = nh
    elif t == "falcon":
        nkv = cfg.get("num_kv_heads") or nh if cfg.get("new_decoder_architecture") else \
            (1 if cfg.get("multi_query", True) else nh)
    i = (cfg.get("ffn_hidden_size") if t == "falcon" else cfg.get("intermediate_size")) or 4 * h
    E = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    moe = _moe_layers(cfg, L) if E > 1 else []
    base = PREFIX.get(t, "model.layers.0.")
    layers = _attention(base, t, h, nh, nkv, d, L) + _mlp(base + "mlp.", t, h, i, L - len(moe))
    topk = cfg.get("num_experts_per_tok") or 1
    shared = 0
    if moe:
        ie = cfg.get("moe_intermediate_size") or i
        mlp, n = base + "mlp.", len(moe) * E
        layers += [Layer(mlp + "experts.0.gate_up_proj", h, 2 * ie, n, True),
                   Layer(mlp + "experts.0.down_proj", ie, h, n, True)]
        shared = cfg.get("shared_expert_intermediate_size") or 0
        if shared:
            layers += _mlp(mlp + "shared_expert.", t, h, shared, len(moe))
            layers.append(Layer(mlp + "shared_expert_gate", h, 1, len(moe)))
    per_token = ((L - len(moe)) * i + len(moe) * ((cfg.get("moe_intermediate_size") or i) * topk + shared)) / L
    V, tied = cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False))
    other = V * h * (1 if tied else 2) + _norms(t, h, nh, nkv, d, L) + E * h * len(moe)
    if t in ALL_BIASED and cfg.get("use_bias", True):
        other += sum(x.fan_out * x.count for x in layers if not x.expert)
    elif t in QKV_BIASED or cfg.get("attention_bias"):
        other += (nh + 2 * nkv) * d * L
    return Shapes(layers, h, L, nh, nkv * d, per_token, topk if moe else 1, E if moe else 1, V, tied, other)


def _attention(base: str, t: str, h: int, nh: int, nkv: int, d: int, L: int) -> list[Layer]:
    if t in ATTENTION:
        att = base + ATTENTION[t]
        out = base + ("self_attn.o_proj" if t == "phi3" else att.rsplit(".", 1)[0].rsplit(".", 1)[-1] + ".dense")
        return [Layer(att, h, (nh + 2 * nkv) * d, L), Layer(out, nh * d, h, L)]
    att = base + "self_attn."
    return [Layer(att + "q_proj", h, nh * d, L), Layer(att + "k_proj", h, nkv * d, L),
            Layer(att + "v_proj", h, nkv * d, L), Layer(att + "o_proj", nh * d, h, L)]


def _mlp(mlp: str, t: str, h: int, i: int, count: int) -> list[Layer]:
    if not count:
        return []
    kind = MLP.get(t, "gated")
    if kind == "fc":
        return [Layer(mlp + "c_fc", h, i, count), Layer(mlp + "c_proj", i, h, count)]
    if kind == "h_to_4h":
        return [Layer(mlp + "dense_h_to_4h", h, i, count), Layer(mlp + "dense_4h_to_h", i, h, count)]
    up = [Layer(mlp + "gate_up_proj", h, 2 * i, count)] if kind == "gate_up" else \
        [Layer(mlp + "gate_proj", h, i, count), Layer(mlp + "up_proj", h, i, count)]
    return [*up, Layer(mlp + "down_proj", i, h, count)]


def _norms(t: str, h: int, nh: int, nkv: int, d: int, L: int) -> int:
    """Norm parameters: two a layer and a final one (four a layer in Gemma), with a bias in LayerNorm models,
    and the q/k norms some models have over the head dim (Qwen3, Gemma 3) or all heads (OLMo 2, OLMoE)."""
    n = ((4 if t.startswith("gemma") else 2) * L + 1) * h
    if t in ("qwen3", "qwen3_moe", "gemma3_text", "gemma3"):
        n += 2 * d * L
    elif t in ("olmo2", "olmoe"):
        n += (nh + nkv) * d * L
    return 2 * n if t in LAYER_NORM else n


def _gpt2(cfg: dict) -> Shapes:
    h, L, nh = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
    i = cfg.get("n_inner") or 4 * h
    base = "transformer.h.0."
    layers = [Layer(base + "attn.c_attn", h, 3 * h, L), Layer(base + "attn.c_proj", h, h, L),
              Layer(base + "mlp.c_fc", h, i, L), Layer(base + "mlp.c_proj", i, h, L)]
    V = cfg["vocab_size"]
    # token + position embeddings (the head is tied), 2 layer norms a layer + a final one (weight and bias),
    # every linear layer's bias
    other = V * h + cfg.get("n_positions", 1024) * h + 2 * h * (2 * L + 1) + (3 * h + h + i + h) * L
    return Shapes(layers, h, L, nh, h, i, 1, 1, V, True, other)
