"""Checkpoint names read through transformers' published conversion rules, backwards."""

import pytest
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from lowbit.errors import LowbitError
from lowbit.io.checkpoint_names import CheckpointNames


def _names(model_type, present):
    return CheckpointNames(get_checkpoint_conversion_mapping(model_type), present, model_type)


def test_mixtral_renames_and_per_expert_parts():
    names = _names("mixtral", {"model.layers.0.block_sparse_moe.experts.0.w1.weight"})
    assert names.key("model.layers.0.mlp.gate.weight") == "model.layers.0.block_sparse_moe.gate.weight"
    assert names.key("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    moe = "model.layers.0.block_sparse_moe.experts.{e}"
    assert names.experts("model.layers.0.mlp.experts.gate_up_proj") == [f"{moe}.w1.weight", f"{moe}.w3.weight"]
    assert names.experts("model.layers.0.mlp.experts.down_proj") == [f"{moe}.w2.weight"]


def test_fused_checkpoint_and_dense_models():
    fused = "model.layers.3.mlp.experts.gate_up_proj"
    assert _names("qwen3_moe", {fused}).experts(fused) is None  # stored fused: sliced, not gathered
    assert _names("llama", set()).key("model.norm.weight") == "model.norm.weight"
    assert CheckpointNames(None, set()).experts(fused) is None


def test_renamings_anchored_at_the_start_and_found_by_class():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_neox", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2)
    net = AutoModelForCausalLM.from_config(cfg)  # its head is lm_head; checkpoints call it embed_out
    names = CheckpointNames.for_model(net, {"embed_out.weight"})
    assert names.key("lm_head.weight") == "embed_out.weight"
    assert names.key("gpt_neox.lm_head.weight") == "gpt_neox.lm_head.weight"  # only at the start


def test_conversions_lowbit_cannot_read_are_refused_by_name():
    import transformers.conversion_mapping as cm

    rule = cm.WeightRenaming(source_patterns=[r"(.+)\.w_(\d+)"], target_patterns=[r"\1.weight_\2"])
    with pytest.raises(LowbitError, match="oddmodel: its checkpoints need a conversion lowbit does not read"):
        CheckpointNames([rule], set(), "oddmodel")
