"""Expert adapters convert to peft's stacked target_parameters form and back exactly (peft's own reading of it is
checked end to end in tests/io/test_architectures.py)."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.loader import load
from lowbit.io.peft_experts import PREFIX, expert_targets, from_peft, to_peft
from lowbit.nn.lora import add_lora, lora_state_dict

from tiny import randomize_lora, save_tiny


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe")
    save_tiny(path, "qwen3_moe")
    return path


def test_round_trip_and_layout(moe):
    net = load(moe)
    add_lora(net, r=3, alpha=6, target_modules="all-linear+experts", verbose=False)
    randomize_lora(net)
    mine = lora_state_dict(net)
    assert expert_targets(net) == {f"model.layers.{i}.mlp.experts": ["gate_up_proj", "down_proj"] for i in (0, 1)}
    peft, params = to_peft(net, mine)
    assert params[:2] == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    mod = PREFIX + "model.layers.0.mlp.experts"
    a, b = peft[f"{mod}.base_layer.lora_A.weight"], peft[f"{mod}.base_layer.lora_B.weight"]  # gate_up: nested
    assert a.shape == (4 * 3, 64) and b.shape == (64, 3 * 4)
    for e in range(4):  # A stacked by expert; B's columns interleaved k·E + e
        assert torch.equal(a[3 * e:3 * e + 3], mine[f"{mod}.{e}.gate_up_proj.lora_A.weight"])
        assert torch.equal(b[:, e::4], mine[f"{mod}.{e}.gate_up_proj.lora_B.weight"])
    assert not any(".experts.0." in k for k in peft)
    back = from_peft(net, peft)
    assert set(back) == set(mine) and all(torch.equal(back[k], v) for k, v in mine.items())


def test_nesting_order_does_not_matter_and_bad_shapes_are_named(moe):
    net = load(moe)
    add_lora(net, r=2, alpha=4, target_modules="all-linear+experts", verbose=False)
    randomize_lora(net)
    mine = lora_state_dict(net)
    peft, _ = to_peft(net, mine)
    mod = PREFIX + "model.layers.1.mlp.experts"
    # written by peft with target_parameters in the other order: down_proj nested, gate_up_proj outside
    swapped = dict(peft)
    for ab in ("lora_A", "lora_B"):
        swapped[f"{mod}.{ab}.weight"], swapped[f"{mod}.base_layer.{ab}.weight"] = \
            peft[f"{mod}.base_layer.{ab}.weight"], peft[f"{mod}.{ab}.weight"]
    back = from_peft(net, swapped)
    assert all(torch.equal(back[k], v) for k, v in mine.items())
    swapped[f"{mod}.lora_A.weight"] = swapped[f"{mod}.lora_A.weight"][:-1]
    with pytest.raises(LowbitError, match="fit none of model.layers.1.mlp.experts's 4 experts"):
        from_peft(net, swapped, "adapter-dir")


def test_untargeted_experts_are_written_as_zeros(moe):
    net = load(moe)
    add_lora(net, r=2, alpha=4, target_modules=r".*experts\.(0|2)\.down_proj", verbose=False)
    randomize_lora(net)
    peft, params = to_peft(net, lora_state_dict(net))
    assert params == [f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)]
    a = peft[PREFIX + "model.layers.0.mlp.experts.lora_A.weight"]
    assert a[2:4].abs().sum() == 0 and a[0:2].abs().sum() > 0  # expert 1: zeros (ΔW = 0)
