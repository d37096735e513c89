"""``make demo``: QLoRA-fine-tune the built-in SmolLM2-135M-Instruct on the built-in chatterbot corpus, offline.

Prints the held-out loss before → after and the answers to the same held-out questions before and after.
A few minutes on 2 CPU cores. ``lowbit demo --steps 40`` for a shorter run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HELP = "fine-tune the built-in SmolLM2-135M on the built-in chatterbot corpus (what make demo runs)"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP, description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--output-dir", default="runs/demo")
    return p


def run(args) -> int:
    from ..data.records import load_splits
    from ..generation import generate
    from ..io.loader import load
    from ..io.tokenizer import load_tokenizer
    from ..training.config import TrainConfig
    from ..training.recipe import train

    cfg = TrainConfig(base_model="smollm2-135m", datasets="chatterbot", quant_type="nf4", double_quant=True,
                      lora_target_modules="all-linear", lora_r=16, lora_alpha=32, micro_batch_size=8,
                      sequence_len=256, max_steps=args.steps, learning_rate=3e-4, warmup_steps=10,
                      eval_steps=50, save_steps=50, val_set_size=0.05, output_dir=args.output_dir, seed=0)
    print("lowbit demo: QLoRA (NF4 + double quant, LoRA r=16 on all linear layers) on SmolLM2-135M-Instruct,\n"
          "built-in chatterbot corpus, offline, on this CPU.\n", flush=True)
    _, valid = load_splits(cfg.datasets, cfg.val_set_size, cfg.seed)
    asks = [r.data["messages"][0]["content"] for r in valid]
    questions = [q for q in asks if q.lower().startswith(("what", "who", "how", "do you", "can you"))][:4]
    base = load(cfg.base_model)
    tok = load_tokenizer(cfg.base_model)
    before = [generate(base, tok, q, max_new_tokens=40) for q in questions]
    del base
    t0 = time.time()
    res = train(cfg, overwrite=True)
    after = [generate(res["model"], tok, q, max_new_tokens=40) for q in questions]
    print(f"\n=== trained {res['steps']} steps in {time.time() - t0:.0f} s ({res['tokens_per_s']:.0f} tokens/s)")
    print(f"held-out loss: {res['base_eval_loss']:.4f} -> {res['eval_loss']:.4f}")
    for q, b, a in zip(questions, before, after):
        print(f"\nQ: {q}\n  before: {_one_line(b)}\n  after:  {_one_line(a)}")
    out = cfg.output_dir
    print(f"\nadapter (PEFT format) in {out}/, loss curve in {out}/loss.png")
    print(f"chat:  lowbit generate --model smollm2-135m --adapter {out} --prompt \"what is a wavelength\"")
    print(f"merge: lowbit merge --model smollm2-135m --adapter {out} --out {out}-merged")
    gguf = Path(out).with_suffix(".gguf")
    print(f"llama.cpp / Ollama: lowbit export --model smollm2-135m --adapter {out} --out {gguf} --type q8_0 --ollama"
          f" && ollama create lowbit-demo -f {gguf.with_name('Modelfile')}")
    if not res["eval_loss"] < res["base_eval_loss"]:
        print("error: held-out loss did not go down", file=sys.stderr)
        return 1
    return 0


def _one_line(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"
