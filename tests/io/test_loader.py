"""Quantize-on-load on tiny random models: layers, ties, shards, data types, bad inputs, fingerprints."""

import json

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.loader import base_info, load
from lowbit.nn.linear import Linear4bit
from lowbit.quant.spec import QuantSpec

from tiny import random_ids as _ids
from tiny import save_tiny

F32 = torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_load_quantizes_linears_keeps_head_and_ties(tmp_path, arch):
    ref = save_tiny(tmp_path, arch).eval()
    m = load(tmp_path, compute_dtype=F32)
    q = [n for n, mod in m.named_modules() if isinstance(mod, Linear4bit)]
    assert len(q) == 2 * 7 and not any("lm_head" in n for n in q)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert all(not p.requires_grad for p in m.parameters())
    # the 4-bit model computes exactly what the float model does with NF4-rounded weights
    import lowbit

    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                assert torch.equal(m.get_submodule(name).weight.packed, lowbit.quantize(mod.weight).packed), name
                mod.weight.copy_(lowbit.quantize(mod.weight).dequantize())
        ids = _ids()
        assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-5)


def test_sharded_checkpoint_equals_single_file(tmp_path, tiny):
    path, ref = tiny
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    a = load(path, compute_dtype=F32)
    b = load(tmp_path, compute_dtype=F32)
    ids = _ids()
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert base_info(a).fingerprint == base_info(b).fingerprint


def test_unquantized_load_equals_transformers(tiny):
    path, ref = tiny
    m = load(path, None, compute_dtype=F32)
    ids = _ids()
    assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-5)


def test_other_data_types_and_blocksizes(tiny):
    path, _ = tiny
    m = load(path, QuantSpec("nf2", 128, False), compute_dtype=F32)
    w = m.model.layers[1].self_attn.q_proj.weight
    assert w.quant_type == "nf2" and w.blocksize == 128 and not w.double_quant


def test_bad_inputs(tmp_path, tiny):
    path, _ = tiny
    with pytest.raises(LowbitError, match="model not found"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="config.json"):
        load(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(LowbitError, match="no \\*.safetensors"):
        load(broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LowbitError, match="corrupt"):
        load(broken)
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(LowbitError, match="trust_remote_code"):
        load(remote)
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-arch"}))
    with pytest.raises(LowbitError, match="unsupported model type"):
        load(alien)
    # (GPT-2's Conv1D layers used to be refused here; they load now: tests/io/test_architectures.py)
    t5 = tmp_path / "t5"
    t5.mkdir()
    from transformers import T5Config

    T5Config(vocab_size=256, d_model=64, num_layers=1, num_heads=2, d_ff=64).save_pretrained(t5)
    with pytest.raises(LowbitError, match="t5 is an encoder-decoder model; lowbit fine-tunes decoder-only"):
        load(t5)


def test_fingerprint_same_for_quantized_and_float_loads(tiny):
    path, _ = tiny
    a = load(path, compute_dtype=F32)
    b = load(path, None, compute_dtype=torch.bfloat16)
    c = load(path, QuantSpec("nf2"), compute_dtype=F32)
    assert base_info(a).fingerprint == base_info(b).fingerprint == base_info(c).fingerprint
