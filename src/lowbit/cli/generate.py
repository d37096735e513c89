"""``lowbit generate|chat --model M [--adapter DIR] [--prompt P] [--image PATH …]``: generate text (prompts from
stdin without ``--prompt``), the chat template applied; a vision-language model sees the images with each prompt."""

from __future__ import annotations

import sys
from pathlib import Path

from .options import MODEL_KEYS, add_config_flags, config_from, load_model

HELP = "generate text (chat template applied; no --prompt: read prompts from stdin)"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP)
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base")
    p.add_argument("--prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (lowbit serve answers alike)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image shown with each prompt (vision-language models; repeat for several)")
    add_config_flags(p, MODEL_KEYS, required=("base_model",))
    return p


def run(args) -> int:
    from ..data.images import processor_of
    from ..errors import LowbitError
    from ..generation import generate
    from ..io.tokenizer import end_token_ids, tokenizer_for

    cfg = config_from(args)
    for f in args.image:
        if not Path(f).is_file():
            raise LowbitError(f"--image: {f} not found")
    if args.image and args.raw:
        raise LowbitError("--image needs the chat template (it places the image); drop --raw")
    tok = tokenizer_for(cfg.base_model, args.adapter)
    if args.image and processor_of(tok) is None:
        raise LowbitError(f"--image: {cfg.base_model} is not a vision-language model (no image processor)")
    net = load_model(cfg, args.adapter, args.force)
    stops = end_token_ids(tok, args.adapter)

    def answer(prompt):
        generate(net, tok, prompt, args.max_new_tokens, args.temperature, args.top_p, chat=not args.raw, stream=True,
                 seed=args.seed, stop_ids=stops, images=args.image)

    if args.prompt:
        answer(args.prompt)
        return 0
    if sys.stdin.isatty():
        print("Type a message (Ctrl-D to quit).")
    for line in sys.stdin:
        if line.strip():
            print("> ", end="", flush=True)
            answer(line.strip())
    return 0
