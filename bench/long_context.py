"""Long context: the longest sequence whose QLoRA training step peaks under a memory budget, lowbit against
transformers + bitsandbytes + peft, on this CPU, in one run.

SmolLM2-135M-Instruct, NF4 + double quantization, LoRA r=16 on all linear layers, batch 1, gradient checkpointing
on both sides (lowbit's as ``--checkpointing`` says: ``true``, or ``offload_disk`` — the layers' inputs in files),
the default compute dtype (float32 on a CPU without AVX-512 BF16, bfloat16 with it). One training step (forward,
backward, AdamW) per length, each in a fresh process (lowbit's after two short untimed steps, in which compiled
layers compile); peak RSS is that process's VmHWM (imports and model included). The search doubles the length
while the step fits, then bisects — within a wall-clock budget: a length whose step would outlast what is left
(extrapolated from the last step, quadratic in the length) is not run and the table says so. With ``--goal-ratio
R`` lowbit's doubling goes from ``--ladder-top`` tokens straight to R × the peer's longest (rounded down to 256), the
length the goal asks about, instead of through every power of two on the way (a step at tens of thousands of tokens
takes most of an hour here), and doubles or bisects from there as before. lowbit runs as
``lowbit train`` builds the model (``training/model.py``: document attention, ``tiled_mlp``, compiled layers), the
peer as its users write it (``get_peft_model``, ``gradient_checkpointing_enable``).

Also per measured lowbit length: the step's seconds per token, the same with the attention kernels' own time taken
out (SDPA forward twice — checkpointing recomputes it — and backward, timed alone at that length × layers), and the
planner's estimate (``lowbit plan`` of the same run, less its data-pipeline item: the worker reads no files) against
the measured peak above the process's RSS after its imports (as bench/plan_validate.py measures).

    python bench/long_context.py [--budget-gib 4] [--minutes 60] [--tiled-mlp true|false]
                                 [--checkpointing true|offload_disk] [--goal-ratio 32 [--ladder-top 32768]] [--readme]
    python bench/long_context.py --replan [--readme]    # the last run's tables, planned with the current planner
    python bench/long_context.py --plan-check 6144,10240 [--checkpointing ...] [--readme]  # the planner at lengths
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    peer_qlora_model,
    publish,
    reset_vm_hwm,
    run_worker,
    table,
    update_readme,
    vm_hwm_bytes,
    write_json,
)

MODEL, R = "smollm2-135m", 16
# two short steps before the timed one: compiled layers (``compile: auto``) compile for any row length there (two
# lengths: the second compile is the dynamic one; both past the matmul-attention branch of nn/causal_attention.py)
WARMUP = (1536, 1792)


def _ids(n: int):
    import torch

    return torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(n))


def _config(n: int, tiled: str, checkpointing: str, dtype: str = "auto"):
    """The run both the worker and the planner see: ``n`` tokens, batch 1, the bench's tiled_mlp and checkpointing
    (and the compute dtype a stored row ran in, for the planner)."""
    from lowbit.training.config import TrainConfig, apply_overrides

    cfg = TrainConfig(base_model=MODEL, lora_r=R, lora_alpha=2 * R, sequence_len=n, micro_batch_size=1,
                      compute_dtype=dtype)  # the flags' words read as lowbit's command line reads them
    return apply_overrides(cfg, {"gradient_checkpointing": checkpointing, "tiled_mlp": tiled}, from_string=True)


def lowbit_worker(n: int, tiled: str, checkpointing: str) -> dict:
    """One training step of ``n`` tokens as ``lowbit train`` runs it."""
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports count in the baseline)

    from lowbit.dtypes import to_torch
    from lowbit.training.loss import autocast, lm_loss
    from lowbit.training.model import load_model
    from lowbit.training.offload import offloading

    cfg = _config(n, tiled, checkpointing)
    loss_fn = offloading(lm_loss, torch.device("cpu"), disk=checkpointing == "offload_disk")
    dtype = to_torch(cfg.compute_dtype, "cpu")
    baseline = vm_hwm_bytes()
    net = load_model(cfg, dtype, log=lambda *a: None)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    t = time.perf_counter()
    for w in map(_ids, WARMUP):  # compiled layers compile here, for rows of any length past the small-attention branch
        with autocast(dtype):
            s, k = loss_fn(net, {"input_ids": w, "labels": w})
        (s / k).backward()
        net.zero_grad(set_to_none=True)
    warmup, ids, warm_peak = time.perf_counter() - t, _ids(n), vm_hwm_bytes()
    reset = reset_vm_hwm()
    t = time.perf_counter()
    with autocast(dtype):
        s, k = loss_fn(net, {"input_ids": ids, "labels": ids})
    (s / k).backward()
    opt.step()
    seconds, step_peak = time.perf_counter() - t, vm_hwm_bytes()
    return {"seconds": seconds, "peak_rss_bytes": max(warm_peak, step_peak), "loss": float(s / k),
            "step_peak_rss_bytes": step_peak if reset else None, "warmup_peak_rss_bytes": warm_peak,
            "baseline_rss_bytes": baseline, "attention_seconds": _attention_seconds(net.config, n, dtype),
            "dtype": str(dtype).split(".")[-1], "warmup_seconds": warmup}


def _attention_seconds(config, n: int, dtype) -> float:
    """The attention kernels' own time in a checkpointed step of ``n`` tokens: SDPA forward twice and backward,
    one layer's shapes timed alone, × layers."""
    import torch
    import torch.nn.functional as F

    h, kv = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // h
    q = torch.randn(1, h, n, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv, n, d, dtype=dtype, requires_grad=True) for _ in range(2))
    t = time.perf_counter()
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.sum().backward()
    return (time.perf_counter() - t) * config.num_hidden_layers


