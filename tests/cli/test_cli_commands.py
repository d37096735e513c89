"""Every command on tiny models: train, eval, generate, merge (with the re-quantization report), quantize, plan;
one-line errors."""

import json
import math

import pytest
import torch

from lowbit import cli
from lowbit.io.adapters import load_adapter, save_adapter
from lowbit.io.loader import load
from lowbit.nn.lora import LoRALinear, add_lora
from lowbit.training.config import apply_overrides, config_to_yaml, load_config

from tiny import random_ids as _ids
from tiny import randomize_lora as _randomize_lora
from tiny import save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_with_tokenizer(root / "model")
    m = load(root / "model", compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.normal_(0, 0.05)
    save_adapter(m, root / "adapter")
    return root


def test_quantize_command(tiny_cli, capsys):
    out = tiny_cli / "q4"
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out", str(out), "--quant-type", "fp4",
                     "--no-double-quant", "--blocksize", "128"]) == 0
    assert "loadable with transformers + bitsandbytes" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False
    assert (out / "tokenizer.json").exists()
    m = load(out, compute_dtype=torch.float32)
    w = m.model.layers[0].self_attn.q_proj.weight
    assert w.quant_type == "fp4" and w.blocksize == 128 and not w.double_quant
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out",
                     str(out)]) == 2  # not over an existing folder
    assert "not empty" in capsys.readouterr().err


def test_quantize_with_gptq_calibration_is_a_plain_bitsandbytes_checkpoint(tiny_cli, tmp_path, capsys):
    """--calibrate re-rounds the codes under the model's inputs on the data; the grid (absmax, double quant) and
    the layout stay round-to-nearest's, so transformers + bitsandbytes load it and get lowbit's floats."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello how are you today {i} the capital of france is paris"})
                            + "\n" for i in range(24)))
    plain, calibrated = tmp_path / "rtn", tmp_path / "gptq"
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out", str(plain)]) == 0
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out", str(calibrated), "--calibrate",
                     str(data), "--samples", "16"]) == 0
    assert "gptq calibration on 16 samples" in capsys.readouterr().out
    a = load(plain, compute_dtype=torch.float32).model.layers[0].mlp.down_proj
    b = load(calibrated, compute_dtype=torch.float32).model.layers[0].mlp.down_proj
    assert torch.equal(a.absmax, b.absmax) and not torch.equal(a.codes, b.codes)
    import bitsandbytes.functional as F

    hf = AutoModelForCausalLM.from_pretrained(calibrated, dtype=torch.float32).model.layers[0].mlp.down_proj.weight
    assert torch.equal(F.dequantize_4bit(hf.data, hf.quant_state).float(), b.dequantize(torch.float32))
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out", str(tmp_path / "x"), "--calibrate",
                     str(tmp_path / "missing.jsonl")]) == 2
    assert "data not found" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["awq", "both"])
def test_quantize_with_awq_is_an_ordinary_checkpoint_transformers_runs(tiny_cli, tmp_path, capsys, method):
    """AWQ's scales live in the saved norm weights and 4-bit layers: transformers + bitsandbytes compute the
    same logits as lowbit on the saved folder, and they differ from the round-to-nearest model's."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello how are you today {i} the capital of france is paris"})
                            + "\n" for i in range(24)))
    out = tmp_path / method
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out", str(out), "--calibrate", str(data),
                     "--samples", "16", "--method", method, "--compute-dtype", "float32"]) == 0
    assert f"{method} calibration on 16 samples" in capsys.readouterr().out
    ours = load(out, compute_dtype=torch.float32)
    plain = load(tiny_cli / "model", compute_dtype=torch.float32)
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(ours.state_dict()[norm], plain.state_dict()[norm])  # the scales were folded in
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).train()  # bnb's CPU eval path: DESIGN §5
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-4)
    # the folder records what it was rounded from: the float model's weights with AWQ's scales
    assert json.loads((out / "config.json").read_text())["lowbit_calibration"]["method"] == method
    from lowbit import quantize
    from lowbit.io.loader import SourceWeights

    with SourceWeights(ours) as src:
        for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):
            layer = ours.get_submodule(name)
            rtn = quantize(src(name), layer.weight.spec)
            if method == "awq":  # round to nearest of exactly those weights
                assert torch.equal(rtn.packed, layer.weight.packed), name
            else:  # GPTQ moved codes on the same grid
                assert torch.equal(rtn.absmax, layer.weight.absmax), name


