"""``lowbit train [config.yaml] [--key value ...]``: fine-tune; flags override the YAML file."""

from __future__ import annotations

import signal
import sys

from .options import add_config_flags, config_from

HELP = "fine-tune with QLoRA (every config key is a flag too: --lora-r 32)"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP, description="Fine-tune. Every config key is a flag, e.g. --lora-r 32 "
                       "--learning-rate 1e-4; flags override the YAML file.")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace the run in output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="run even if the memory plan says it will not fit")
    add_config_flags(p)
    return p


def run(args) -> int:
    from ..training.axolotl import Report
    from ..training.config import config_to_yaml
    from ..training.recipe import train

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started from a background job (`nohup … &` in a script; the web page launched that way): Ctrl-C arrives
        # ignored, inherited — the page's Stop and `kill -INT` must still checkpoint and end the run
        signal.signal(signal.SIGINT, signal.default_int_handler)
    report = Report()
    cfg = config_from(args, args.config, report)
    for line in report.lines():
        print(line, file=sys.stderr if args.print_config else sys.stdout)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    res = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, force=args.force)
    if res["rank"]:
        return 0  # under torchrun, rank 0 reports
    out = res["output_dir"]
    print(f"\nadapter saved to {out} (PEFT format: adapter_config.json + adapter_model.safetensors)")
    if res["base_eval_loss"] is not None:
        print(f"eval loss: {res['base_eval_loss']:.4f} -> {res['eval_loss']:.4f}")
    print(f"chat with it:  lowbit generate --model {cfg.base_model} --adapter {out} --prompt \"Hello!\"")
    print(f"merge it:      lowbit merge --model {cfg.base_model} --adapter {out} --out {out}-merged")
    return 0
