"""PEFT adapters: round trips with peft both ways, refusing another base."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.adapters import load_adapter, read_adapter, save_adapter
from lowbit.io.loader import base_info, load
from lowbit.io.merging import dequantize_model
from lowbit.nn.lora import add_lora

from tiny import random_ids as _ids
from tiny import randomize_lora as _randomize_lora
from tiny import save_tiny

F32 = torch.float32


def test_adapter_round_trip_with_peft(tmp_path, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    m = load(path, compute_dtype=F32)
    add_lora(m, r=4, alpha=8, target_modules="all-linear", verbose=False)
    _randomize_lora(m)
    save_adapter(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(path)
    assert read_adapter(tmp_path / "ad")[2]["lowbit_base_fingerprint"] == base_info(m).fingerprint
    ids = _ids()
    with torch.no_grad():
        ours = m(ids).logits
    # peft on the unquantized folder holding lowbit's dequantized base
    base_dir = tmp_path / "deq-base"
    plain = load(path, compute_dtype=F32)
    dequantize_model(plain, F32).save_pretrained(base_dir, safe_serialization=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=F32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_lowbit_loads_peft_adapter(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    base = AutoModelForCausalLM.from_pretrained(path, dtype=F32)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], use_rslora=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "peft-ad")
    ids = _ids()
    with torch.no_grad():
        theirs = pm.eval()(ids).logits
    m = load(path, None, compute_dtype=F32)
    load_adapter(m, tmp_path / "peft-ad")
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, theirs, atol=1e-5)


def test_adapter_refuses_other_base(tmp_path, tiny):
    path, _ = tiny
    m = load(path, compute_dtype=F32)
    add_lora(m, r=4, verbose=False)
    save_adapter(m, tmp_path / "ad")
    other = tmp_path / "other"
    save_tiny(other, "llama", seed=5)
    m2 = load(other, compute_dtype=F32)
    with pytest.raises(LowbitError, match="trained on base"):
        load_adapter(m2, tmp_path / "ad")
    load_adapter(m2, tmp_path / "ad", force=True)
    # shape mismatch is refused
    bigger = tmp_path / "bigger"
    save_tiny(bigger, "llama", hidden_size=128, intermediate_size=256)
    m3 = load(bigger, compute_dtype=F32)
    with pytest.raises(LowbitError, match="shape"):
        load_adapter(m3, tmp_path / "ad", force=True)
