"""The planner's layer shapes equal the loaded models': every architecture of the README's table, dense, GPT-2
and MoE (quantized, LoRA and unquantized parameter counts, exactly), and public MoE sizes."""

import json

import pytest
import torch

from lowbit.io.loader import load
from lowbit.nn.linear import Linear4bit
from lowbit.nn.lora import add_lora, count_parameters
from lowbit.planner.catalog import load_model_config
from lowbit.planner.memory import plan
from lowbit.planner.shapes import shapes

from tiny import ARCHITECTURES, save_tiny

MOE = {"mixtral", "qwen3_moe"}


def _rows():
    for arch in ARCHITECTURES:
        yield arch, "all-linear", {}
        if arch in MOE:
            yield arch, "all-linear+experts", {}
            yield arch, "gate_up_proj", {}
    yield "qwen3_moe", "all-linear+experts", {"decoder_sparse_step": 2}   # layer 1 MoE, layer 0 dense
    yield "qwen3_moe", "all-linear", {"mlp_only_layers": [1]}
    yield "gpt2", "c_attn", {}


@pytest.mark.parametrize("arch,targets,kw", list(_rows()))
def test_counts_equal_the_loaded_model(tmp_path, arch, targets, kw):
    save_tiny(tmp_path, arch, **kw)
    cfg = json.loads((tmp_path / "config.json").read_text())
    net = load(tmp_path, compute_dtype=torch.bfloat16)
    quantized = sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, Linear4bit))
    floats = sum(p.numel() for p in {id(p): p for p in net.parameters() if p.is_floating_point()}.values())
    add_lora(net, r=4, alpha=8, target_modules=targets, verbose=False)
    lora, _ = count_parameters(net)
    p = plan(cfg, lora_r=4, lora_target_modules=targets, device="cpu")
    assert (p.settings["quantized_params"], p.settings["lora_params"]) == (quantized, lora)
    assert p.items["unquantized_params"] == 2 * floats  # bf16


def test_moe_weights_count_all_experts_activations_top_k():
    mixtral = load_model_config("mixtral-8x7b")
    s = shapes(mixtral)
    total = sum(x.fan_in * x.fan_out * x.count for x in s.layers) + s.other_params
    assert abs(total - 46.70e9) / 46.70e9 < 0.002  # Mixtral-8x7B: 46.7B parameters
    assert s.mlp_per_token == 2 * 14336  # two experts a token
    one_expert = plan({**mixtral, "num_experts_per_tok": 1}, sequence_len=512, device="cpu").items["activations"]
    two = plan(mixtral, sequence_len=512, device="cpu")
    assert two.items["activations"] > one_expert
    experts = plan(mixtral, lora_target_modules="all-linear+experts", device="cpu")
    assert experts.settings["lora_params"] > 10 * two.settings["lora_params"]  # 8 experts × 32 layers of them


def test_every_tested_architecture_is_known_to_the_planner():
    from lowbit.planner.shapes import KNOWN

    assert set(ARCHITECTURES) <= set(KNOWN)
