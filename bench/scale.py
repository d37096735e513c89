"""Several processes on one machine: QLoRA on SmolLM2-135M-Instruct in 1 process vs 2 processes (DDP, FSDP2),
launched by torchrun with gloo, the same global batch per step (8 sequences × 256 tokens: 1 process × 4 × 2
accumulated, or 2 ranks × 4): tokens/s, peak RSS per rank, 4-bit base bytes per rank.

    python bench/scale.py [--steps 6]

On 2 CPU cores the single process uses both cores' threads; torchrun gives each of 2 processes one thread
(OMP_NUM_THREADS=1). GPUs (nccl) were not measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, update_readme, write_json

SETUPS = [("1 process", 1, "none"), ("2 processes, DDP", 2, "ddp"), ("2 processes, FSDP2", 2, "fsdp")]
GLOBAL_BATCH, MICRO, SEQ, WARMUP = 8, 4, 256, 2


def _data(folder: Path) -> Path:
    """Plain-text records of real dialogue, each longer than SEQ tokens, so every row is exactly SEQ tokens."""
    from lowbit.data.records import load_splits

    recs, _ = load_splits("chitchat", 0)
    text = [" ".join(m["content"] for m in r.data["messages"]) for r in recs]
    rows, cur = [], ""
    for t in text:
        cur += " " + t
        if len(cur) > 6 * SEQ:
            rows.append({"text": cur})
            cur = ""
    path = folder / "text.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:400]) + "\n")
    return path


def worker(mode: str, steps: int, data: str, out: str) -> dict:
    import torch

    from lowbit.training import distributed, recipe
    from lowbit.training.config import TrainConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainConfig(base_model="smollm2-135m", datasets=data, dataset_format="text", sequence_len=SEQ,
                      micro_batch_size=MICRO, gradient_accumulation_steps=GLOBAL_BATCH // (MICRO * world),
                      max_steps=WARMUP + steps, learning_rate=1e-4, warmup_steps=0, val_set_size=0,
                      save_steps=10**6, distributed=mode if world > 1 else "none", output_dir=out)
    res = recipe.train(cfg, progress=False, log=lambda *a: None)
    times = []
    if res["rank"] == 0:  # rank 0 writes metrics.jsonl: time_s at the end of every step
        recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        times = [b["time_s"] - a["time_s"] for a, b in itertools.pairwise(recs)][WARMUP - 1:]
    return {"rank": res["rank"], "world": world, "threads": torch.get_num_threads(),
            "step_s": statistics.median(times) if times else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "base_bytes": distributed.base_bytes(res["model"])}


def run(name: str, nproc: int, mode: str, steps: int, data: Path) -> dict | None:
    out = tempfile.mkdtemp(prefix="scale-")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    p = subprocess.run([*launcher, __file__, "--worker", mode, str(steps), str(data), out], capture_output=True,
                       text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    ranks = [json.loads(row[7:]) for row in p.stdout.splitlines() if row.startswith("RESULT ")]
    if p.returncode or len(ranks) != nproc:
        print(f"{name} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        return None
    step_s = next(r["step_s"] for r in ranks if r["rank"] == 0)
    return {"setup": name, "processes": nproc, "threads_per_process": ranks[0]["threads"], "step_s": step_s,
            "tokens_per_s": GLOBAL_BATCH * SEQ / step_s,
            "peak_rss_bytes_per_rank": [r["peak_rss_bytes"] for r in ranks],
            "base_bytes_per_rank": [r["base_bytes"] for r in ranks]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worker", nargs=4)
    a = ap.parse_args()
    if a.worker:
        mode, steps, data, out = a.worker
        print("RESULT " + json.dumps(worker(mode, int(steps), data, out)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp))
        res = [r for r in (run(name, n, mode, a.steps, data) for name, n, mode in SETUPS) if r]
    rows = [{"setup": r["setup"], "threads/process": r["threads_per_process"], "tokens/s": round(r["tokens_per_s"]),
             "step_s": round(r["step_s"], 2), "peak_RSS_MiB/rank": max(r["peak_rss_bytes_per_rank"]) // 2**20,
             "4-bit base MiB/rank": round(max(r["base_bytes_per_rank"]) / 2**20, 1)} for r in res]
    md = table(rows, list(rows[0]))
    note = (f"SmolLM2-135M, QLoRA NF4+DQ, LoRA r=16 all-linear, global batch {GLOBAL_BATCH} × {SEQ} tokens per step, "
            f"median of {a.steps} steps after {WARMUP}; gloo on this {os.cpu_count()}-core CPU. GPUs: not measured.")
    print(f"{note}\n\n{md}")
    update_readme("scale", f"{md}\n\n{note}")
    print(f"wrote {write_json('scale', {'machine': machine(), 'results': res, 'note': note})}")


if __name__ == "__main__":
    main()
