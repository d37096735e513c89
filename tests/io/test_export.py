"""4-bit checkpoints transformers + bitsandbytes load, and the ones they write."""

import json

import torch

from lowbit.io.export import save_quantized
from lowbit.io.loader import base_info, load

from tiny import random_ids as _ids

F32 = torch.float32


def test_saved_4bit_checkpoint_loads_in_transformers_bnb(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    m = load(path, compute_dtype=F32)
    save_quantized(m, tmp_path / "q4")
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", dtype=F32)
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = _ids()
    # train mode: bitsandbytes' CPU eval path repacks weights and multiplies with bf16 scales (DESIGN.md §5)
    hf.train()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, m(ids).logits, atol=1e-4)
    # and lowbit reads it back without re-quantizing
    m2 = load(tmp_path / "q4", compute_dtype=F32)
    assert torch.equal(m2.model.layers[0].self_attn.q_proj.weight.packed,
                       m.model.layers[0].self_attn.q_proj.weight.packed)
    assert base_info(m2).fingerprint == base_info(m).fingerprint


def test_reads_checkpoint_saved_by_transformers_bnb(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, _ = tiny
    bq = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=F32))
    bq.save_pretrained(tmp_path / "bnb")
    m = load(tmp_path / "bnb", compute_dtype=F32)
    ours = load(path, compute_dtype=F32)
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        assert torch.equal(m.get_submodule(name).weight.packed, ours.get_submodule(name).weight.packed)


def test_nf3_nf2_int3_int2_checkpoints_are_lowbit_own_and_load_back(tmp_path, tiny):
    """Types bitsandbytes lacks are saved in the same layout with quant_method 'lowbit', densely packed (INT3 / INT2
    with their packed zero points)."""
    from lowbit.quant.spec import QuantSpec

    path, _ = tiny
    for qt, bits in (("nf3", 3), ("nf2", 2), ("int3", 3), ("int2", 2)):
        m = load(path, QuantSpec(qt), compute_dtype=F32)
        save_quantized(m, tmp_path / qt)
        qc = json.loads((tmp_path / qt / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "lowbit" and qc["bnb_4bit_quant_type"] == qt
        m2 = load(tmp_path / qt, compute_dtype=F32)
        w, w2 = m.model.layers[0].mlp.down_proj.weight, m2.model.layers[0].mlp.down_proj.weight
        assert w2.quant_type == qt and w2.packed.numel() == w.numel * bits // 8
        assert torch.equal(w2.packed, w.packed)
        assert (w2.zeros is None) == (qt.startswith("nf")) and (w.zeros is None or torch.equal(w2.zeros, w.zeros))
        ids = _ids()
        with torch.no_grad():
            assert torch.equal(m2(ids).logits, m(ids).logits)
        assert base_info(m2).fingerprint == base_info(m).fingerprint


def test_layers_sharing_one_codebook_tensor_each_save_their_state(tmp_path, tiny):
    """Tied parameters are saved once, but a codebook tensor several layers share is part of every layer's state."""
    path, _ = tiny
    m = load(path, compute_dtype=F32)
    layers = [mod for mod in m.modules() if type(mod).__name__ == "Linear4bit"]
    code, nested = layers[0].weight.code, layers[0].weight.nested_code
    for mod in layers:
        q = mod.weight
        q.code, q.nested_code = code, nested  # one tensor object, as a model built in code may have
        mod.weight = q
    assert len({mod.code.data_ptr() for mod in layers}) == 1
    save_quantized(m, tmp_path / "q4")
    m2 = load(tmp_path / "q4", compute_dtype=F32)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, m(ids).logits)
