"""Soak: 2,000 training steps on a tiny model through ``lowbit.train`` — does anything grow that should not?

    python bench/soak.py [--steps 2000]

Reports the resident memory (RSS, /proc/self/statm) after warm-up (step 100) and at the end, sampled every 100
steps, the largest number of checkpoints on disk at any save (must stay ≤ save_total_limit), and the lines of
metrics.jsonl against the steps (must be equal). One sample swings by ±4 % with evaluations, checkpoints and the
allocator returning pages, so growth (goal ≤ 2 %) is judged on the trend: the mean of the last quarter of the
samples against the mean of the first quarter after warm-up; the single-point figures are printed beside it.
A tiny random LLaMA with SmolLM2's tokenizer, the built-in chatterbot data, a checkpoint every 50 steps,
evaluation every 250.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_readme, write_json

WARM = 100


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.io.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args()
    from lowbit.training.callbacks import Callback
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    limit = 2

    class Watch(Callback):
        def __init__(self, out: Path):
            self.out, self.rss, self.most_checkpoints = out, {}, 0

        def on_step_end(self, state, record):
            if state.step % WARM == 0 or state.step == a.steps:
                self.rss[state.step] = _rss()
            ck = self.out / "checkpoints"
            if ck.exists():
                self.most_checkpoints = max(self.most_checkpoints, sum(1 for p in ck.glob("step-*")))

    with tempfile.TemporaryDirectory() as tmp:
        model = _tiny_model(Path(tmp) / "model")
        out = Path(tmp) / "run"
        cfg = TrainConfig(base_model=str(model), datasets="chatterbot", compute_dtype="float32", micro_batch_size=4,
                          sequence_len=64, max_steps=a.steps, learning_rate=1e-3, warmup_steps=10, eval_steps=250,
                          save_steps=50, save_total_limit=limit, val_set_size=16, output_dir=str(out), lora_r=8)
        watch = Watch(out)
        t0 = time.perf_counter()
        train(cfg, progress=False, log=lambda *x: None, callbacks=[watch])
        wall = time.perf_counter() - t0
        lines = sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
        on_disk = sum(1 for p in (out / "checkpoints").glob("step-*"))
    samples = [watch.rss[k] for k in sorted(watch.rss) if k >= WARM]
    q = max(1, len(samples) // 4)
    growth = (sum(samples[-q:]) / q) / (sum(samples[:q]) / q) - 1
    point = watch.rss[a.steps] / watch.rss[WARM] - 1
    res = {"steps": a.steps, "wall_s": wall, "rss_after_warmup_bytes": watch.rss[WARM],
           "rss_at_end_bytes": watch.rss[a.steps], "rss_growth_trend": growth, "rss_growth_point": point,
           "rss_min_bytes": min(samples), "rss_max_bytes": max(samples), "save_total_limit": limit,
           "most_checkpoints_on_disk": watch.most_checkpoints, "checkpoints_at_end": on_disk,
           "metrics_lines": lines, "rss_every_100_steps": watch.rss, "machine": machine()}
    rows = [{"steps": a.steps, f"RSS at step {WARM} MiB": round(watch.rss[WARM] / 2**20, 1),
             "RSS at end MiB": round(watch.rss[a.steps] / 2**20, 1), "growth (last vs first quarter) %":
             round(100 * growth, 2), "RSS range MiB": f"{min(samples) / 2**20:.0f}–{max(samples) / 2**20:.0f}",
             "most checkpoints on disk": f"{watch.most_checkpoints} (limit {limit})",
             "metrics lines": lines, "wall s": round(wall)}]
    md = table(rows, list(rows[0]))
    print(md)
    ok = growth <= 0.02 and watch.most_checkpoints <= limit and lines == a.steps
    print("goals met" if ok else "GOALS MISSED", f"(growth ≤ 2 %, checkpoints ≤ {limit}, lines = steps)")
    if a.steps == 2000:
        update_readme("soak", md)
    print(f"wrote {write_json('soak', res)}")


if __name__ == "__main__":
    main()
