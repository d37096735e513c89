"""``make demo``: QLoRA-fine-tune the built-in SmolLM2-135M-Instruct on the built-in chatterbot corpus, offline.

Prints the held-out loss before → after and the answers to the same held-out questions before and after.
A few minutes on 2 CPU cores. ``python -m lowbit.demo --steps 40`` for a shorter run.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import models
from .config import TrainConfig
from .data import load_splits
from .models import LowbitError
from .train import train


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--output-dir", default="runs/demo")
    args = ap.parse_args(argv)
    cfg = TrainConfig(base_model="smollm2-135m", datasets="chatterbot", quant_type="nf4", double_quant=True,
                      lora_target_modules="all-linear", lora_r=16, lora_alpha=32, micro_batch_size=8,
                      sequence_len=256, max_steps=args.steps, learning_rate=3e-4, warmup_steps=10,
                      eval_steps=50, save_steps=50, val_set_size=0.05, output_dir=args.output_dir, seed=0)
    try:
        print("lowbit demo: QLoRA (NF4 + double quant, LoRA r=16 on all linear layers) on SmolLM2-135M-Instruct,\n"
              "built-in chatterbot corpus, offline, on this CPU.\n", flush=True)
        _, valid = load_splits(cfg.datasets, cfg.val_set_size, cfg.seed)
        asks = [r.data["messages"][0]["content"] for r in valid]
        questions = [q for q in asks if q.lower().startswith(("what", "who", "how", "do you", "can you"))][:4]
        base = models.load(cfg.base_model)
        tok = models.load_tokenizer(cfg.base_model)
        before = [models.generate(base, tok, q, max_new_tokens=40) for q in questions]
        del base
        t0 = time.time()
        res = train(cfg, overwrite=True)
        after = [models.generate(res["model"], tok, q, max_new_tokens=40) for q in questions]
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n=== trained {res['steps']} steps in {time.time() - t0:.0f} s ({res['tokens_per_s']:.0f} tokens/s)")
    print(f"held-out loss: {res['base_eval_loss']:.4f} -> {res['eval_loss']:.4f}")
    for q, b, a in zip(questions, before, after):
        print(f"\nQ: {q}\n  before: {_one_line(b)}\n  after:  {_one_line(a)}")
    out = cfg.output_dir
    print(f"\nadapter (PEFT format) in {out}/, loss curve in {out}/loss.png")
    print(f"chat:  lowbit generate --model smollm2-135m --adapter {out} --prompt \"what is a wavelength\"")
    print(f"merge: lowbit merge --model smollm2-135m --adapter {out} --out {out}-merged")
    if not res["eval_loss"] < res["base_eval_loss"]:
        print("error: held-out loss did not go down", file=sys.stderr)
        return 1
    return 0


def _one_line(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
