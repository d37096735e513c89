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


def test_float32_merge_carries_what_was_never_quantized_exactly(tmp_path, tiny):
    """lowbit merge --dtype fp32: embeddings, head and norms are the source checkpoint's bytes, not rounded through a
    16-bit compute dtype; the merged logits equal peft's merge on transformers' dequantized model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowbit import cli
    from lowbit.io.adapters import save_adapter
    from lowbit.io.merging import dequantize_model

    path, _ = tiny
    m = load(path, compute_dtype=torch.float32)
    add_lora(m, r=4, alpha=8, verbose=False)
    _randomize_lora(m)
    save_adapter(m, tmp_path / "ad")
    assert cli.main(["merge", "--model", str(path), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "mg"),
                     "--dtype", "fp32", "--compute-dtype", "bf16"]) == 0
    merged, src = load_file(str(tmp_path / "mg" / "model.safetensors")), load_file(str(path / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert merged[k].dtype == torch.float32 and torch.equal(merged[k], src[k]), k
    base = tmp_path / "deq"
    dequantize_model(load(path, compute_dtype=torch.float32), torch.float32).save_pretrained(base)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                    tmp_path / "ad").merge_and_unload()
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "mg").eval()(ids).logits
        want = ref.eval()(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_rope_scaling_travels_with_the_adapter_into_merge(tmp_path, tiny):
    """An adapter trained with ``model_config: {rope_scaling}`` keeps it in its header: ``lowbit merge`` (and
    generate, export) loads the base with it, and the merged folder's config.json carries it for transformers."""
    from transformers import AutoModelForCausalLM

    from lowbit.cli import main
    from lowbit.io.adapters import adapter_config_overrides, save_adapter

    tiny = tiny[0]
    over = {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "max_position_embeddings": 512}
    net = load(tiny, compute_dtype=torch.float32, config_overrides=over)  # 4-bit, as merge loads it
    add_lora(net, r=4, alpha=8, verbose=False)
    _randomize_lora(net)
    save_adapter(net, tmp_path / "a")
    assert adapter_config_overrides(tmp_path / "a") == over
    assert main(["merge", "--model", str(tiny), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m"),
                 "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert merged.config.rope_parameters["rope_type"] == "linear" and merged.config.max_position_embeddings == 512
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, net.eval()(ids).logits, rtol=1e-4, atol=1e-4)
        from lowbit.io.adapters import load_adapter

        with pytest.raises(LowbitError, match="trained with model_config"):
            load_adapter(load(tiny, compute_dtype=torch.float32), tmp_path / "a")
        unscaled = load_adapter(load(tiny, compute_dtype=torch.float32), tmp_path / "a", force=True).eval()
        assert not torch.allclose(unscaled(ids).logits, merged(ids).logits, atol=1e-2)
