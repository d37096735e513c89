"""``lowbit serve`` under load: 32 concurrent clients × 4 requests each on SmolLM2-135M-Instruct (NF4 + DQ), over
loopback, through the official ``openai`` client — against the same 128 requests sent one at a time to the same
server process (the like-with-like baseline: same model, dtype, prompts, seeds and token counts).

Each request is a chat turn with ``max_tokens`` tokens, sampled at temperature 0.7 with its own ``seed``, so its
answer does not depend on what shares its batch: "nothing mixed up" compares every concurrent answer with the same
request's answer alone, and "nothing dropped" counts answers with a finish reason. Latency is per request (sent →
last token); tokens/s counts completion tokens over the wall time of the whole phase. The server runs in its own
process (its RSS is read from /proc); ``--soak S`` then repeats the concurrent phase for S seconds and reports the
server's RSS every round and its trend.

    python bench/serve.py [--clients 32] [--requests 4] [--max-tokens 32] [--soak 600] [--readme]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, table

MODEL = "smollm2-135m"
TOPICS = ["the sea", "bread", "volcanoes", "bees", "the moon", "chess", "rain", "trains", "music", "glass", "owls",
          "salt", "maps", "clocks", "rivers", "paper"]
ASKS = ["Tell me one fact about {}.", "Write a short sentence about {}.", "Why do people like {}?",
        "Describe {} in a few words.", "What colour is usually linked with {}?", "Give a tip about {}.",
        "Ask me a question about {}.", "What rhymes with {}?"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _start(port: int, max_batch: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "serve", "--model", MODEL, "--port", str(port),
                             "--max-batch", str(max_batch), "--compute-dtype", "float32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def _ask(client, model, job, max_tokens):
    t0 = time.monotonic()
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": job[1]}],
                                       max_tokens=max_tokens, temperature=0.7, seed=job[0])
    choice = r.choices[0]
    return {"id": job[0], "text": choice.message.content, "finish": choice.finish_reason,
            "tokens": r.usage.completion_tokens, "latency": time.monotonic() - t0}


def _phase(client, model, jobs, clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """(answers, wall seconds): ``jobs`` split over ``clients`` threads, each sending its share one after the other."""
    out, errors = [], []
    shares = [jobs[i::clients] for i in range(clients)]

    def work(share):
        for job in share:
            try:
                out.append(_ask(client, model, job, max_tokens))
            except Exception as e:  # counted as dropped
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"{len(errors)} requests failed, e.g. {errors[0]}", file=sys.stderr)
    return sorted(out, key=lambda a: a["id"]), time.monotonic() - t0


def _row(name, answers, wall, n_jobs, reference=None) -> dict:
    lat = sorted(a["latency"] for a in answers)
    tokens = sum(a["tokens"] for a in answers)
    row = {"phase": name, "requests": n_jobs, "answered": sum(a["finish"] is not None for a in answers),
           "tokens": tokens, "wall_s": round(wall, 1), "tokens_per_s": round(tokens / wall, 1),
           "p50_s": round(statistics.median(lat), 2), "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2)}
    if reference is not None:
        alone = {a["id"]: a["text"] for a in reference}
        row["same_as_alone"] = sum(alone.get(a["id"]) == a["text"] for a in answers)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--soak", type=float, default=0, help="seconds of repeated concurrent rounds (RSS trend)")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    import openai

    n = args.clients * args.requests
    jobs = [(i, ASKS[i % len(ASKS)].format(TOPICS[(i // len(ASKS)) % len(TOPICS)])) for i in range(n)]
    port = _free_port()
    proc = _start(port, args.clients)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        _phase(client, model, jobs[:2], 1, 4)  # warm-up
        alone, wall_alone = _phase(client, model, jobs, 1, args.max_tokens)
        together, wall_together = _phase(client, model, jobs, args.clients, args.max_tokens)
        rows = [_row("one request at a time", alone, wall_alone, n),
                _row(f"{args.clients} clients at once", together, wall_together, n, alone)]
        speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        soak = _soak(client, model, jobs, args, proc.pid) if args.soak else []
    finally:
        proc.terminate()
        proc.wait(60)
    cols = ["phase", "requests", "answered", "same_as_alone", "tokens", "wall_s", "tokens_per_s", "p50_s", "p99_s"]
    md = table(rows, cols) + f"\n\nbatched decoding: {speedup:.2f}x the tokens/s of one request at a time"
    if soak:
        first, last = soak[0]["rss_mib"], soak[-1]["rss_mib"]
        minutes = (soak[-1]["t_s"] - soak[0]["t_s"]) / 60 or 1
        md += (f"\n\nsoak: {len(soak)} rounds over {soak[-1]['t_s']:.0f} s, server RSS {first:.0f} → {last:.0f} MiB "
               f"(max {max(r['rss_mib'] for r in soak):.0f}; {(last - first) / minutes:+.1f} MiB/min from the first "
               "round to the last)")
    publish("serve", md, {"rows": rows, "speedup": speedup, "soak": soak, "model": MODEL,
                          "max_tokens": args.max_tokens, "clients": args.clients}, args.readme)


def _soak(client, model, jobs, args, pid) -> list[dict]:
    rounds, t0 = [], time.monotonic()
    while time.monotonic() - t0 < args.soak:
        answers, wall = _phase(client, model, jobs, args.clients, args.max_tokens)
        rounds.append({"t_s": round(time.monotonic() - t0, 1), "rss_mib": round(_rss(pid) / 2**20, 1),
                       "answered": sum(a["finish"] is not None for a in answers), "wall_s": round(wall, 1)})
        print(f"soak round {len(rounds)}: {rounds[-1]}", flush=True)
    return rounds


if __name__ == "__main__":
    main()
