"""``lowbit generate|chat --model M [--adapter DIR] [--prompt P]``: generate text (prompts from stdin without
``--prompt``), the chat template applied."""

from __future__ import annotations

import sys

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
    add_config_flags(p, MODEL_KEYS, required=("base_model",))
    return p


def run(args) -> int:
    from ..generation import generate
    from ..io.tokenizer import end_token_ids, tokenizer_for

    cfg = config_from(args)
    net = load_model(cfg, args.adapter, args.force)
    tok = tokenizer_for(cfg.base_model, args.adapter)
    stops = end_token_ids(tok, args.adapter)

    def answer(prompt):
        generate(net, tok, prompt, args.max_new_tokens, args.temperature, args.top_p, chat=not args.raw, stream=True,
                 seed=args.seed, stop_ids=stops)

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