def test_quantize_with_clip_blockwise_and_e2e_stays_a_bitsandbytes_checkpoint(tiny_cli, tmp_path, capsys):
    """awq+clip+blockwise+e2e moves scales and codes; transformers + bitsandbytes still compute lowbit's logits; a
    chain out of order is refused in one line before anything is written."""
    from transformers import AutoModelForCausalLM

    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"hello how are you today {i} the capital of france is paris"})
                            + "\n" for i in range(24)))
    out = tmp_path / "bw"
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out", str(out), "--calibrate", str(data),
                     "--samples", "16", "--method", "awq+clip+blockwise+e2e", "--compute-dtype", "float32"]) == 0
    assert "awq+clip+blockwise+e2e calibration on 16 samples" in capsys.readouterr().out
    ours = load(out, compute_dtype=torch.float32)
    plain = load(tiny_cli / "model", compute_dtype=torch.float32)
    a, b = plain.model.layers[1].mlp.down_proj, ours.model.layers[1].mlp.down_proj
    assert not torch.equal(a.absmax, b.absmax) and not torch.equal(a.codes, b.codes)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).train()  # bnb's CPU eval path: DESIGN §5
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-4)
    capsys.readouterr()
    assert cli.main(["quantize", "--model", str(tiny_cli / "model"), "--out", str(tmp_path / "x"), "--calibrate",
                     str(data), "--method", "clip+awq"]) == 2
    err = capsys.readouterr().err  # refused before the model loads: no progress bar either
    assert err == ("error: --method: stages run once each in the order awq, clip, gptq, blockwise, e2e, "
                   "got 'clip+awq'\n")
    assert not (tmp_path / "x").exists()


def test_generate_command_streams(tiny_cli, capsys):
    rc = cli.main(["generate", "--model", str(tiny_cli / "model"), "--adapter", str(tiny_cli / "adapter"), "--prompt",
                   "hello how are you", "--max-new-tokens", "5", "--compute-dtype", "float32"])
    assert rc == 0
    assert capsys.readouterr().out.strip() != ""


