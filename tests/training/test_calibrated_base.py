"""quant_calibration: the run calibrates its 4-bit base on its own training data once, writes it to
output_dir/base, trains on exactly those bytes, records it as the adapter's base, and a resume reuses it."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.adapters import load_adapter
from lowbit.io.loader import load
from lowbit.nn.linear import Linear4bit
from lowbit.training import recipe
from lowbit.training.config import TrainConfig


def _cfg(setup, out, **kw):
    root, model_dir, data = setup
    return TrainConfig(**{**dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4,
                                 lora_alpha=8, micro_batch_size=4, sequence_len=64, max_steps=4, learning_rate=3e-3,
                                 warmup_steps=0, eval_steps=2, save_steps=2, val_set_size=8,
                                 output_dir=str(root / out), quant_calibration="both",
                                 quant_calibration_samples=16), **kw})


def _codes(net):
    return {n.removesuffix(".base"): (m.codes.clone(), m.absmax.clone()) for n, m in net.named_modules()
            if isinstance(m, Linear4bit)}  # a LoRA layer holds its 4-bit layer as .base


def test_run_trains_on_its_calibrated_base_and_resume_reuses_it(setup):
    logs = []
    res = recipe.train(_cfg(setup, "cal"), progress=False, log=logs.append)
    out = setup[0] / "cal"
    base = out / "base"
    assert any("calibrated base (both on 16 training samples" in line for line in logs)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    saved = load(base, compute_dtype=torch.float32)
    plain = load(setup[1], compute_dtype=torch.float32)
    trained = _codes(res["model"])
    assert trained.keys() == _codes(saved).keys()
    assert all(torch.equal(trained[n][0], c) and torch.equal(trained[n][1], a) for n, (c, a) in _codes(saved).items())
    assert any(not torch.equal(trained[n][0], c) for n, (c, _) in _codes(plain).items())  # not the plain RTN base
    # the adapter applies to the calibrated base and gives the trained model's logits
    load_adapter(saved, out)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, res["model"].eval()(input_ids=ids).logits, atol=1e-5)
    # resume: the base is not made again (same file, no calibration log line)
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    logs.clear()
    recipe.train(_cfg(setup, "cal", max_steps=6), resume=True, progress=False, log=logs.append)
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp
    assert not any("calibrated base" in line for line in logs)


def test_loftq_on_a_calibrated_base_starts_from_its_error(setup):
    """LoftQ on the calibrated base: its adapters absorb W − deq(Q_calibrated), W the weights the base was rounded
    from (AWQ-scaled: the record in output_dir/base says how), so the start is closer to the float model."""
    from lowbit.io.loader import SourceWeights
    from lowbit.nn.lora import LoRALinear

    cfg = _cfg(setup, "cal-loftq", lora_init="loftq", max_steps=1)
    recipe.train(cfg, progress=False, log=lambda *a: None)
    base = setup[0] / "cal-loftq" / "base"
    assert (base / "calibration.safetensors").exists()
    start = recipe.load_model(cfg, torch.float32, lambda *a: None, base=str(base))  # as the run began
    net = load(base, compute_dtype=torch.float32)
    with SourceWeights(net) as src:
        assert src.cols and src.rows  # AWQ's scales, recorded
        for name, mod in start.named_modules():
            if isinstance(mod, LoRALinear):
                w = src(name)
                q = net.get_submodule(name).dequantize()
                fit = q + mod.scaling * mod.lora_B.weight.detach() @ mod.lora_A.weight.detach()
                assert (w - fit).norm() < 0.97 * (w - q).norm(), name


def test_blockwise_trains_the_lora_start_the_run_begins_from(setup):
    """quant_calibration with blockwise and lora_init: loftq: the start trained with the codes is kept in
    output_dir/base and the run's adapter begins from it; a run with another rank is refused it in one line."""
    from safetensors.torch import load_file

    from lowbit.nn.lora import LoRALinear

    cfg = _cfg(setup, "cal-bw", lora_init="loftq", quant_calibration="clip+blockwise", max_steps=1,
               lora_target_modules=["q_proj", "v_proj", "down_proj"])
    logs = []
    recipe.train(cfg, progress=False, log=logs.append)
    assert any("blocks reconstructed" in line and "with a LoRA start" in line for line in logs)
    base = setup[0] / "cal-bw" / "base"
    saved = load_file(str(base / "lora_start.safetensors"))
    start = recipe.load_model(cfg, torch.float32, lambda *a: None, base=str(base))
    lora = {n: m for n, m in start.named_modules() if isinstance(m, LoRALinear)}
    assert {k.rpartition(".")[0] for k in saved} == set(lora) and lora
    for n, m in lora.items():
        assert torch.equal(m.lora_A.weight, saved[f"{n}.lora_A"])
        assert torch.equal(m.lora_B.weight, saved[f"{n}.lora_B"])
    with pytest.raises(LowbitError, match="lora_start.safetensors: a LoRA start for r=4, scaling 2.0; this run has "
                                          "r=8"):
        recipe.load_model(_cfg(setup, "cal-bw", lora_init="loftq", quant_calibration="clip+blockwise", lora_r=8,
                               lora_alpha=16), torch.float32, lambda *a: None, base=str(base))
    # a start killed between writing the base and its LoRA start: the next start makes both again
    (base / "lora_start.safetensors").unlink()
    logs.clear()
    recipe.train(_cfg(setup, "cal-bw", lora_init="loftq", quant_calibration="clip+blockwise", max_steps=2,
                      lora_target_modules=["q_proj", "v_proj", "down_proj"]), resume=True, progress=False,
                 log=logs.append)
    assert (base / "lora_start.safetensors").is_file() and any("calibrated base" in line for line in logs)


