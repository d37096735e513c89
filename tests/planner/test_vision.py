"""The planner on vision-language models: the language model's layers and LoRA as the loaded model has them,
the vision tower and projector as float weights (tiny random models of every row of the vision table)."""

import pytest
import torch
from tiny_vlm import VLM_ARCHITECTURES, save_tiny_vlm

from lowbit.io.loader import load
from lowbit.nn.linear import Linear4bit
from lowbit.nn.lora import add_lora
from lowbit.planner.memory import plan
from lowbit.planner.vision import vision_params

AXOLOTL_REGEX = r"model.language_model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj"


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_plan_counts_what_the_loaded_vision_model_holds(arch, tmp_path):
    save_tiny_vlm(tmp_path, arch)
    net = load(tmp_path, compute_dtype=torch.float32)
    quantized = sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, Linear4bit))
    floats = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values() if p.dtype == torch.float32)
    targets = "all-linear" if arch == "idefics3" else AXOLOTL_REGEX  # Axolotl's regex names model.language_model
    add_lora(net, r=8, target_modules=targets, verbose=False)
    p = plan(str(tmp_path), sequence_len=256, micro_batch_size=2, lora_r=8, lora_target_modules=targets,
             device="cpu", compute_dtype="float32")
    assert p.settings["quantized_params"] == quantized
    assert p.settings["lora_params"] == sum(x.numel() for x in net.parameters() if x.requires_grad)
    assert p.items["unquantized_params"] / 4 == pytest.approx(floats, rel=0.02)  # biases aside, exact


@pytest.mark.parametrize("arch,text,vision", [
    ("llava", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   vocab_size=32064, model_type="llama"),   # LLaVA-1.5-7B's sizes
     dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
          patch_size=14, projection_dim=768, model_type="clip_vision_model")),
    ("qwen2_vl", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936),  # Qwen2-VL-2B's sizes
     dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14)),
])
def test_a_vision_config_without_weights_is_estimated(arch, text, vision):
    """From a config alone (no checkpoint): the vision tower + projector within 5 % of the real model's count (the
    model built on the meta device)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(arch, text_config=text, vision_config=vision)
    with torch.device("meta"):
        net = AutoModelForImageTextToText.from_config(config)
    real = sum(p.numel() for n, p in net.named_parameters() if "language_model" not in n and "lm_head" not in n)
    assert vision_params(config.to_dict(), config.to_dict()) == pytest.approx(real, rel=0.05)
    whole = plan(config.to_dict(), sequence_len=64, device="cpu", compute_dtype="float32")
    assert whole.settings["quantized_params"] + whole.items["unquantized_params"] / 4 == pytest.approx(
        sum(p.numel() for p in net.parameters()), rel=0.05)


@pytest.mark.parametrize("size", [(224, 224), (448, 336)])
def test_plan_counts_image_tokens_with_the_models_processor(tmp_path, capsys, size):
    """`lowbit plan` on a Qwen2-VL folder: the image tokens of a W×H image are the processor's patch grid merged
    2×2 (t·h·w / merge²), and an image size that is not WxH is one line."""
    from PIL import Image

    from lowbit.cli import main
    from lowbit.io.processor import load_processor

    save_tiny_vlm(tmp_path, "qwen2_vl")
    proc = load_processor(tmp_path)
    grid = proc.image_processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0]
    want = int(grid.prod()) // proc.image_processor.merge_size ** 2
    assert main(["plan", str(tmp_path), "--image-size", f"{size[0]}x{size[1]}"]) == 0
    out = capsys.readouterr().out
    assert f"images: {want} image tokens per {size[0]}x{size[1]} image (the model's processor)" in out
    assert main(["plan", str(tmp_path), "--image-size", "big"]) != 0
    assert capsys.readouterr().err.strip().splitlines() == ["error: --image-size: expected WIDTHxHEIGHT in pixels, "
                                                             "e.g. 448x448, got 'big'"]
