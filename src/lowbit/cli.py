"""``lowbit`` command line: train, eval, generate/chat, merge, quantize, plan.

Every ``train`` config key is also a flag (``lora_r`` → ``--lora-r``); flags override the YAML file.
Problems with the user's input print one line (``error: …``) and exit 2 — no tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

__all__ = ["main"]


def _dtype(name):
    import torch

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise SystemExit(f"error: --dtype must be one of bf16, fp16, fp32 (got {name!r})")
    return table[name]


def _load(args, adapter=True, trainable=False):
    from . import models

    compute = None if getattr(args, "compute_dtype", "auto") == "auto" else _dtype(args.compute_dtype)
    net = models.load(args.model, quantize_weights=not getattr(args, "no_quantize", False),
                      quant_type=getattr(args, "quant_type", "nf4"), compute_dtype=compute,
                      trust_remote_code=getattr(args, "trust_remote_code", False))
    if adapter and getattr(args, "adapter", None):
        models.load_adapter(net, args.adapter, force=getattr(args, "force", False), trainable=trainable)
    return net


def cmd_train(args, extra):
    from .config import apply_overrides, config_to_yaml, load_config
    from .train import train

    cfg = load_config(args.config)
    apply_overrides(cfg, extra, from_string=True)
    cfg.validate()
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    res = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    out = res["output_dir"]
    print(f"\nadapter saved to {out} (PEFT format: adapter_config.json + adapter_model.safetensors)")
    if res["base_eval_loss"] is not None:
        print(f"eval loss: {res['base_eval_loss']:.4f} -> {res['eval_loss']:.4f}")
    print(f"chat with it:  lowbit generate --model {cfg.base_model} --adapter {out} --prompt \"Hello!\"")
    print(f"merge it:      lowbit merge --model {cfg.base_model} --adapter {out} --out {out}-merged")
    return 0


def cmd_eval(args, _):
    from . import models
    from .data import Batches, load_splits, tokenize_records
    from .train import evaluate, resolve_dtype

    net = _load(args)
    tok = models.load_tokenizer(args.model)
    recs, _ = load_splits(args.data, 0)
    data = tokenize_records(recs, tok, args.format, args.sequence_len)
    import math

    loss = evaluate(net, Batches(data.samples, args.batch_size, tok.pad_token_id), resolve_dtype(args.compute_dtype))
    res = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "samples": len(data.samples), "truncated": data.truncated}
    print(json.dumps(res) if args.json else f"loss {loss:.4f}  perplexity {res['perplexity']:.2f}  ({len(data.samples)} samples)")
    return 0


def cmd_generate(args, _):
    from . import models

    net = _load(args)
    tok = models.load_tokenizer(args.model)
    prompts = [args.prompt] if args.prompt else []
    if not prompts:
        if sys.stdin.isatty():
            print("Type a message (Ctrl-D to quit).")
        for line in sys.stdin:
            if line.strip():
                print("> ", end="", flush=True)
                models.generate(net, tok, line.strip(), args.max_new_tokens, args.temperature, args.top_p,
                                chat=not args.raw, stream=True)
        return 0
    models.generate(net, tok, args.prompt, args.max_new_tokens, args.temperature, args.top_p, chat=not args.raw, stream=True)
    return 0


def cmd_merge(args, _):
    from . import models

    net = _load(args)
    tok = models.load_tokenizer(args.model)
    report = models.merge_report(net, tok, args.quant_type) if args.requantize else None
    out = models.merge(net, args.out, dtype=_dtype(args.dtype), tokenizer=tok, overwrite=args.overwrite)
    print(f"merged model written to {out} ({args.dtype}); load it with transformers.AutoModelForCausalLM.from_pretrained")
    if args.requantize:
        q = models.load(out, quant_type=args.quant_type)
        qout = models.save_quantized(q, f"{args.out}-{args.quant_type}", tokenizer=tok, overwrite=args.overwrite)
        print(f"re-quantized ({args.quant_type}) copy written to {qout}")
        print(report)
    return 0


def cmd_quantize(args, _):
    from . import models

    net = models.load(args.model, quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                      trust_remote_code=args.trust_remote_code)
    tok = None
    try:
        tok = models.load_tokenizer(args.model)
    except models.LowbitError:
        pass
    out = models.save_quantized(net, args.out, tokenizer=tok, overwrite=args.overwrite)
    mb = models.model_footprint_bytes(net) / 2**20
    print(f"wrote {out}: {args.quant_type}{'+DQ' if not args.no_double_quant else ''}, {mb:.1f} MiB of weights "
          "(loadable with transformers + bitsandbytes)")
    return 0


def cmd_plan(args, extra):
    try:
        from .plan import main as plan_main
    except ImportError:
        print("lowbit plan: not yet — the memory planner is not in this version")
        return 0
    return plan_main(extra)


def build_parser():
    p = argparse.ArgumentParser(prog="lowbit", description="QLoRA fine-tuning: NF4 + double quantization, LoRA, PEFT adapters.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp, adapter=True):
        sp.add_argument("--model", required=True, help="HF folder, .gguf file, or built-in name (smollm2-135m)")
        if adapter:
            sp.add_argument("--adapter", help="PEFT adapter folder")
            sp.add_argument("--force", action="store_true", help="apply an adapter trained on another base")
        sp.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4", "nf3", "nf2"])
        sp.add_argument("--no-quantize", action="store_true", help="keep the base model unquantized")
        sp.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float32"])
        sp.add_argument("--trust-remote-code", action="store_true")

    from .config import TrainConfig

    keys = "\n".join(f"  --{f.name.replace('_', '-'):<30} {f.default!r}" for f in dataclasses.fields(TrainConfig))
    t = sub.add_parser("train", help="fine-tune with QLoRA (config keys are flags: --lora-r 32)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune. Every config key is a flag too, e.g. --lora-r 32 --learning-rate 1e-4.",
                       epilog=f"config keys (YAML name with _ , flag with -) and defaults:\n{keys}")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    t.add_argument("--overwrite", action="store_true", help="replace the run in output_dir")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="loss and perplexity on a data file")
    model_args(e)
    e.add_argument("--data", required=True, help="JSONL/JSON file, folder, or built-in data set")
    e.add_argument("--format", default="auto")
    e.add_argument("--sequence-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    for name in ("generate", "chat"):
        g = sub.add_parser(name, help="generate text (chat template applied; no --prompt: read prompts from stdin)")
        model_args(g)
        g.add_argument("--prompt")
        g.add_argument("--max-new-tokens", type=int, default=128)
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    m = sub.add_parser("merge", help="fold an adapter into the dequantized base; write a plain HF folder")
    model_args(m, adapter=False)
    m.add_argument("--adapter", required=True)
    m.add_argument("--force", action="store_true")
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    m.add_argument("--requantize", action="store_true", help="also write an NF4 copy and report the merge error")
    m.add_argument("--overwrite", action="store_true")
    q = sub.add_parser("quantize", help="write a 4-bit checkpoint transformers + bitsandbytes load as-is")
    q.add_argument("--model", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    q.add_argument("--no-double-quant", action="store_true")
    q.add_argument("--blocksize", type=int, default=64)
    q.add_argument("--trust-remote-code", action="store_true")
    q.add_argument("--overwrite", action="store_true")
    sub.add_parser("plan", help="will a model fit? itemised memory plan (lowbit plan --help)", add_help=False)
    return p


def _parse_train(argv):
    """``lowbit train [config.yaml] [--resume] [--key value | --key=value ...]``: unknown flags are config keys."""
    args = argparse.Namespace(cmd="train", config=None, print_config=False, resume=False, overwrite=False, quiet=False)
    switches = {"--print-config": "print_config", "--resume": "resume", "--overwrite": "overwrite", "--quiet": "quiet"}
    overrides, i = {}, 0
    while i < len(argv):
        tok = argv[i]
        if tok in switches:
            setattr(args, switches[tok], True)
        elif tok.startswith("--"):
            key, eq, val = tok[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise SystemExit(f"error: flag --{key} needs a value")
                i, val = i + 1, argv[i + 1]
            overrides[key] = val
        elif args.config is None:
            args.config = tok
        else:
            raise SystemExit(f"error: unexpected argument {tok!r} (one config file at most)")
        i += 1
    return args, overrides


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_generate, "merge": cmd_merge,
            "quantize": cmd_quantize, "plan": cmd_plan}


def main(argv=None) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["plan"]:
        args, extra = argparse.Namespace(cmd="plan"), argv[1:]  # the planner parses its own flags
    elif argv[:1] == ["train"] and not {"-h", "--help"} & set(argv):
        args, extra = _parse_train(argv[1:])
    else:
        args, extra = parser.parse_args(argv), []
    from .models import LowbitError

    try:
        return COMMANDS[args.cmd](args, extra) or 0
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