def test_merge_command_with_requantize_report(tiny_cli, capsys):
    from transformers import AutoModelForCausalLM

    out = tiny_cli / "merged"
    rc = cli.main(["merge", "--model", str(tiny_cli / "model"), "--adapter", str(tiny_cli / "adapter"),
                   "--out", str(out),
                   "--dtype", "fp32", "--requantize", "--compute-dtype", "float32"])
    text = capsys.readouterr().out
    assert rc == 0 and "merge report: adapter changes logits by" in text and "x the adapter's effect" in text
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = load(tiny_cli / "model", compute_dtype=torch.float32)
    load_adapter(ref, tiny_cli / "adapter")
    ids = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ref(ids).logits, atol=1e-4)
    assert json.loads((tiny_cli / "merged-nf4" / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_command_errors_are_one_line(tiny_cli, capsys):
    assert cli.main(["generate", "--model", str(tiny_cli / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model not found") and "\n" not in err
    assert cli.main(["merge", "--model", str(tiny_cli / "model"), "--adapter", str(tiny_cli / "model"), "--out",
                     str(tiny_cli / "m2")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
    assert not (tiny_cli / "m2").exists()


def test_cli_flags_override_yaml(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("lora_r: 8\nmicro_batch_size: 2\n")
    assert cli.main(["train", str(p), "--print-config", "--lora-r", "32", "--learning-rate=5e-5"]) == 0
    out = capsys.readouterr().out
    assert "lora_r: 32" in out and "micro_batch_size: 2" in out and "learning_rate: 5.0e-05" in out
    assert cli.main(["train", "--lora-rr", "3"]) == 2
    assert "did you mean 'lora_r'" in capsys.readouterr().err


def test_train_end_to_end_via_cli(setup, capsys):
    root, model_dir, data = setup
    out = root / "cli-run"
    rc = cli.main(["train", "--base-model", str(model_dir), "--datasets", str(data), "--compute-dtype", "float32",
                   "--lora-r", "4", "--micro-batch-size", "4", "--sequence-len", "64", "--max-steps", "12",
                   "--learning-rate", "3e-3", "--warmup-steps", "0", "--eval-steps", "6", "--save-steps", "6",
                   "--val-set-size", "8", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "config.yaml"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    recs = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in recs)
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    m = [row for row in text.splitlines() if row.startswith("eval loss:")][0]
    before, after = map(float, m.split(":")[1].split("->"))
    assert after < before and evals[-1] == pytest.approx(after, abs=1e-4)
    assert "lowbit generate --model" in text and "lowbit merge --model" in text
    # the saved adapter evaluates better than the base on the same data
    rc = cli.main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", str(data), "--json",
                   "--compute-dtype", "float32", "--sequence-len", "64"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    cli.main(["eval", "--model", str(model_dir), "--data", str(data), "--json", "--compute-dtype", "float32",
              "--sequence-len", "64"])
    assert json.loads(capsys.readouterr().out)["loss"] > res["loss"]
    # the same rows as Parquet evaluate the same
    import pandas as pd

    pd.read_json(data, lines=True).to_parquet(root / "data.parquet")
    cli.main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", str(root / "data.parquet"),
              "--json", "--compute-dtype", "float32", "--sequence-len", "64"])
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(res["loss"], rel=1e-6)
    # a second run into the same folder is refused
    assert cli.main(["train", "--base-model", str(model_dir), "--datasets", str(data), "--output-dir", str(out),
                     "--quiet"]) == 2
    assert "already holds" in capsys.readouterr().err


TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def test_cli_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert cli.main(["plan", str(tmp_path), "--json", "--gpu-memory", "8GB", "--max-batch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["total_bytes"] == sum(out["items"].values()) and out["max_micro_batch_size"] > 1
    assert cli.main(["plan", "mixtral-8x7b", "--gpu-memory", "48XB"]) == 2
    assert "cannot read memory size" in capsys.readouterr().err


def test_plan_of_a_config_file_is_the_run_train_would_do(setup, tmp_path, capsys):
    from lowbit.planner.memory import plan_config

    root, model_dir, data = setup
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"base_model: {model_dir}\ndatasets: {data}\nsequence_len: 96\nmicro_batch_size: 3\n"
                        "lora_r: 4\nlora_target_modules: [q_proj, v_proj]\noptimizer: adamw_8bit\n")
    assert cli.main(["train", str(cfg_file), "--micro-batch-size", "2", "--print-config"]) == 0
    trained = load_config(cfg_file)
    apply_overrides(trained, {"micro_batch_size": 2})
    assert capsys.readouterr().out == config_to_yaml(trained)
    assert cli.main(["plan", str(cfg_file), "--micro-batch-size", "2", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = plan_config(trained, device="cpu").to_json()
    assert out == json.loads(json.dumps(want))
    s = out["settings"]
    assert (s["sequence_len"], s["micro_batch_size"], s["lora_r"], s["optimizer"]) == (96, 2, 4, "adamw_8bit")
    assert s["lora_target_modules"] == ["q_proj", "v_proj"]
    # a model instead of a config file, with the same flags as train
    assert cli.main(["plan", str(model_dir), "--sequence-len", "96", "--micro-batch-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["sequence_len"] == 96
    assert cli.main(["plan", str(model_dir), "--sequence-lenn", "96"]) == 2
    assert "did you mean 'sequence_len'" in capsys.readouterr().err


def test_merge_works_on_a_model_folder_without_a_tokenizer(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    path, _ = tiny  # saved without tokenizer files
    m = load(path, compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    _randomize_lora(m)
    save_adapter(m, tmp_path / "ad")
    rc = cli.main(["merge", "--model", str(path), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "mg"),
                   "--dtype", "fp32", "--compute-dtype", "float32", "--requantize"])
    text = capsys.readouterr().out
    assert rc == 0 and "merge report" in text
    assert not any((tmp_path / "mg" / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mg", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, m(ids).logits, atol=1e-4)


def test_plan_says_when_it_guesses_the_shapes(tmp_path, capsys):
    cfg = dict(model_type="brand_new", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["plan", str(tmp_path), "--device", "cpu"]) == 0
    assert "model type 'brand_new' is planned as a LLaMA-style decoder" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    assert cli.main(["plan", str(tmp_path), "--device", "cpu"]) == 0
    assert "planned as a LLaMA-style" not in capsys.readouterr().out


def test_export_command_writes_gguf_and_modelfile(tiny_cli, capsys):
    import gguf

    out = tiny_cli / "exp" / "tiny.gguf"
    argv = ["export", "--model", str(tiny_cli / "model"), "--adapter", str(tiny_cli / "adapter"), "--out", str(out),
            "--type", "q8_0", "--ollama"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "GGUF (q8_0, llama, pre-tokenizer gpt-2) written to" in text and "ollama create tiny -f" in text
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\nTEMPLATE \"\"\"{{- range .Messages }}<|im_start|>")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert cli.main(argv) == 2 and "exists (use --overwrite" in capsys.readouterr().err


def test_export_refusals_come_before_loading(tmp_path, capsys, monkeypatch):
    from tiny import save_tiny_with_tokenizer

    save_tiny_with_tokenizer(tmp_path / "gpt2", "gpt2")
    capsys.readouterr()  # transformers' own save progress bar
    import lowbit.cli.export as export_command

    monkeypatch.setattr(export_command, "load_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    cases = [(["--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x.gguf")],
              "GGUF export supports llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3; this model is 'gpt2'"),
             (["--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x.gguf"), "--type", "q4_k"],
              "--type must be one of f32, f16, bf16, q8_0"),
             (["--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "x.bin")], "name the file *.gguf")]
    for args, message in cases:
        assert cli.main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "\n" not in err.strip(), err
