"""Tiled MLP: the same loss and gradients as the whole MLP on every dense tiny architecture (4-bit base with LoRA,
under gradient checkpointing too); forward keeps only the block's input; names and state dicts unchanged."""

import pytest
import torch

from lowbit.io.loader import load
from lowbit.nn.lora import add_lora
from lowbit.nn.mlp_shards import shard_count
from lowbit.nn.tiled_mlp import mlp_blocks, tile_mlps
from lowbit.quant.spec import QuantSpec

from tiny import ARCHITECTURES, randomize_lora, save_tiny


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_shard_count_follows_the_memory_target():
    assert shard_count(65536, 576, 1536) == 11  # ⌈4·1536/576⌉
    assert shard_count(1000, 576, 1536) == 1    # never shards shorter than hidden_size tokens
    assert shard_count(65536, 576, 1536, num_shards=64) == 64


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in
                                  ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe", "granitemoe", "nemotron_h",
                                   "granitemoehybrid")])
def test_tiled_equals_whole(tmp_path, arch):
    save_tiny(tmp_path, arch, **({"n_positions": 512} if arch == "gpt2" else {}))
    model = load(tmp_path, QuantSpec("nf4", 64, True), compute_dtype=torch.float32)
    add_lora(model, r=4, alpha=8, verbose=False)
    randomize_lora(model)
    model.eval()  # no dropout: gradients flow all the same
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(0))
    names = sorted(model.state_dict())
    want, g_want = _loss_and_grads(model, ids)
    assert tile_mlps(model, num_shards=3) == len(mlp_blocks(model)) > 0
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got, g_got = _loss_and_grads(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert g_got.keys() == g_want.keys() and any("mlp" in k or "feed_forward" in k for k in g_got)
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-4, atol=1e-6, msg=k)
    assert sorted(model.state_dict()) == names


def test_forward_keeps_only_the_input(tmp_path):
    """Bytes autograd saves inside one MLP block over a 4,096-token row: the whole block keeps ≥ 2 intermediate-size
    activations, the tiled one only its input (the shards are views of it)."""
    save_tiny(tmp_path, "llama")
    model = load(tmp_path, None, compute_dtype=torch.float32)
    add_lora(model, r=4, alpha=8, verbose=False)
    block = mlp_blocks(model)[0][1]
    x = torch.randn(1, 4096, 64, requires_grad=True)

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x).sum().backward()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        return sum(v for k, v in seen.items() if k not in params)

    whole = saved_bytes()
    tile_mlps(model)
    tiled = saved_bytes()
    assert whole >= 2 * 4096 * 128 * 4  # the gate and up outputs
    assert tiled == x.numel() * 4, (whole, tiled)
