"""The model commands on a tiny model: quantize, generate, merge (with the re-quantization report), errors."""

import json

import pytest
import torch

from lowbit import cli, models
from lowbit.nn.lora import LoRALinear, add_lora
from tiny import save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_with_tokenizer(root / "model")
    m = models.load(root / "model", compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.normal_(0, 0.05)
    models.save_adapter(m, root / "adapter")
    return root


def test_quantize_command(tiny, capsys):
    out = tiny / "q4"
    assert cli.main(["quantize", "--model", str(tiny / "model"), "--out", str(out), "--quant-type", "fp4",
                     "--no-double-quant", "--blocksize", "128"]) == 0
    assert "loadable with transformers + bitsandbytes" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False
    assert (out / "tokenizer.json").exists()
    m = models.load(out, compute_dtype=torch.float32)
    w = m.model.layers[0].self_attn.q_proj.weight
    assert w.quant_type == "fp4" and w.blocksize == 128 and not w.double_quant
    assert cli.main(["quantize", "--model", str(tiny / "model"), "--out", str(out)]) == 2  # not over an existing folder
    assert "not empty" in capsys.readouterr().err


def test_generate_command_streams(tiny, capsys):
    rc = cli.main(["generate", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapter"), "--prompt",
                   "hello how are you", "--max-new-tokens", "5", "--compute-dtype", "float32"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


def test_merge_command_with_requantize_report(tiny, capsys):
    from transformers import AutoModelForCausalLM

    out = tiny / "merged"
    rc = cli.main(["merge", "--model", str(tiny / "model"), "--adapter", str(tiny / "adapter"), "--out", str(out),
                   "--dtype", "fp32", "--requantize", "--compute-dtype", "float32"])
    text = capsys.readouterr().out
    assert rc == 0 and "merge report: adapter changes logits by" in text and "x the adapter's effect" in text
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = models.load(tiny / "model", compute_dtype=torch.float32)
    models.load_adapter(ref, tiny / "adapter")
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ref(ids).logits, atol=1e-4)
    assert json.loads((tiny / "merged-nf4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_command_errors_are_one_line(tiny, capsys):
    assert cli.main(["generate", "--model", str(tiny / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model not found") and "\n" not in err
    assert cli.main(["merge", "--model", str(tiny / "model"), "--adapter", str(tiny / "model"), "--out", str(tiny / "m2")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not (tiny / "m2").exists()