def test_e2e_trains_the_scales_and_the_lora_start_the_run_begins_from(setup):
    """quant_calibration with e2e (no blockwise) and lora_init: loftq: the scales of the clipped base move, its
    codes do not, and the start trained with them is the run's."""
    from safetensors.torch import load_file

    from lowbit.nn.lora import LoRALinear

    logs = []
    recipe.train(_cfg(setup, "cal-clip", quant_calibration="clip", max_steps=1), progress=False, log=logs.append)
    cfg = _cfg(setup, "cal-e2e", lora_init="loftq", quant_calibration="clip+e2e", max_steps=1)
    recipe.train(cfg, progress=False, log=logs.append)
    assert any("e2e pass" in line and "with a LoRA start" in line for line in logs)
    base = setup[0] / "cal-e2e" / "base"
    clipped, e2e = (_codes(load(setup[0] / d / "base", compute_dtype=torch.float32)) for d in ("cal-clip", "cal-e2e"))
    assert all(torch.equal(c, e2e[n][0]) for n, (c, _) in clipped.items())
    assert all(not torch.equal(a, e2e[n][1]) for n, (_, a) in clipped.items())
    saved = load_file(str(base / "lora_start.safetensors"))
    start = recipe.load_model(cfg, torch.float32, lambda *a: None, base=str(base))
    lora = {n: m for n, m in start.named_modules() if isinstance(m, LoRALinear)}
    assert {k.rpartition(".")[0] for k in saved} == set(lora) and lora
    assert all(torch.equal(m.lora_B.weight, saved[f"{n}.lora_B"]) for n, m in lora.items())


@pytest.mark.parametrize("kw,msg", [
    ({"load_in_4bit": False}, "quant_calibration needs load_in_4bit"),
    ({"quant_calibration": "smoothquant"},
     "quant_calibration must be one of none, awq, clip, gptq, blockwise, e2e, both"),
    ({"quant_calibration": "gptq+awq"}, "quant_calibration: stages run once each in the order awq, clip, gptq"),
    ({"quant_calibration_samples": 0}, "quant_calibration_samples must be > 0"),
])
def test_bad_calibration_settings_are_refused(setup, kw, msg):
    with pytest.raises(LowbitError, match=msg):
        _cfg(setup, "bad", **kw).validate()