def peer_worker(n: int) -> dict:
    """One training step of ``n`` tokens with transformers + bitsandbytes + peft, gradient checkpointing on."""
    import torch
    from peft import LoraConfig, get_peft_model

    net, _, _ = peer_qlora_model(MODEL)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = get_peft_model(net, LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear", lora_dropout=0.0))
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    ids = _ids(n)
    t = time.perf_counter()
    loss = net(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    return {"seconds": time.perf_counter() - t, "peak_rss_bytes": vm_hwm_bytes(), "loss": float(loss)}


def _planned(n: int, tiled: str, checkpointing: str, dtype: str = "auto") -> int:
    """``lowbit plan``'s peak for the worker's step, less the data pipeline (the worker reads no data files)."""
    from lowbit.planner.memory import plan_config

    p = plan_config(_config(n, tiled, checkpointing, dtype), device="cpu")
    return p.total_bytes - p.items.get("data_pipeline", 0)


class Search:
    """Doubling then bisection for the longest length whose step fits ``budget`` bytes, within ``deadline``."""

    def __init__(self, side: str, budget: int, deadline: float, start: int, tiled: str, checkpointing: str,
                 jump: tuple[int, int] | None = None):
        self.side, self.budget, self.deadline, self.start, self.tiled = side, budget, deadline, start, tiled
        self.checkpointing, self.jump = checkpointing, jump  # jump: (from, to) — the doubling skips to ``to``
        self.runs: dict[int, dict] = {}
        self.skipped: int | None = None  # the first length not run for want of time

    def _step(self, n: int) -> dict | None:
        done = [(k, r) for k, r in self.runs.items() if r]
        if done:
            k, r = max(done)
            guess = r["seconds"] * max(1.0, (n / k) ** 2) + 30
            if time.time() + guess > self.deadline:
                self.skipped = n if self.skipped is None else min(self.skipped, n)
                return None
        args = ["--worker", self.side, str(n), self.tiled, self.checkpointing]
        res = run_worker(__file__, args, f"{self.side} {n}", tail=800)
        self.runs[n] = res or {"failed": True, "peak_rss_bytes": None}
        fits = bool(res) and res["peak_rss_bytes"] <= self.budget
        print(f"{self.side} {n}: " + (f"{res['peak_rss_bytes'] / 2**30:.2f} GiB, {res['seconds']:.1f} s"
                                      if res else "failed (out of memory?)") + (" fits" if fits else ""), flush=True)
        return {"fits": fits}

    def run(self) -> int:
        lo, hi, n = 0, None, self.start
        while hi is None:
            r = self._step(n)
            if r is None:
                return lo
            lo, hi, n = (n, None, self._next(n)) if r["fits"] else (lo, n, n)
        while hi - lo > max(256, lo // 8):
            mid = (lo + hi) // 2 // 256 * 256
            r = self._step(mid)
            if r is None:
                break
            lo, hi = (mid, hi) if r["fits"] else (lo, mid)
        return lo

    def _next(self, n: int) -> int:
        if self.jump and self.jump[0] <= n < self.jump[1]:
            return self.jump[1]
        return 2 * n


def _rows(search: Search, tiled: str, checkpointing: str) -> list[dict]:
    rows = []
    for n, r in sorted(search.runs.items()):
        if not r or r.get("failed"):
            rows.append({"side": search.side, "tokens": n, "peak_GiB": "failed"})
            continue
        row = {"side": search.side, "tokens": n, "peak_GiB": round(r["peak_rss_bytes"] / 2**30, 3),
               "step_s": round(r["seconds"], 1), "ms_per_token": round(1000 * r["seconds"] / n, 2)}
        if search.side == "lowbit":
            plan, above = _planned(n, tiled, checkpointing), r["peak_rss_bytes"] - r["baseline_rss_bytes"]
            row.update({"ms_per_token_without_attention": round(1000 * (r["seconds"] - r["attention_seconds"]) / n, 2),
                        "above_imports_GiB": round(above / 2**30, 3), "planned_GiB": round(plan / 2**30, 3),
                        "plan_error_%": round(100 * (plan / above - 1), 1)})
        rows.append(row)
    return rows


def _markdown(budget_gib: float, tiled: str, checkpointing: str, dtype: str, peer_max: int, mine_max: int,
              peer_skipped, mine_skipped, rows: list[dict], jump=None) -> str:
    cols = ["side", "tokens", "peak_GiB", "step_s", "ms_per_token", "ms_per_token_without_attention",
            "above_imports_GiB", "planned_GiB", "plan_error_%"]
    stop = lambda s: f" (the search stopped for time before {s:,} tokens)" if s else ""
    ratio = f"{mine_max / peer_max:.1f}×" if peer_max else "not measured (the peer fit no length tried)"
    return (f"Longest training step under {budget_gib:g} GiB RSS, SmolLM2-135M QLoRA r={R}, batch 1, gradient "
            f"checkpointing (lowbit: gradient_checkpointing {checkpointing}), tiled_mlp {tiled} "
            f"(bench/long_context.py, this CPU, {dtype}, one run):\n\n"
            f"- transformers + bitsandbytes + peft: **{peer_max:,} tokens**{stop(peer_skipped)}\n"
            f"- lowbit: **{mine_max:,} tokens**{stop(mine_skipped)} — {ratio} the peer"
            + (f" (its doubling went from {jump[0]:,} straight to {jump[1]:,}, {jump[1] / peer_max:g}× the peer's "
               "longest)" if jump else "") + "\n\n" + table(rows, cols))


def _replanned(row: dict, tiled: str, checkpointing: str, dtype: str) -> None:
    """``row``'s planned GiB and plan error, from the current planner and the row's measured peak above imports."""
    plan = _planned(row["tokens"], tiled, checkpointing, dtype) / 2**30
    row.update({"planned_GiB": round(plan, 3), "plan_error_%": round(100 * (plan / row["above_imports_GiB"] - 1), 1)})


def replan(readme: bool) -> None:
    """The last search's table and the --plan-check rows with the planner's current estimates (the measurements as
    they were)."""
    data = json.loads((RESULTS / "long_context.json").read_text())
    for row in data["rows"]:
        if row["side"] == "lowbit" and "above_imports_GiB" in row:
            _replanned(row, data["tiled_mlp"], data.get("checkpointing", "true"), data["dtype"])
    md = _markdown(data["budget_bytes"] / 2**30, data["tiled_mlp"], data.get("checkpointing", "true"),
                   data.get("dtype", "float32"), data["peer_max"], data["lowbit_max"],
                   data["peer_skipped"], data["lowbit_skipped"], data["rows"], data.get("jump"))
    publish("long_context", md, {k: v for k, v in data.items() if k != "machine"}, readme)
    checks = RESULTS / "long_context_plan.json"
    rows = json.loads(checks.read_text())["rows"] if checks.exists() else []
    for row in rows:
        _replanned(row, row["tiled_mlp"], row["checkpointing"], row["dtype"])
    if rows:
        _publish_checks(rows, readme)


def plan_check(lengths: list[int], tiled: str, checkpointing: str, readme: bool) -> None:
    """The planner against one lowbit step at each of ``lengths`` (fresh processes): the whole process's peak above
    its imports (warm-up included, as the search measures) and the step's own (VmHWM reset after the warm-up). The
    rows join those of bench/results/long_context_plan.json (one per dtype, checkpointing and length: a new
    measurement replaces the old), which tests/planner/test_host_backward.py holds the planner to."""
    path = RESULTS / "long_context_plan.json"
    rows = {(r["dtype"], r["checkpointing"], r["tokens"]): r
            for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    for n in lengths:
        r = run_worker(__file__, ["--worker", "lowbit", str(n), tiled, checkpointing], f"lowbit {n}", tail=800)
        if r is None:
            continue
        above = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
        step = r["step_peak_rss_bytes"] and r["step_peak_rss_bytes"] - r["baseline_rss_bytes"]
        row = {"tokens": n, "dtype": r["dtype"], "checkpointing": checkpointing, "tiled_mlp": tiled,
               "above_imports_GiB": round(above / 2**30, 3), "step_above_imports_GiB": step and round(step / 2**30, 3),
               "step_s": round(r["seconds"], 1), "date": time.strftime("%Y-%m-%d")}
        _replanned(row, tiled, checkpointing, r["dtype"])
        rows[r["dtype"], checkpointing, n] = row
        print(row, flush=True)
    _publish_checks(sorted(rows.values(), key=lambda r: (r["dtype"], r["checkpointing"], r["tokens"])), readme)


def _publish_checks(rows: list[dict], readme: bool) -> None:
    md = table(rows, ["dtype", "checkpointing", "tokens", "above_imports_GiB", "step_above_imports_GiB",
                      "planned_GiB", "plan_error_%", "step_s", "date"])
    print(md)
    write_json("long_context_plan", {"rows": rows})
    if readme:
        update_readme("long_context_plan", md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of the whole search")
    ap.add_argument("--tiled-mlp", default="true", choices=("true", "false", "auto"))
    ap.add_argument("--checkpointing", default="true", choices=("true", "offload_disk"), help="lowbit's")
    ap.add_argument("--start", type=int, default=2048, help="first length of both searches")
    ap.add_argument("--goal-ratio", type=float, default=0, help="lowbit jumps to this × the peer's longest")
    ap.add_argument("--ladder-top", type=int, default=32768, help="... from this length")
    ap.add_argument("--replan", action="store_true", help="the last run's tables with the current planner")
    ap.add_argument("--plan-check", help="comma-separated lengths: the planner against one step at each")
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--worker", nargs=4)
    a = ap.parse_args()
    if a.worker:
        side, n, tiled, checkpointing = a.worker
        print("RESULT " + json.dumps(lowbit_worker(int(n), tiled, checkpointing) if side == "lowbit"
                                     else peer_worker(int(n))))
        return
    if a.replan:
        replan(a.readme)
        return
    if a.plan_check:
        plan_check([int(x) for x in a.plan_check.split(",")], a.tiled_mlp, a.checkpointing, a.readme)
        return
    budget, t0 = int(a.budget_gib * 2**30), time.time()
    peer = Search("peer", budget, t0 + a.minutes * 60 * 0.25, a.start, a.tiled_mlp, a.checkpointing)
    peer_max = peer.run()
    goal = int(a.goal_ratio * peer_max) // 256 * 256
    jump = (a.ladder_top, goal) if goal > a.ladder_top else None
    mine = Search("lowbit", budget, t0 + a.minutes * 60, a.start, a.tiled_mlp, a.checkpointing, jump)
    mine_max = mine.run()
    rows = _rows(peer, a.tiled_mlp, a.checkpointing) + _rows(mine, a.tiled_mlp, a.checkpointing)
    dtype = next((r["dtype"] for r in mine.runs.values() if r and "dtype" in r), "not measured")
    md = _markdown(a.budget_gib, a.tiled_mlp, a.checkpointing, dtype, peer_max, mine_max, peer.skipped,
                   mine.skipped, rows, jump)
    publish("long_context", md, {"budget_bytes": budget, "lowbit_max": mine_max, "peer_max": peer_max,
                                 "lowbit_skipped": mine.skipped, "peer_skipped": peer.skipped, "rows": rows,
                                 "minutes": a.minutes, "tiled_mlp": a.tiled_mlp, "checkpointing": a.checkpointing,
                                 "dtype": dtype, "jump": jump}, a.readme)


if __name__ == "__main__":
    main()
