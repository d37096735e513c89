"""GRPO on this CPU: lowbit's run on the built-in arithmetic task, its sampler against transformers' ``generate``,
and its peak memory against TRL's GRPOTrainer + peft + bitsandbytes with the same settings — each in its own process.

SmolLM2-135M-Instruct, NF4 + double quantization, LoRA r=16 on all linear layers; ``arithmetic`` (800 prompts "What
is a + b? Answer with only the number."), the last HELD of them held out; rewards ``lowbit.rewards.exact_answer``
and ``answer_format``; 8 completions a prompt of at most 16 tokens, temperature 1, 2 prompts a step (micro-batch 16
completions), β 0, TRL's default loss (dapo), gradient checkpointing on (TRL's GRPO default). The run stops after
``--minutes`` of training. Held-out reward: the mean (exact answer + format, each 0 or 1) of greedy completions on
the held-out prompts, before (adapter off) and after. Sampling: 4 prompts × 8 completions × 32 new tokens from the
same 4-bit model, lowbit's ``sample_completions`` against ``generate(do_sample=True, num_return_sequences=8)``,
without stopping (the same work) and with stopping at EOS (what a run does). Peak RSS is each process's VmHWM
(imports included); TRL runs ``--trl-steps`` steps.

    python bench/grpo.py [--minutes 20] [--trl-steps 6] [--readme]
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

MODEL, G, MAX_NEW, MB, LR, HELD, SEQ = "smollm2-135m", 8, 16, 16, 1e-4, 64, 256
REWARDS = ["lowbit.rewards.exact_answer", "lowbit.rewards.answer_format"]


def _data(folder: Path) -> Path:
    from lowbit.data.builtin import arithmetic

    folder.mkdir(parents=True, exist_ok=True)
    recs = [r.data for r in arithmetic()]
    for name, part in (("train", recs[:-HELD]), ("held", recs[-HELD:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def _held_out_reward(model, tok, data: Path) -> float:
    """Mean of exact_answer + answer_format over greedy completions of the held-out prompts."""
    from lowbit.data.prompts import prompt_row
    from lowbit.data.records import Record
    from lowbit.rewards import answer_format, exact_answer
    from lowbit.training.rollout import sample_completions

    recs = [json.loads(line) for line in (data / "held.jsonl").read_text().splitlines()]
    ids = [prompt_row(Record(r, "held"), tok, "prompt", SEQ, {})["prompt_ids"] for r in recs]
    comps, _ = sample_completions(model, ids, 1, list(range(len(ids))), MAX_NEW, [tok.eos_token_id],
                                  tok.pad_token_id, temperature=1e-6)
    texts = tok.batch_decode(comps, skip_special_tokens=True)
    exact = exact_answer(None, texts, answer=[r["answer"] for r in recs])
    fmt = answer_format(None, texts)
    return sum(a + b for a, b in zip(exact, fmt)) / len(texts)


class _Budget:
    """Stops the run after ``minutes`` of training; keeps step times."""

    def __init__(self, minutes: float):
        self.limit, self.t0, self.times, self.t = minutes * 60, None, [], None

    def on_train_begin(self, state):
        self.t0 = self.t = time.perf_counter()

    def on_step_end(self, state, record):
        now = time.perf_counter()
        self.times.append(now - self.t)
        self.t = now
        if now - self.t0 > self.limit:
            state.stop_reason = f"bench: {self.limit / 60:.0f} minutes of training"

    def on_train_end(self, state):
        pass


def lowbit_worker(data: Path, out: Path, minutes: float) -> dict:
    from lowbit.nn.lora import adapters_disabled
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    cfg = TrainConfig(base_model=MODEL, datasets=str(data / "train.jsonl"), rl="grpo", micro_batch_size=MB,
                      sequence_len=SEQ, max_steps=10_000, learning_rate=LR, warmup_steps=0, lr_scheduler="constant",
                      lora_r=16, lora_alpha=32, save_steps=0, val_set_size=0, output_dir=str(out),
                      gradient_checkpointing=True,
                      trl={"num_generations": G, "max_completion_length": MAX_NEW, "reward_funcs": REWARDS,
                           "log_completions": True})
    budget = _Budget(minutes)
    res = train(cfg, overwrite=True, progress=False, log=lambda *a: None, callbacks=[budget])
    model, tok = res["model"], res["tokenizer"]
    after = _held_out_reward(model, tok, data)
    with adapters_disabled(model):
        before = _held_out_reward(model, tok, data)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"method": "lowbit", "steps": res["steps"], "step_s": statistics.median(budget.times[1:]),
            "peak_rss_bytes": vm_hwm_bytes(), "held_out_before": before, "held_out_after": after,
            "curve": [round(r["reward"], 4) for r in rows],
            "lengths": [round(r["completions/mean_length"], 2) for r in rows]}


def _rewards_for_trl():
    from lowbit.rewards import answer_format, exact_answer

    def exact(completions, answer, **_):
        return exact_answer(None, completions, answer=answer)

    def fmt(completions, **_):
        return answer_format(None, completions)

    return [exact, fmt]


def trl_worker(data: Path, out: Path, steps: int) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    net, tok, _ = peer_qlora_model(MODEL)
    ds = load_dataset("json", data_files=str(data / "train.jsonl"), split="train")
    times = []
    args = GRPOConfig(output_dir=str(out), learning_rate=LR, per_device_train_batch_size=MB, num_generations=G,
                      max_completion_length=MAX_NEW, max_steps=steps, report_to=[], use_cpu=True, bf16=False,
                      save_strategy="no", logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=net, reward_funcs=_rewards_for_trl(), args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[hf_step_clock(times)],
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer.train()
    return {"method": "TRL GRPOTrainer + peft + bitsandbytes", "steps": steps,
            "step_s": statistics.median(times[1:]), "peak_rss_bytes": vm_hwm_bytes()}


def sampling_worker() -> dict:
    """Tokens/s of lowbit's sampler and of transformers' generate on the same 4-bit model and prompts."""
    import torch

    from lowbit.data.builtin import arithmetic
    from lowbit.data.prompts import prompt_row
    from lowbit.io.loader import load
    from lowbit.io.resolve import resolve_model
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.quant.spec import QuantSpec
    from lowbit.training.rollout import sample_completions

    path = resolve_model(MODEL)
    tok = load_tokenizer(path)
    model = load(path, QuantSpec("nf4", 64, True), compute_dtype=torch.float32)
    ids = [prompt_row(r, tok, "prompt", SEQ, {})["prompt_ids"] for r in arithmetic()[:4]]
    new, out = 32, {}
    width = max(len(p) for p in ids)
    batch = {"input_ids": torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in ids]),
             "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])}
    for stop in (False, True):
        stops = [tok.eos_token_id] if stop else []
        sample_completions(model, ids[:1], 2, [0], 2, stops, tok.pad_token_id)  # warm-up
        t = time.perf_counter()
        comps, _ = sample_completions(model, ids, G, list(range(len(ids))), new, stops, tok.pad_token_id)
        mine = sum(len(c) for c in comps) / (time.perf_counter() - t)
        torch.manual_seed(0)
        with torch.no_grad():
            t = time.perf_counter()
            gen = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                                 num_return_sequences=G, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id if stop else None,
                                 **({} if stop else {"min_new_tokens": new}))
            dt = time.perf_counter() - t
        tail = gen[:, width:]
        if stop:  # tokens up to and including each row's first EOS
            n = sum(next((k + 1 for k, x in enumerate(r) if x == tok.eos_token_id), len(r)) for r in tail.tolist())
        else:
            n = tail.numel()
        out["stop" if stop else "fixed"] = {"lowbit_tokens_per_s": mine, "transformers_tokens_per_s": n / dt}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--trl-steps", type=int, default=6)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, data, out = args.worker
        res = lowbit_worker(Path(data), Path(out), args.minutes) if method == "lowbit" else \
            trl_worker(Path(data), Path(out), args.trl_steps) if method == "trl" else sampling_worker()
        print("RESULT " + json.dumps(res))
        return
    from lowbit.cache import cache_root

    root = cache_root() / "bench" / "grpo"
    data = _data(root / "data")
    extra = ["--minutes", str(args.minutes), "--trl-steps", str(args.trl_steps)]
    speed = run_worker(__file__, ["--worker", "sampling", str(data), str(root)], "sampling", tail=3000)
    mine = run_worker(__file__, ["--worker", "lowbit", str(data), str(root / "lowbit"), *extra], "lowbit", tail=3000)
    peer = run_worker(__file__, ["--worker", "trl", str(data), str(root / "trl"), *extra], "trl", tail=3000)
    if mine is None or speed is None:
        raise SystemExit("a side failed (above)")
    rows = [{"method": r["method"], "steps": r["steps"], "step_s": round(r["step_s"], 2),
             "peak_RSS_MiB": round(r["peak_rss_bytes"] / 2**20)} for r in (mine, peer) if r]
    curve = mine["curve"]
    k = max(1, len(curve) // 5)
    fifths = [round(sum(curve[i : i + k]) / len(curve[i : i + k]), 3) for i in range(0, len(curve), k)][:5]
    speed_rows = [{"sampling": "fixed 32 tokens" if key == "fixed" else "stop at EOS",
                   "lowbit_tok_s": round(v["lowbit_tokens_per_s"], 1),
                   "transformers_generate_tok_s": round(v["transformers_tokens_per_s"], 1),
                   "ratio": round(v["lowbit_tokens_per_s"] / v["transformers_tokens_per_s"], 2)}
                  for key, v in speed.items()]
    rss = f"{mine['peak_rss_bytes'] / peer['peak_rss_bytes']:.2f}×" if peer else "not measured (TRL failed)"
    md = (table(rows, list(rows[0])) + "\n\n" + table(speed_rows, list(speed_rows[0])) +
          f"\n\nHeld-out reward (exact answer + format, greedy, {HELD} prompts; 0–2): **{mine['held_out_before']:.3f} "
          f"→ {mine['held_out_after']:.3f}** after {mine['steps']} steps ({args.minutes:g} minutes). Training reward "
          f"(sampled, mean per fifth of the run): {' → '.join(map(str, fifths))}. Peak RSS lowbit / TRL: **{rss}** "
          "(goal ≤ 0.5×); sampling lowbit / generate: see the ratio column (goal ≥ 2×). This CPU; GPUs: not "
          "measured.")
    publish("grpo", md, {"lowbit": mine, "trl": peer, "sampling": speed, "minutes": args.minutes}, args.readme)


if __name__ == "__main__":
    main()
