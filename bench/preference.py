"""Preference tuning: lowbit's DPO against TRL's DPOTrainer + peft + bitsandbytes on the same pairs, in one run.

SmolLM2-135M-Instruct, NF4 + double quantization, LoRA r=16 on all linear layers, DPO β 0.1, the built-in
``chatterbot-pairs`` (written once to a train/valid folder, so both read the same files in the same order: lowbit's
``curriculum_sampling``, TRL's sequential sampler), micro-batch 4 pairs, the same learning rate and steps, the same
compute dtype; gradient checkpointing off on both sides, then on on both sides. Each side runs in its own process;
peak RSS is that process's VmHWM (imports included). Speed is the median step time after the first 2 steps
(evaluation excluded), tokens counted as non-pad tokens of the chosen and rejected rows. Held-out preference
accuracy (the share of pairs whose chosen reward is higher; 0 before training, when every margin is 0) and mean
margin are lowbit's evaluation before and after.

    python bench/preference.py [--steps 30] [--readme]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hf_step_clock, peer_qlora_model, publish, run_worker, table, vm_hwm_bytes

MODEL, BETA, LR, MB, SEQ, VALID = "smollm2-135m", 0.1, 5e-5, 4, 256, 64


def _data(folder: Path) -> Path:
    """The built-in pairs as train.jsonl / valid.jsonl (the last VALID pairs held out)."""
    from lowbit.data.builtin import chatterbot_pairs

    if not (folder / "train.jsonl").exists():
        folder.mkdir(parents=True, exist_ok=True)
        recs = [r.data for r in chatterbot_pairs()]
        for name, part in (("train", recs[:-VALID]), ("valid", recs[-VALID:])):
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


class _Clock:
    """Step times and tokens (a lowbit callback)."""

    def __init__(self):
        self.t, self.times, self.tokens, self.seen = None, [], [], 0

    def on_train_begin(self, state):
        self.t, self.seen = time.perf_counter(), state.tokens_seen

    def on_step_end(self, state, record):
        now = time.perf_counter()
        if "eval_loss" not in record:
            self.times.append(now - self.t)
            self.tokens.append(state.tokens_seen - self.seen)
        self.t, self.seen = now, state.tokens_seen

    def on_train_end(self, state):
        pass


def lowbit_worker(data: Path, steps: int, out: Path, checkpointing: bool) -> dict:
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    cfg = TrainConfig(base_model=MODEL, datasets=str(data), rl="dpo", rl_beta=BETA, micro_batch_size=MB,
                      sequence_len=SEQ, max_steps=steps, learning_rate=LR, warmup_steps=0, lora_r=16, lora_alpha=32,
                      eval_steps=steps, save_steps=0, output_dir=str(out), curriculum_sampling=True,
                      gradient_checkpointing=checkpointing)
    clock, logs = _Clock(), []
    res = train(cfg, overwrite=True, progress=False, log=logs.append, callbacks=[clock])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = next(str(m) for m in logs if "eval loss before training" in str(m))
    acc0 = float(before.split("preference accuracy ")[1].split(",")[0])
    margin0 = float(before.split("mean margin ")[1].rstrip(")"))
    timed = list(zip(clock.times, clock.tokens))[2:]
    step_s = statistics.median(t for t, _ in timed)
    return {"method": "lowbit", "step_s": step_s, "tokens_per_s": sum(n for _, n in timed) / sum(t for t, _ in timed),
            "peak_rss_bytes": vm_hwm_bytes(), "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
            "eval_loss_before": res["base_eval_loss"], "eval_loss_after": res["eval_loss"],
            "accuracy_before": acc0, "accuracy_after": rows[-1]["eval_rewards/accuracies"],
            "margin_before": margin0, "margin_after": rows[-1]["eval_rewards/margins"]}


def trl_worker(data: Path, steps: int, out: Path, checkpointing: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    net, tok, dtype = peer_qlora_model(MODEL)
    ds = load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    times, tokens = [], []

    args = DPOConfig(output_dir=str(out), beta=BETA, learning_rate=LR, per_device_train_batch_size=MB,
                     max_length=SEQ, max_steps=steps, lr_scheduler_type="cosine", warmup_steps=0, report_to=[],
                     use_cpu=True, bf16=dtype == torch.bfloat16, save_strategy="no", logging_steps=1,
                     train_sampling_strategy="sequential", optim="adamw_torch", weight_decay=0.0,
                     disable_tqdm=True, gradient_checkpointing=checkpointing,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = DPOTrainer(model=net, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[hf_step_clock(times)],
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    rows = [trainer.train_dataset[i] for i in range(steps * MB)]
    for k in range(steps):
        part = rows[k * MB : (k + 1) * MB]
        tokens.append(sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in part))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = list(zip(times, tokens))[2:]
    return {"method": "TRL DPOTrainer + peft + bitsandbytes", "step_s": statistics.median(t for t, _ in timed),
            "tokens_per_s": sum(n for _, n in timed) / sum(t for t, _ in timed), "peak_rss_bytes": vm_hwm_bytes(),
            "first_loss": losses[0], "last_loss": losses[-1]}


def _run(method: str, data: Path, steps: int, out: Path, checkpointing: bool) -> dict | None:
    return run_worker(__file__, ["--worker", method, str(data), str(out), "--steps", str(steps),
                                 *(["--checkpointing"] if checkpointing else [])], method, tail=3000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, data, out = args.worker
        fn = lowbit_worker if method == "lowbit" else trl_worker
        print("RESULT " + json.dumps({**fn(Path(data), args.steps, Path(out), args.checkpointing),
                                      "gradient_checkpointing": args.checkpointing}))
        return
    from lowbit.cache import cache_root

    root = cache_root() / "bench" / "preference"
    data = _data(root / "pairs")
    results, rows, ratios = [], [], {}
    for gc in (False, True):
        mine = _run("lowbit", data, args.steps, root / "lowbit", gc)
        peer = _run("trl", data, args.steps, root / "trl", gc)
        if mine is None or peer is None:
            raise SystemExit("a side failed (above)")
        results += [mine, peer]
        ratios[gc] = (mine["tokens_per_s"] / peer["tokens_per_s"], mine["peak_rss_bytes"] / peer["peak_rss_bytes"])
        for r in (mine, peer):
            rows.append({"method": r["method"], "checkpointing": "on" if gc else "off",
                         "tokens_per_s": round(r["tokens_per_s"], 1), "step_s": round(r["step_s"], 2),
                         "peak_RSS_MiB": round(r["peak_rss_bytes"] / 2**20),
                         "loss first→last": f"{r['first_loss']:.4f} → {r['last_loss']:.4f}"})
    mine = results[0]
    md = (table(rows, list(rows[0])) + "\n\nlowbit / TRL: " + "; ".join(
        f"checkpointing {'on' if gc else 'off'} **{s:.2f}× tokens/s, {m:.2f}× peak RSS**" for gc, (s, m) in
        ratios.items()) + f" (goals: ≥ 1.3×, ≤ 0.5×). Held-out pairs ({VALID}), lowbit: accuracy "
        f"{mine['accuracy_before']:.3f} → {mine['accuracy_after']:.3f} (0 at the start: every margin is 0), mean "
        f"margin {mine['margin_before']:.4f} → {mine['margin_after']:.4f}, DPO loss {mine['eval_loss_before']:.4f} → "
        f"{mine['eval_loss_after']:.4f} after {args.steps} steps (micro-batch {MB} pairs, lr {LR}, β {BETA}). "
        "This CPU; GPUs: not measured.")
    publish("preference", md, {"results": results, "ratios": {str(k): v for k, v in ratios.items()},
                               "steps": args.steps}, args.readme)


if __name__ == "__main__":
    main()
