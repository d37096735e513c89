"""Data at scale: reading and tokenizing 1,000,000 generated chat samples (JSONL, OpenAI ``messages``) with
SmolLM2's chat template — wall time and peak RSS through the ``datasets`` path (Arrow, 2 tokenizing processes),
the same again with the tokenization cache warm, and the in-memory path (Python records and lists) on a tenth of
the rows for comparison. Each measurement runs in its own process (peak RSS is per process; the tokenizing
workers' peak is reported apart).

    python bench/data.py [--rows 1000000] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, table

WORDS = ("light wave energy river mountain music number planet garden engine language market history winter "
         "story signal forest ocean window silver thunder circle bridge letter voice metal cloud season").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            q = f"what is the {rng.choice(WORDS)} of the {rng.choice(WORDS)} number {i}?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "."
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")


def child(mode: str, path: str) -> None:
    """One measurement, printed as JSON: wall time, rows, real tokens, peak RSS (this process, workers)."""
    from lowbit.io.tokenizer import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    t0 = time.perf_counter()
    if mode == "in-memory":
        from lowbit.data.formats import tokenize_records
        from lowbit.data.records import load_records

        samples = tokenize_records(load_records(path), tok, sequence_len=512).samples
        rows, tokens = len(samples), sum(len(s[0]) for s in samples)
    else:
        from lowbit.data.sources import parse_sources
        from lowbit.data.table import source_tables

        data = source_tables(parse_sources(path), tok, 0, sequence_len=512, processes=2)
        rows, tokens = len(data.train), data.train.real_tokens()
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "rows": rows, "tokens": int(tokens),
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "workers_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))


def measure(mode: str, path: Path, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    work = Path(tempfile.mkdtemp(prefix="lowbit-data-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}
    big, small = work / "chat-big.jsonl", work / "chat-small.jsonl"
    generate(big, args.rows)
    generate(small, args.rows // 10)
    runs = [("datasets (Arrow), 2 processes, cold cache", "datasets", big),
            ("datasets (Arrow), cache warm", "datasets", big),
            ("in-memory records and lists (a tenth of the rows)", "in-memory", small),
            ("datasets (Arrow), 2 processes, cold cache (a tenth of the rows)", "datasets", small)]
    rows = []
    for name, mode, path in runs:
        r = measure(mode, path, env)
        rows.append({"path": name, "rows": r["rows"], "file MB": round(path.stat().st_size / 1e6),
                     "real tokens": r["tokens"], "wall s": round(r["wall_s"], 1),
                     "rows/s": round(r["rows"] / r["wall_s"]), "peak RSS MiB": round(r["rss"] / 2**20),
                     "tokenizing workers' peak RSS MiB": round(r["workers_rss"] / 2**20) if r["workers_rss"] else 0})
        print(rows[-1], flush=True)
    md = table(rows, list(rows[0])) + (
        "\n\nGenerated two-turn chat samples (OpenAI `messages`), SmolLM2's chat template, sequence_len 512, "
        "assistant turns learned; wall time from reading the file to the token table ready for batching, each "
        "in a fresh process; peak RSS of that process and, apart, of its tokenizing workers.")
    publish("data", md, {"rows": rows}, args.readme)
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
