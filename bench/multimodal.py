"""Vision-language QLoRA memory and speed: lowbit against transformers + bitsandbytes + peft on the same random
Qwen2-VL-shaped model (~290 M parameters: a 16-layer, 1024-wide language model and a 12-layer, 768-wide vision
tower), the same batches of the shapes task (224-pixel pictures: 64 image tokens each) and the same settings.

Both sides: NF4 + double quantization of the language model's linear layers, the vision tower and projector in the
compute dtype, LoRA r=16 on the language model's attention and MLP projections, AdamW, micro-batch 4, float32
compute (this CPU's); gradient checkpointing off on both sides, then on on both sides (non-reentrant); each side in
its own fresh process. The peer's batches are lowbit's
own (tokens, labels, pixel inputs: data/image_batches.py), fed to its model with ``labels`` as transformers trains.
Peak RSS is the process's VmHWM (imports included); speed is the median step time after the first 2 steps.

    python bench/multimodal.py [--steps 8] [--readme]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import publish, run_worker, table, vm_hwm_bytes

ROOT = Path("/tmp/lowbit-bench-multimodal")
MB, R, LR, SEQ = 4, 16, 1e-4, 512
TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def _setup() -> tuple[Path, Path]:
    """(model folder, data file): a random Qwen2-VL-shaped model and 64 shape pictures, made once."""
    import torch
    from tiny_vlm import save_tiny_vlm
    from transformers import AutoConfig, AutoModelForImageTextToText

    from lowbit.data.shapes import COLOURS, KINDS, SHAPES_QUESTION, SIZES, shape_image

    model, data = ROOT / "model", ROOT / "data" / "train.jsonl"
    if not (model / "config.json").exists():
        save_tiny_vlm(model, "qwen2_vl")  # the tiny one's tokenizer and processor files, then the large weights
        tiny = AutoConfig.from_pretrained(model)
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}
        text = dict(tiny.text_config.to_dict(), layer_types=None, hidden_size=1024, intermediate_size=2816,
                    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                    rope_parameters=rope)
        vision = dict(depth=12, embed_dim=768, hidden_size=1024, num_heads=12, mlp_ratio=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=vision,
                                   image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
                                   vision_start_token_id=tiny.vision_start_token_id,
                                   vision_end_token_id=tiny.vision_end_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        net = AutoModelForImageTextToText.from_config(cfg).to(torch.bfloat16)
        net.save_pretrained(model, safe_serialization=True)
        pre = json.loads((model / "preprocessor_config.json").read_text())
        (model / "preprocessor_config.json").write_text(json.dumps({**pre, "min_pixels": 224 * 224,
                                                                    "max_pixels": 224 * 224}))
    if not data.exists():
        (data.parent / "images").mkdir(parents=True, exist_ok=True)
        rng, rows = random.Random(0), []
        for i in range(64):
            c, k, s = rng.choice(list(COLOURS)), rng.choice(KINDS), rng.choice(list(SIZES))
            (data.parent / "images" / f"{i}.png").write_bytes(shape_image(c, k, s, rng))
            rows.append({"messages": [{"role": "user", "content": [{"type": "image", "path": f"images/{i}.png"},
                                                                   {"type": "text", "text": SHAPES_QUESTION}]},
                                      {"role": "assistant", "content": f"A {s} {c} {k}."}]})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def _batches(model: Path, data: Path, steps: int) -> list[dict]:
    """lowbit's first ``steps`` training batches (tokens, labels, pixel inputs)."""
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.training.config import TrainConfig
    from lowbit.training.data import load_data

    tok = load_tokenizer(model)
    cfg = TrainConfig(base_model=str(model), datasets=str(data), micro_batch_size=MB, sequence_len=SEQ,
                      val_set_size=0)
    batches, _ = load_data(cfg, tok, log=lambda *a: None)
    order = batches.order(0)
    return [batches.batch(order[i % len(order)]) for i in range(steps)]


def lowbit_side(model: Path, data: Path, steps: int, gc: bool) -> dict:
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    times = []

    class Clock:
        def on_train_begin(self, state):
            self.t = time.perf_counter()

        def on_step_end(self, state, record):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

        def on_train_end(self, state):
            pass

    cfg = TrainConfig(base_model=str(model), datasets=str(data), micro_batch_size=MB, sequence_len=SEQ,
                      val_set_size=0, max_steps=steps, lora_r=R, lora_alpha=2 * R, lora_target_modules=TARGETS,
                      learning_rate=LR, warmup_steps=0, save_steps=10_000, compute_dtype="float32",
                      gradient_checkpointing=gc,
                      output_dir=str(ROOT / "lowbit-run"))
    res = train(cfg, overwrite=True, progress=False, log=lambda *a: None, callbacks=[Clock()], force=True)
    return {"peak_rss": vm_hwm_bytes(), "step_s": statistics.median(times[2:]), "loss": res.get("train_loss")}


def peer_side(model: Path, data: Path, steps: int, gc: bool) -> dict:
    import logging
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["visual", "lm_head"])
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32, quantization_config=quant)
    if gc:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = get_peft_model(net, LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=LR)
    net.train()
    times = []
    for batch in _batches(model, data, steps):
        t = time.perf_counter()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", *batch["vision_keys"])}
        loss = net(**inputs, labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"peak_rss": vm_hwm_bytes(), "step_s": statistics.median(times[2:]), "loss": float(loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--side", choices=["lowbit", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    model, data = _setup()
    if args.side:
        out = (lowbit_side if args.side == "lowbit" else peer_side)(model, data, args.steps, args.gc)
        print("RESULT " + json.dumps(out))
        return 0
    got = {(side, gc): run_worker(__file__, ["--side", side, "--steps", str(args.steps)] + (["--gc"] if gc else []),
                                  f"{side} (checkpointing {'on' if gc else 'off'})")
           for gc in (False, True) for side in ("lowbit", "peer")}
    if not all(got.values()):
        return 1
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    rows, ratios = [], {}
    for gc in (False, True):
        ours, peer = got[("lowbit", gc)], got[("peer", gc)]
        ratios[gc] = (ours["peak_rss"] / peer["peak_rss"], peer["step_s"] / ours["step_s"])
        rows.append({"checkpointing": "on" if gc else "off", "lowbit peak RSS": gib(ours["peak_rss"]),
                     "peer peak RSS": gib(peer["peak_rss"]), "RSS ratio": f"{ratios[gc][0]:.2f}×",
                     "lowbit step s": f"{ours['step_s']:.2f}", "peer step s": f"{peer['step_s']:.2f}",
                     "speed": f"{ratios[gc][1]:.2f}×"})
    md = table(rows, list(rows[0])) + "\n\npeer: transformers + bitsandbytes + peft; same model, batches, settings."
    publish("multimodal", md, {"steps": args.steps, "micro_batch_size": MB, "lora_r": R,
                               "results": {f"{s}{'-gc' if gc else ''}": r for (s, gc), r in got.items()},
                               "rss_ratio": {"gc_off": ratios[False][0], "gc_on": ratios[True][0]},
                               "speedup": {"gc_off": ratios[False][1], "gc_on": ratios[True][1]}}, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
