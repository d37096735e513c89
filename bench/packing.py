"""Sample packing on short samples: real (non-pad) tokens per second and the held-out loss after the same real
tokens, padded vs packed. The built-in chatterbot dialogues (about 57 tokens each) on SmolLM2-135M with the
demo's settings (QLoRA NF4 + DQ, r=16 on all linear layers, sequence_len 256, lr 3e-4, 10 warm-up steps), one
epoch each — every training sample seen once, so every run learns from the same real tokens. Runs one after the
other in this process; the held-out loss is computed unpacked, on the same held-out samples.

    python bench/packing.py [--readme]

Rows: padded to sequence_len and padded to the longest of random batches (30 steps each: speed only), padded
with length-grouped batches (lowbit's default), packed with micro-batch 8 rows (the same setting) and with 2 rows
(about the padded run's tokens per step, and a similar number of optimizer steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, table

# name → (settings, steps: 0 = one epoch, else a speed-only run of that many steps)
RUNS = {"padded to sequence_len (pad_to_sequence_len)": (dict(pad_to_sequence_len=True, group_by_length=False), 30),
        "padded to the batch's longest, random batches": (dict(group_by_length=False), 30),
        "padded, length-grouped batches (lowbit's default)": (dict(), 0),
        "packed, micro-batch 8 rows": (dict(sample_packing=True), 0),
        "packed, micro-batch 2 rows": (dict(sample_packing=True, micro_batch_size=2), 0)}


def run(name: str, settings: dict, work: Path, max_steps: int = 0) -> dict:
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    out = work / name.replace(" ", "_").replace(",", "")
    cfg = TrainConfig(base_model="smollm2-135m", datasets="chatterbot", lora_target_modules="all-linear", lora_r=16,
                      lora_alpha=32, sequence_len=256, num_epochs=1, learning_rate=3e-4, warmup_steps=10,
                      eval_steps=10**6, save_steps=10**6, val_set_size=0.05, output_dir=str(out), seed=0,
                      max_steps=max_steps, **{"micro_batch_size": 8, **settings})
    res = train(cfg, overwrite=True, progress=False, log=lambda *a: None)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    steps = [s for s in steps if "loss" in s and "tokens_per_s" in s]
    last = steps[-1]
    real = last["tokens_per_s"] * last["time_s"]
    epoch = not max_steps
    return {"run": name, "optimizer steps": res["steps"], "real tokens": round(real),
            "train s": round(last["time_s"], 1), "real tokens/s": round(last["tokens_per_s"], 1),
            "held-out loss after one epoch": round(res["eval_loss"], 4) if epoch else "(speed only)"}


def render(rows: list[dict]) -> str:
    from lowbit.data.sources import parse_sources
    from lowbit.data.table import source_tables
    from lowbit.io.tokenizer import load_tokenizer

    data = source_tables(parse_sources("chatterbot"), load_tokenizer("smollm2-135m"), 0.05, 0, 256)
    shown = [{k: f"{v:.4f}" if isinstance(v, float) and k.startswith("held-out") else v for k, v in r.items()}
             for r in rows]
    return table(shown, list(rows[0])) + (
        f"\n\nSmolLM2-135M-Instruct, QLoRA NF4 + DQ, r=16 all-linear, built-in chatterbot ({len(data.train):,} "
        f"training dialogues, {data.train.lengths.mean():.0f} tokens on average; {len(data.valid)} held out), "
        "sequence_len 256, micro-batch 8 unless said, lr 3e-4 cosine, 10 warm-up steps, one epoch; "
        "real tokens/s = non-pad tokens over the training time (no evaluation inside), 2 threads, the same process "
        "one run after the other.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--steps", type=int, default=0, help="stop each run after this many steps (a quick check)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="lowbit-packing-"))
    rows = []
    for name, (settings, steps) in RUNS.items():
        rows.append(run(name, settings, work, args.steps or steps))
        print(rows[-1], flush=True)
    base = rows[2]
    for r in rows:
        r["real tokens/s vs length-grouped"] = f"{r['real tokens/s'] / base['real tokens/s']:.2f}×"
        loss = r["held-out loss after one epoch"]
        r["loss vs length-grouped"] = "" if isinstance(loss, str) else \
            f"{100 * (loss / base['held-out loss after one epoch'] - 1):+.1f} %"
    md = render(rows)
    publish("packing", md, {"rows": rows}, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
