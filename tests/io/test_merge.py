"""Merging adapters into a plain Hugging Face folder."""


import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.loader import load
from lowbit.io.merging import merge
from lowbit.nn.lora import add_lora

from tiny import random_ids as _ids
from tiny import randomize_lora as _randomize_lora

F32 = torch.float32


def test_merge_writes_plain_hf_folder(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    m = load(path, compute_dtype=F32)
    add_lora(m, r=4, verbose=False)
    _randomize_lora(m)
    ids = _ids()
    with torch.no_grad():
        ours = m(ids).logits
    merge(m, tmp_path / "merged", dtype=F32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=F32)
    assert not hasattr(hf.config, "quantization_config")
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours, atol=1e-4)
    with pytest.raises(LowbitError, match="not empty"):
        m2 = load(path, compute_dtype=F32)
        add_lora(m2, r=4, verbose=False)
        merge(m2, tmp_path / "merged")
