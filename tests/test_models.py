"""Models and adapters on tiny random models: streaming load, LoRA, PEFT and bitsandbytes round trips, merge."""

import json
import re

import pytest
import torch
from torch import nn

from lowbit import models
from lowbit.models import LowbitError
from lowbit.nn import Linear4bit
from lowbit.nn.lora import LoRALinear, add_lora
from tiny import save_tiny

F32 = torch.float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    ref = save_tiny(path, "llama")
    return path, ref.eval()


def _ids(n=2, t=12):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(1))


def _randomize_lora(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            with torch.no_grad():
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_load_quantizes_linears_keeps_head_and_ties(tmp_path, arch):
    ref = save_tiny(tmp_path, arch).eval()
    m = models.load(tmp_path, compute_dtype=F32)
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
    a = models.load(path, compute_dtype=F32)
    b = models.load(tmp_path, compute_dtype=F32)
    ids = _ids()
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert a.lowbit["fingerprint"] == b.lowbit["fingerprint"]


def test_unquantized_load_equals_transformers(tiny):
    path, ref = tiny
    m = models.load(path, quantize_weights=False, compute_dtype=F32)
    ids = _ids()
    assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-5)


def test_other_data_types_and_blocksizes(tiny):
    path, _ = tiny
    m = models.load(path, quant_type="nf2", blocksize=128, double_quant=False, compute_dtype=F32)
    w = m.model.layers[1].self_attn.q_proj.weight
    assert w.quant_type == "nf2" and w.blocksize == 128 and not w.double_quant


def test_lora_targets_names_regex_all_linear(tiny, capsys):
    path, _ = tiny
    m = models.load(path, compute_dtype=F32)
    names = add_lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert len(names) == 4 and all(re.search(r"(q|v)_proj$", n) for n in names)
    assert "trainable parameters" in capsys.readouterr().out
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    m2 = models.load(path, compute_dtype=F32)
    assert len(add_lora(m2, r=4, target_modules=r".*\.mlp\..*_proj", verbose=False)) == 6
    m3 = models.load(path, compute_dtype=F32)
    assert len(add_lora(m3, r=4, target_modules="all-linear", verbose=False)) == 14
    assert not isinstance(m3.lm_head, LoRALinear)


def test_lora_bad_targets_and_ranks(tiny):
    path, _ = tiny
    m = models.load(path, compute_dtype=F32)
    with pytest.raises(ValueError, match=r"no linear layer named 'qproj'.*q_proj"):
        add_lora(m, target_modules=["qproj"])
    with pytest.raises(ValueError, match="positive"):
        add_lora(m, r=0)
    with pytest.raises(ValueError, match="larger than the layer"):
        add_lora(m, r=1000)


