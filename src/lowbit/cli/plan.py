"""``lowbit plan config.yaml | MODEL [--key value ...] [--gpu-memory 48GB]``: will the run fit? An itemised
memory plan of exactly the run ``lowbit train`` would do with the same file and flags. Imports no torch, but for a
vision-language model in a folder, whose processor counts the tokens an image takes (``--image-size``)."""

from __future__ import annotations

import json
from pathlib import Path

from .options import add_config_flags, config_from

HELP = "will a run fit? itemised memory plan (same config file and flags as train)"


def add_parser(sub, name):
    from ..planner.catalog import known_families

    p = sub.add_parser(name, help=HELP, description="Itemised peak memory of a QLoRA run on one device.",
                       epilog=f"known model families: {', '.join(known_families())}")
    p.add_argument("target", nargs="?", help="a training config (.yaml), or a model: folder, config.json or a "
                   "known family name (default: the config's base_model)")
    p.add_argument("--gpu-memory", "--memory", help="device memory, e.g. 48GB (with --device cpu: the host's)")
    p.add_argument("--world-size", type=int, default=1, help="processes torchrun will start (the plan is per rank; "
                   "the config key distributed chooses ddp or fsdp)")
    p.add_argument("--max-sequence-len", "--max-seq-len", action="store_true",
                   help="print the largest sequence_len that fits, and what each memory lever adds to it")
    p.add_argument("--max-micro-batch-size", "--max-batch", action="store_true",
                   help="print the largest micro_batch_size that fits")
    p.add_argument("--image-size", default="448x448", metavar="WxH",
                   help="a vision-language model: the image size whose tokens to count (default 448x448)")
    p.add_argument("--json", action="store_true")
    add_config_flags(p)
    return p


def run(args) -> int:
    from ..errors import LowbitError
    from ..planner.levers import levers
    from ..planner.memory import config_settings, largest, plan_config
    from ..planner.shapes import KNOWN

    is_config = args.target is not None and Path(args.target).suffix.lower() in (".yaml", ".yml")
    cfg = config_from(args, args.target if is_config else None)
    args.device = "cpu" if cfg.device == "cpu" else "cuda"  # the config's device; auto plans for a GPU
    if args.target is not None and not is_config and not hasattr(args, "base_model"):
        cfg.base_model = args.target
    if (args.max_sequence_len or args.max_micro_batch_size) and args.gpu_memory is None:
        raise LowbitError("--max-sequence-len / --max-micro-batch-size need --gpu-memory")
    p = plan_config(cfg, device_memory=args.gpu_memory, device=args.device, world_size=args.world_size)
    out = p.to_json()
    settings = config_settings(cfg, args.device, args.world_size)
    for flag, key in ((args.max_sequence_len, "sequence_len"), (args.max_micro_batch_size, "micro_batch_size")):
        if flag:
            out[f"max_{key}"] = largest(cfg.base_model, key, args.gpu_memory, **settings)
    if args.max_sequence_len:
        out["levers"] = levers(cfg.base_model, args.gpu_memory, **settings)
    images = _image_tokens(cfg.base_model, args.image_size)
    if images:
        out["image_tokens"] = images
    if args.json:
        print(json.dumps(out))
        return 0
    s = p.settings
    quant = "int8 (8-bit base)" if cfg.load_in_8bit else \
        f"{cfg.quant_type}{'+DQ' if cfg.double_quant else ''}" if cfg.load_in_4bit else "16-bit"
    print(f"{cfg.base_model}: sequence_len {cfg.sequence_len} x micro_batch_size {cfg.micro_batch_size}, {quant}, "
          f"LoRA r={cfg.lora_r} ({cfg.lora_target_modules}), {cfg.optimizer}, gradient_checkpointing "
          f"{'on' if cfg.gradient_checkpointing else 'off'}, {s['compute_dtype']} on {args.device}"
          + (f", per rank of {args.world_size} ({s['distributed']})" if args.world_size > 1 else "")
          + (f", rl: {cfg.rl} (a row each for the chosen and the rejected completion)"
             if s.get("rows_per_sample", 1) > 1 else "")
          + (f", rl: grpo (rows of prompt + {s['completion_len']} completion tokens; sampling "
             f"{s['generation_rows']} rows a step with a KV cache)" if s.get("generation_rows") else "") + "\n")
    print(p.table())
    if s.get("model_type") not in KNOWN:
        print(f"note: model type {s.get('model_type')!r} is planned as a LLaMA-style decoder (q/k/v/o, gate/up/down); "
              "its own layer shapes are not known to the planner")
    if images:
        print(f"images: {images['tokens']} image tokens per {images['size']} image ({images['source']}), part of "
              "sequence_len like text" if images["tokens"] is not None else f"images: {images['source']}")
    for key in ("sequence_len", "micro_batch_size"):
        if f"max_{key}" in out:
            print(f"largest {key} that fits: {out[f'max_{key}']:,}")
    if len(out.get("levers", [])) > 1:
        print(f"longest sequence_len in {args.gpu_memory}, each lever on top of the ones above it:")
        for row in out["levers"]:
            print(f"  {row['change']:<36}{row['max_sequence_len']:>12,}")
    return 0


def _image_tokens(model: str, size: str) -> dict | None:
    """{size, tokens, source} for a vision-language model: counted by its processor when ``model`` is a folder
    holding one; None for a text model."""
    from ..errors import LowbitError
    from ..io.processor import PROCESSOR_FILE
    from ..planner.catalog import load_model_config
    from ..planner.vision import is_vision

    if not is_vision(load_model_config(model)):
        return None
    w, _, h = size.lower().partition("x")
    if not (w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
        raise LowbitError(f"--image-size: expected WIDTHxHEIGHT in pixels, e.g. 448x448, got {size!r}")
    w, h = int(w), int(h)
    if not (Path(model) / PROCESSOR_FILE).is_file():
        return {"size": f"{w}x{h}", "tokens": None, "source": f"not counted: no {PROCESSOR_FILE} beside the model"}
    from ..data.images import image_tokens
    from ..io.processor import load_processor

    return {"size": f"{w}x{h}", "tokens": image_tokens(load_processor(model), w, h), "source": "the model's processor"}
