"""Linear layers of hybrid attention / state-space decoders, from their config.json (no torch): what the planner
counts for Falcon-H1, Granite-4.0-H (granitemoehybrid), Nemotron-H and LFM2.

    Mamba-2 mixer   d = SSM width (heads · head dim), conv = d + 2·groups·state
                    in_proj  h → d + conv + heads        (z, x·B·C, dt)        out_proj  d → h
                    beside them: conv1d (conv × kernel, + bias), A_log, D, dt_bias (heads each), a gated norm (d)
    Falcon-H1       every layer: attention and a Mamba-2 mixer side by side, then a gated MLP (gate/up/down)
    Granite-4.0-H   each layer: attention or a Mamba-2 mixer (layer_types), then a shared MLP (input_linear
                    h → 2·s, output_linear s → h)
    Nemotron-H      each layer one block (layers_block_type, or hybrid_override_pattern: M a Mamba-2 mixer,
                    * attention, - an MLP — up_proj h → i, down_proj i → h: squared ReLU, no gate)
    LFM2            each layer: attention (q/k/v/out_proj, q/k norms over the head dim) or a short convolution
                    (in_proj h → 3h, out_proj h → h, conv h × L_cache), then a gated MLP (w1, w3 h → f; w2 f → h)

Module paths are those transformers gives (``model.layers.N.mamba.in_proj`` …), each at the first layer that has it.
"""

from __future__ import annotations

__all__ = ["HYBRID", "hybrid_shapes"]

HYBRID = ("falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2")


def _mamba(cfg: dict, t: str, h: int) -> tuple[int, int, int, int, int]:
    """(SSM width, conv width, heads, conv kernel, norm params) of a Mamba-2 mixer."""
    if t == "nemotron_h":
        heads, g, n = cfg["mamba_num_heads"], cfg["n_groups"], cfg["ssm_state_size"]
        kernel, d = cfg.get("conv_kernel", 4), cfg["mamba_num_heads"] * cfg["mamba_head_dim"]
    else:
        heads, g, n = cfg["mamba_n_heads"], cfg["mamba_n_groups"], cfg["mamba_d_state"]
        kernel, d = cfg.get("mamba_d_conv", 4), int(cfg.get("mamba_expand", 2) * h)
        if t == "falcon_h1" and cfg.get("mamba_d_ssm"):
            d = cfg["mamba_d_ssm"]
    norm = d if t != "falcon_h1" or cfg.get("mamba_rms_norm") else 0
    return d, d + 2 * g * n, heads, kernel, norm


def _ff_dim(cfg: dict) -> int:
    """LFM2's MLP width: intermediate_size, or adjusted as its config says (2/3, a multiplier, a multiple)."""
    f = cfg["intermediate_size"]
    if cfg.get("block_auto_adjust_ff_dim", True):
        f = int(2 * f / 3)
        if cfg.get("block_ffn_dim_multiplier") is not None:
            f = int(cfg["block_ffn_dim_multiplier"] * f)
        m = cfg.get("block_multiple_of", 256)
        f = m * ((f + m - 1) // m)
    return f


def _kinds(cfg: dict, t: str, L: int) -> list[str]:
    """Each layer's mixer: mamba, attention, mlp (Nemotron-H's own MLP blocks) or conv (LFM2)."""
    if t == "falcon_h1":
        return ["both"] * L
    names = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention", "full_attention": "attention",
             "conv": "conv", "mlp": "mlp"}
    if t == "nemotron_h" and not cfg.get("layers_block_type"):
        return [{"M": "mamba", "*": "attention", "-": "mlp"}[c] for c in cfg["hybrid_override_pattern"][:L]]
    return [names[k] for k in (cfg.get("layers_block_type") or cfg["layer_types"])[:L]]


def hybrid_shapes(cfg: dict, layer_cls, shapes_cls):
    """``Shapes`` of a hybrid model (``layer_cls``/``shapes_cls``: shapes.Layer / shapes.Shapes)."""
    t = cfg["model_type"]
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    L = cfg.get("num_hidden_layers") or len(cfg["layers_block_type"])
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    kinds = _kinds(cfg, t, L)
    first = {k: kinds.index(k) for k in dict.fromkeys(kinds)}
    p = lambda k: f"model.layers.{first[k]}."
    n_att = sum(k in ("attention", "both") for k in kinds)
    n_mamba = sum(k in ("mamba", "both") for k in kinds)
    layers, other = [], 0
    if n_att:
        att = p("both" if t == "falcon_h1" else "attention") + ("mixer." if t == "nemotron_h" else "self_attn.")
        out = "out_proj" if t == "lfm2" else "o_proj"
        layers += [layer_cls(att + "q_proj", h, nh * hd, n_att), layer_cls(att + "k_proj", h, nkv * hd, n_att),
                   layer_cls(att + "v_proj", h, nkv * hd, n_att), layer_cls(att + out, nh * hd, h, n_att)]
        other += 2 * hd * n_att if t == "lfm2" else 0
    if n_mamba:
        d, conv, heads, kernel, norm = _mamba(cfg, t, h)
        m = p("both" if t == "falcon_h1" else "mamba") + ("mixer." if t == "nemotron_h" else "mamba.")
        layers += [layer_cls(m + "in_proj", h, d + conv + heads, n_mamba), layer_cls(m + "out_proj", d, h, n_mamba)]
        bias = cfg.get("mamba_conv_bias", True) if t != "nemotron_h" else cfg.get("use_conv_bias", True)
        other += n_mamba * (conv * kernel + (conv if bias else 0) + 3 * heads + norm)
    n_conv = kinds.count("conv")
    if n_conv:
        c = p("conv") + "conv."
        layers += [layer_cls(c + "in_proj", h, 3 * h, n_conv), layer_cls(c + "out_proj", h, h, n_conv)]
        other += n_conv * (h * cfg.get("conv_L_cache", 3) + (h if cfg.get("conv_bias") else 0))
    i, per_token = cfg["intermediate_size"], 0
    if t == "nemotron_h":
        n_mlp = kinds.count("mlp")
        if n_mlp:
            mlp = p("mlp") + "mixer."
            layers += [layer_cls(mlp + "up_proj", h, i, n_mlp), layer_cls(mlp + "down_proj", i, h, n_mlp)]
        per_token = i * n_mlp / L
        other += L * h + h  # a norm a layer, the final one
    elif t == "granitemoehybrid":
        s = cfg.get("shared_intermediate_size") or i
        mlp = "model.layers.0.shared_mlp."
        layers += [layer_cls(mlp + "input_linear", h, 2 * s, L), layer_cls(mlp + "output_linear", s, h, L)]
        per_token = s
        other += 2 * L * h + h
    else:
        f = _ff_dim(cfg) if t == "lfm2" else i
        mlp = "model.layers.0." + "feed_forward."
        names = ("w1", "w3", "w2") if t == "lfm2" else ("gate_proj", "up_proj", "down_proj")
        layers += [layer_cls(mlp + names[0], h, f, L), layer_cls(mlp + names[1], h, f, L),
                   layer_cls(mlp + names[2], f, h, L)]
        per_token = f
        other += 2 * L * h + h
    # transformers' Nemotron-H never ties its head to the embeddings, whatever its config says
    V, tied = cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)) and t != "nemotron_h"
    other += V * h * (1 if tied else 2)
    return shapes_cls(layers, h, L, nh, nkv * hd, per_token, 1, 1, V, tied, other)