def test_lora_starts_at_base_and_trains(tiny):
    path, _ = tiny
    m = models.load(path, compute_dtype=F32)
    ids = _ids(4, 16)
    with torch.no_grad():
        before = m(ids).logits
    add_lora(m, r=8, alpha=16, verbose=False)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before), "B = 0 must leave the model unchanged"
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(15):  # a plain PyTorch loop over the model
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_adapter_round_trip_with_peft(tmp_path, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    m = models.load(path, compute_dtype=F32)
    add_lora(m, r=4, alpha=8, target_modules="all-linear", verbose=False)
    _randomize_lora(m)
    models.save_adapter(m, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(path)
    assert models.read_adapter(tmp_path / "ad")[2]["lowbit_base_fingerprint"] == m.lowbit["fingerprint"]
    ids = _ids()
    with torch.no_grad():
        ours = m(ids).logits
    # peft on the unquantized folder holding lowbit's dequantized base
    base_dir = tmp_path / "deq-base"
    plain = models.load(path, compute_dtype=F32)
    models.dequantize_model(plain, F32).save_pretrained(base_dir, safe_serialization=True)
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
    m = models.load(path, quantize_weights=False, compute_dtype=F32)
    models.load_adapter(m, tmp_path / "peft-ad")
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, theirs, atol=1e-5)


def test_adapter_refuses_other_base(tmp_path, tiny):
    path, _ = tiny
    m = models.load(path, compute_dtype=F32)
    add_lora(m, r=4, verbose=False)
    models.save_adapter(m, tmp_path / "ad")
    other = tmp_path / "other"
    save_tiny(other, "llama", seed=5)
    m2 = models.load(other, compute_dtype=F32)
    with pytest.raises(LowbitError, match="trained on base"):
        models.load_adapter(m2, tmp_path / "ad")
    models.load_adapter(m2, tmp_path / "ad", force=True)
    # shape mismatch is refused
    bigger = tmp_path / "bigger"
    save_tiny(bigger, "llama", hidden_size=128, intermediate_size=256)
    m3 = models.load(bigger, compute_dtype=F32)
    with pytest.raises(LowbitError, match="shape"):
        models.load_adapter(m3, tmp_path / "ad", force=True)


def test_saved_4bit_checkpoint_loads_in_transformers_bnb(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    m = models.load(path, compute_dtype=F32)
    models.save_quantized(m, tmp_path / "q4")
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
    m2 = models.load(tmp_path / "q4", compute_dtype=F32)
    assert torch.equal(m2.model.layers[0].self_attn.q_proj.weight.packed, m.model.layers[0].self_attn.q_proj.weight.packed)
    assert m2.lowbit["fingerprint"] == m.lowbit["fingerprint"]


def test_reads_checkpoint_saved_by_transformers_bnb(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path, _ = tiny
    bq = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=F32))
    bq.save_pretrained(tmp_path / "bnb")
    m = models.load(tmp_path / "bnb", compute_dtype=F32)
    ours = models.load(path, compute_dtype=F32)
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        assert torch.equal(m.get_submodule(name).weight.packed, ours.get_submodule(name).weight.packed)


def test_merge_writes_plain_hf_folder(tmp_path, tiny):
    from transformers import AutoModelForCausalLM

    path, _ = tiny
    m = models.load(path, compute_dtype=F32)
    add_lora(m, r=4, verbose=False)
    _randomize_lora(m)
    ids = _ids()
    with torch.no_grad():
        ours = m(ids).logits
    models.merge(m, tmp_path / "merged", dtype=F32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=F32)
    assert not hasattr(hf.config, "quantization_config")
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours, atol=1e-4)
    with pytest.raises(LowbitError, match="not empty"):
        m2 = models.load(path, compute_dtype=F32)
        add_lora(m2, r=4, verbose=False)
        models.merge(m2, tmp_path / "merged")


def test_loftq_init_recovers_quantization_error(tiny):
    path, _ = tiny
    plain = models.load(path, quantize_weights=False, compute_dtype=F32)
    w = plain.model.layers[0].mlp.up_proj.weight.detach().float()
    m = models.load(path, quant_type="nf2", compute_dtype=F32, keep_source=True)
    before = (m.model.layers[0].mlp.up_proj.dequantize() - w).norm()
    add_lora(m, r=16, alpha=16, init="loftq", loftq_iters=2, verbose=False)
    lora = m.model.layers[0].mlp.up_proj
    after = (lora.base_weight() + lora.delta_weight() - w).norm()
    assert after < 0.8 * before
    assert not hasattr(lora.base, "source_weight")


def test_bad_inputs(tmp_path, tiny):
    path, _ = tiny
    with pytest.raises(LowbitError, match="model not found"):
        models.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LowbitError, match="config.json"):
        models.load(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(LowbitError, match="no \\*.safetensors"):
        models.load(broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LowbitError, match="corrupt"):
        models.load(broken)
    remote = tmp_path / "remote"
    remote.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(LowbitError, match="trust_remote_code"):
        models.load(remote)
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-arch"}))
    with pytest.raises(LowbitError, match="unsupported model type"):
        models.load(alien)
    gpt2 = tmp_path / "gpt2"
    save_tiny(gpt2, "gpt2")
    with pytest.raises(LowbitError, match="Conv1D"):
        models.load(gpt2)


def test_fingerprint_same_for_quantized_and_float_loads(tiny):
    path, _ = tiny
    a = models.load(path, compute_dtype=F32)
    b = models.load(path, quantize_weights=False, compute_dtype=torch.bfloat16)
    c = models.load(path, quant_type="nf2", compute_dtype=F32)
    assert a.lowbit["fingerprint"] == b.lowbit["fingerprint"] == c.lowbit["fingerprint"]
