"""The QLoRA write-up's table, measured: full fine-tuning vs LoRA vs QLoRA (NF4/FP4/INT4/NF3/NF2, with and
without quantization-aware init or calibration) vs transformers + bitsandbytes + peft, on SmolLM2-135M-Instruct.

Method names: ``qlora-<type>[-<calibration>][-init][-scales]`` — calibration one of quant.spec.CALIBRATIONS (the
run's ``quant_calibration`` on 256 of its training dialogues), ``-init`` LoftQ's initialisation, ``-scales`` the
base's block scales trained with the adapter (``train_quant_scales``).

Task (real data from the chatterbot-corpus PyPI package, fixed split, seed 0):
  * Q→A dialogue: held-out loss on the answer tokens (the quality measure; retention is computed from it);
  * topic of a question (one word, 17 balanced topics): exact-match accuracy by greedy decoding.
Every method sees the same batches in the same order for the same number of steps (same tokens).
Each method runs in its own process (peak RSS per method). The peer is evaluated only after training
(an eval-mode forward before training corrupts bitsandbytes' CPU weights: DESIGN.md §5).

    python bench/retention.py            # full table (one seed), ~100 min on 2 cores
    python bench/retention.py --quick    # smoke test: 2 methods, a few steps
    python bench/retention.py --pre-only --merge   # only the pre-training loss and bits/param of each method
Writes bench/results/retention.json, retention.md, retention.png and the README section between markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, peak_rss_bytes, table, update_readme

METHODS = ["full", "lora", "qlora-nf4", "qlora-nf4-init", "qlora-nf4-gptq", "qlora-nf4-awq", "qlora-nf4-both",
           "qlora-nf4-awq-init", "qlora-fp4", "qlora-int4", "qlora-nf3", "qlora-nf3-init", "qlora-nf3-gptq",
           "qlora-nf3-awq-init", "qlora-nf2", "qlora-nf2-init", "qlora-nf2-gptq", "qlora-nf2-awq-init", "peer-bnb-nf4"]
TOPIC_PROMPT = "Which topic is this question about? Answer with one word.\n{q}"


def build_task(out: Path, seed: int = 0) -> dict:
    """train.jsonl (Q→A + topic), valid.jsonl (held-out Q→A), topics.jsonl (held-out topic questions)."""
    import importlib.util

    import yaml

    root = Path(importlib.util.find_spec("chatterbot_corpus").origin).parent / "data" / "english"
    qa, topic = [], {}
    for f in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                qa.append({"messages": [{"role": "user", "content": turns[0]}, {"role": "assistant",
                                                                                "content": turns[1]}]})
                topic.setdefault(f.stem.replace("_", " "), []).append(turns[0])
    rng = random.Random(seed)
    rng.shuffle(qa)
    n_val = len(qa) // 10
    valid, train = qa[:n_val], qa[n_val:]
    held_q = {m["messages"][0]["content"] for m in valid}
    topics = {k: [q for q in v if q not in held_q] for k, v in topic.items()}
    topics = {k: v for k, v in topics.items() if len(v) >= 15}
    t_train, t_test = [], []
    for k, v in sorted(topics.items()):
        v = v[:]
        rng.shuffle(v)
        v = v[:40]
        cut = len(v) // 4
        t_test += [{"q": q, "topic": k} for q in v[:cut]]
        t_train += [{"messages": [{"role": "user", "content": TOPIC_PROMPT.format(q=q)},
                                  {"role": "assistant", "content": k}]}
                    for q in v[cut:]]
    train = train + t_train
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid), ("topics", t_test)):
        (out / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"train": len(train), "valid_qa": len(valid), "topic_test": len(t_test), "topics": sorted(topics)}


def accuracy(net, tok, rows, batch=16) -> float:
    import torch

    from lowbit.generation import chat_prompt

    net.eval()
    tok.padding_side = "left"
    hits = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        texts = [chat_prompt(tok, TOPIC_PROMPT.format(q=r["q"])) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = net.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                               temperature=None, top_p=None, top_k=None)
        for r, o in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            ans = tok.decode(o, skip_special_tokens=True).strip().lower().rstrip(".")
            hits += ans == r["topic"]
    tok.padding_side = "right"
    return hits / len(rows)


def worker(method: str, task: Path, steps: int, seed: int) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    from lowbit.data import Batches, load_records, tokenize_records
    from lowbit.dtypes import default_compute_dtype
    from lowbit.io.resolve import resolve_model
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.nn.linear import footprint_bytes
    from lowbit.training.config import TrainConfig
    from lowbit.training.evaluation import evaluate
    from lowbit.training.loop import train_loop
    from lowbit.training.recipe import train
    from lowbit.training.schedule import lr_lambda

    dtype = default_compute_dtype()
    torch.manual_seed(seed)
    tok = load_tokenizer("smollm2-135m")
    topics = [json.loads(row) for row in (task / "topics.jsonl").read_text().splitlines()]
    cfg = TrainConfig(base_model="smollm2-135m", datasets=str(task), micro_batch_size=8, sequence_len=256,
                      max_steps=steps,
                      learning_rate=3e-4, warmup_steps=max(1, steps // 20), lr_scheduler="cosine", eval_steps=10**9,
                      save_steps=10**9, val_set_size=0, seed=seed, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                      lora_target_modules="all-linear", output_dir=tempfile.mkdtemp(), compute_dtype="auto")
    t0 = time.perf_counter()
    if method.startswith("qlora") or method == "lora":
        if method == "lora":
            cfg.load_in_4bit = False
        else:
            parts = method.split("-")
            cfg.quant_type = parts[1]
            cfg.lora_init = "loftq" if "init" in parts[2:] else "default"
            cfg.train_quant_scales = "scales" in parts[2:]
            cfg.quant_calibration = parts[2] if len(parts) > 2 and parts[2] not in ("init", "scales") else "none"
            if steps == 0:  # --pre-only: the base's held-out loss as training would start from it
                cfg.max_steps = 1
        prep: list[str] = []  # the calibration's lines: each stage's time and block losses
        res = train(cfg, overwrite=True, progress=False,
                    log=lambda *a: prep.append(" ".join(map(str, a))) if "calibrat" in str(a[0]) else None)
        net, base_loss, loss = res["model"], res["base_eval_loss"], res["eval_loss"]
        tps = res["tokens_per_s"]
        if steps == 0:
            return {"method": method, "pre_train_loss": base_loss, "bits_per_param": _bits_per_param(net),
                    "preparation": prep}
    else:  # full fine-tuning, or the reference stack; same batches, same schedule
        train_rows = tokenize_records(load_records(task / "train.jsonl"), tok, "chat", cfg.sequence_len)
        valid_rows = tokenize_records(load_records(task / "valid.jsonl"), tok, "chat", cfg.sequence_len)
        batches = Batches(train_rows.samples, cfg.micro_batch_size, tok.pad_token_id, seed)
        vb = Batches(valid_rows.samples, cfg.micro_batch_size, tok.pad_token_id, seed)
        path = resolve_model("smollm2-135m")
        if method == "full":
            from transformers import AutoModelForCausalLM

            net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 master weights
            params = list(net.parameters())
            lr = 3e-5  # full fine-tuning wants a 10x smaller step than LoRA
            base_loss = evaluate(net, vb, dtype)
            if steps == 0:
                return {"method": method, "pre_train_loss": base_loss, "bits_per_param": 32.0}
        else:
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype))
            net = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
            params = [p for p in net.parameters() if p.requires_grad]
            lr = cfg.learning_rate
            base_loss = None  # never an eval-mode forward before training
            if steps == 0:
                return {"method": method, "pre_train_loss": None, "bits_per_param": _bits_per_param(net)}
        opt = torch.optim.AdamW(params, lr=lr, foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, steps))
        # lowbit's own loop, handed the peer's model: the same batches, loss normalisation, clipping and schedule
        state = train_loop(net, opt, batches, steps=steps, scheduler=sched, dtype=dtype)
        tps = state.tokens_per_s()
        loss = evaluate(net, vb, dtype)
    acc = accuracy(net, tok, topics)
    footprint = footprint_bytes(net) if method != "peer-bnb-nf4" else sum(
        t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
    return {"method": method, "eval_loss": loss, "base_eval_loss": base_loss, "accuracy": acc,
            "peak_rss_bytes": peak_rss_bytes(), "footprint_bytes": footprint, "tokens_per_s": tps,
            "wall_s": time.perf_counter() - t0, "pre_train_loss": base_loss,
            "bits_per_param": _bits_per_param(net) if method != "full" else 32.0,
            **({"preparation": prep} if method.startswith("qlora") else {})}


def _bits_per_param(net) -> float:
    """Stored bits per weight of the frozen base's linear layers (codes + constants; 16 for a 16-bit base)."""
    from lowbit.nn.linear import Linear4bit

    mods = [m for m in net.modules() if isinstance(m, Linear4bit)]
    if mods:
        return 8 * sum(m.weight.nbytes for m in mods) / sum(m.weight.numel for m in mods)
    peer = [m for m in net.modules() if type(m).__name__ == "Linear4bit"]  # bitsandbytes' layer
    if peer:
        size = lambda m: m.weight.numel() + m.weight.quant_state.absmax.numel() * \
            m.weight.quant_state.absmax.element_size() + 4 * m.weight.quant_state.state2.absmax.numel() + 4
        return 8 * sum(size(m) for m in peer) / sum(m.in_features * m.out_features for m in peer)
    return 16.0


def base_loss(task: Path) -> float:
    from lowbit.data import Batches, load_records, tokenize_records
    from lowbit.dtypes import default_compute_dtype
    from lowbit.training.evaluation import evaluate

    tok, net = _base_model()
    rows = tokenize_records(load_records(task / "valid.jsonl"), tok, "chat", 256)
    return evaluate(net, Batches(rows.samples, 8, tok.pad_token_id), default_compute_dtype())


def _base_model():
    """(tokenizer, the unquantized base model)."""
    from lowbit.io.loader import load
    from lowbit.io.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m"), load("smollm2-135m", None)


def base_accuracy(task: Path) -> float:
    tok, net = _base_model()
    return accuracy(net, tok, [json.loads(row) for row in (task / "topics.jsonl").read_text().splitlines()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (data order and adapter init)")
    ap.add_argument("--merge", action="store_true",
                    help="add these runs to the methods/seeds already in retention.json")
    ap.add_argument("--merge-from", metavar="DIR", help="with --merge: add the per-seed runs of DIR/retention.json "
                    "(a run elsewhere with the same budget; replaces the same method and seed) instead of running")
    ap.add_argument("--report-only", action="store_true", help="rebuild table, chart and README from retention.json")
    ap.add_argument("--pre-only", action="store_true",
                    help="add each method's pre-training held-out loss and bits/param to retention.json (no training)")
    ap.add_argument("--worker", nargs=4)
    a = ap.parse_args()
    if a.report_only:
        results = Path(a.results)
        report(json.loads((results / "retention.json").read_text()), results,
               readme=results.resolve() == RESULTS.resolve())
        return
    if a.worker:
        m, task, steps, seed = a.worker
        print("RESULT " + json.dumps(worker(m, Path(task), int(steps), int(seed))), flush=True)
        return
    methods = a.methods.split(",") if a.methods else [] if a.merge_from else \
        (["lora", "qlora-nf4"] if a.quick else METHODS)
    steps = 4 if a.quick else a.steps
    task = Path(tempfile.mkdtemp()) / "task"
    info = build_task(task)
    if a.pre_only:
        pre_only(Path(a.results), task, a.methods.split(",") if a.methods else None)
        return
    seeds = [int(x) for x in a.seeds.split(",")]
    runs: dict[str, list[dict]] = {}
    results = Path(a.results)
    old = json.loads((results / "retention.json").read_text()) if a.merge else None
    if a.merge_from and not old:
        sys.exit("--merge-from adds to retention.json: give --merge too")
    for other in [old] + ([json.loads((Path(a.merge_from) / "retention.json").read_text())] if a.merge_from else []):
        if other and other["budget"]["steps"] != steps:
            sys.exit(f"--merge: a retention.json made with {other['budget']['steps']} steps, this run uses {steps}")
        for m, e in (other or {"methods": {}})["methods"].items():
            base_eval = other["base"]["eval_loss"] if m in ("full", "lora") else None
            kept = {k: e.get(k) for k in ("pre_train_loss", "bits_per_param", "preparation")}  # filled per method
            new = [{**x, **{k: v for k, v in kept.items() if x.get(k) is None}}
                   for x in e.get("per_seed") or [{**e, "seed": e["seeds"][0], "base_eval_loss": base_eval}]]
            runs[m] = [x for x in runs.get(m, []) if x["seed"] not in {y["seed"] for y in new}] + new
    for m in methods:
        for seed in seeds:
            t = time.time()
            r = _run(m, task, steps, seed)
            runs[m] = [x for x in runs.get(m, []) if x["seed"] != seed] + [r]
            print(f"{m} seed {seed}: eval loss {r['eval_loss']:.4f}, accuracy {r['accuracy']:.3f} "
                  f"({time.time() - t:.0f} s)",
                  flush=True)
    res = {m: _mean(rs) for m, rs in runs.items()}
    # quality is measured from the full-precision base model: what QLoRA loses to quantization counts against it
    ref = res.get("full") or res.get("lora")
    base = ref["base_eval_loss"] if ref and ref.get("base_eval_loss") else \
        (old["base"]["eval_loss"] if old else base_loss(task))
    base_acc = old["base"]["accuracy"] if old else base_accuracy(task)
    out = {"base": {"eval_loss": base, "accuracy": base_acc},
           "budget": {"steps": steps, "micro_batch_size": 8, "sequence_len": 256,
                      "lr": {"lora/qlora/peer": 3e-4, "full": 3e-5}, "schedule": "cosine, 5% warmup", "seed": 0,
                      **info},
           "methods": {}, "machine": machine()}
    for m, r in res.items():
        entry = {k: r[k] for k in ("eval_loss", "eval_loss_std", "accuracy", "accuracy_std", "peak_rss_bytes",
                                   "footprint_bytes", "tokens_per_s", "wall_s")}
        for ref_name in ("full", "lora"):
            if ref_name in res and base - res[ref_name]["eval_loss"] > 0:
                entry[f"retention_vs_{ref_name}"] = (base - r["eval_loss"]) / (base - res[ref_name]["eval_loss"])
        entry["seeds"] = sorted(x["seed"] for x in runs[m])
        for k in ("bits_per_param", "preparation"):  # the same for every seed (the base)
            entry[k] = next((x[k] for x in runs[m] if x.get(k) is not None), None)
        pre = [x["pre_train_loss"] for x in runs[m] if x.get("pre_train_loss") is not None]  # calibration follows
        entry["pre_train_loss"] = statistics.fmean(pre) if pre else None                   # the seed: its mean
        entry["per_seed"] = [{k: x.get(k) for k in ("seed", "eval_loss", "accuracy", "peak_rss_bytes",
                                                    "footprint_bytes", "tokens_per_s", "wall_s", "pre_train_loss",
                                                    "bits_per_param")} for x in runs[m]]
        out["methods"][m] = entry
    results.mkdir(parents=True, exist_ok=True)
    (results / "retention.json").write_text(json.dumps(out, indent=2) + "\n")
    report(out, results, readme=not a.quick and results.resolve() == RESULTS.resolve())


def _run(method: str, task: Path, steps: int, seed: int) -> dict:
    p = subprocess.run([sys.executable, __file__, "--worker", method, str(task), str(steps), str(seed)],
                       capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    line = [row for row in p.stdout.splitlines() if row.startswith("RESULT ")]
    if p.returncode or not line:
        print(f"{method} seed {seed} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        sys.exit(1)
    return {**json.loads(line[0][7:]), "seed": seed}


def pre_only(results: Path, task: Path, methods: list[str] | None) -> None:
    """Fill in pre_train_loss and bits_per_param of the methods in retention.json (the base as training starts
    from it: quantized, calibrated, LoftQ-initialised), without training."""
    out = json.loads((results / "retention.json").read_text())
    for m in methods or list(out["methods"]):
        r = _run(m, task, 0, 0)
        out["methods"][m].update(pre_train_loss=r["pre_train_loss"], bits_per_param=r["bits_per_param"])
        print(f"{m}: pre-training loss {r['pre_train_loss']}, {r['bits_per_param']:.3f} bits/param", flush=True)
    (results / "retention.json").write_text(json.dumps(out, indent=2) + "\n")
    report(out, results, readme=results.resolve() == RESULTS.resolve())


def _mean(rs: list[dict]) -> dict:
    """Mean over seeds, with the spread (sample std, 0 for one seed) of loss and accuracy."""
    avg = {k: statistics.fmean(r[k] for r in rs) for k in ("eval_loss", "accuracy", "peak_rss_bytes",
                                                         "footprint_bytes",
                                                         "tokens_per_s", "wall_s")}
    for k in ("eval_loss", "accuracy"):
        avg[f"{k}_std"] = statistics.stdev(r[k] for r in rs) if len(rs) > 1 else 0.0
    bases = [r["base_eval_loss"] for r in rs if r.get("base_eval_loss") is not None]
    avg["base_eval_loss"] = bases[0] if bases else None
    return avg


def _loss_before(e: dict) -> str:
    """The held-out loss training starts from: mean ± spread over the seeds where it differs per seed (a calibrated
    base follows the seed's calibration samples), else the one value."""
    pre = [x["pre_train_loss"] for x in e.get("per_seed") or [] if x.get("pre_train_loss") is not None]
    if len(set(pre)) > 1:
        return f"{statistics.fmean(pre):.4f} ± {statistics.stdev(pre):.4f}"
    return f"{e['pre_train_loss']:.4f}" if e.get("pre_train_loss") else "—"


def report(out: dict, results: Path, readme: bool) -> str:
    """Table (retention.md), chart (retention.png) and, for the real run, the README section — all from the JSON."""
    pct = lambda e, k: f"{100 * e[k]:.1f}%" if k in e else ""
    sd = lambda e, k: f" ± {e[k + '_std']:.{4 if k == 'eval_loss' else 3}f}" if len(e.get("seeds", [])) > 1 else ""
    rows = [{"method": m, "seeds": len(e.get("seeds", [0])), "eval_loss": f"{e['eval_loss']:.4f}{sd(e, 'eval_loss')}",
             "topic_acc": f"{e['accuracy']:.3f}{sd(e, 'accuracy')}",
             "retention_vs_full": pct(e, "retention_vs_full"), "retention_vs_lora": pct(e, "retention_vs_lora"),
             "bits/param": f"{e['bits_per_param']:.2f}" if e.get("bits_per_param") else "not measured",
             "loss_before_training": _loss_before(e),
             "weights_MiB": round(e["footprint_bytes"] / 2**20), "peak_RSS_MiB": round(e["peak_rss_bytes"] / 2**20),
             "tokens/s": round(e["tokens_per_s"]), "prep_s": _prep_seconds(e)} for m, e in out["methods"].items()]
    b = out["budget"]
    md = (f"Base model (no fine-tuning, full precision): held-out loss {out['base']['eval_loss']:.4f}, topic accuracy "
          f"{out['base']['accuracy']:.3f}. Budget: {b['steps']} steps × {b['micro_batch_size']} sequences "
          f"(≤ {b['sequence_len']} "
          f"tokens), the same batches for every method (per seed); mean ± standard deviation where several seeds ran; "
          f"lr 3e-4 (LoRA/QLoRA/peer), 3e-5 (full), cosine. bits/param: stored bits per weight of the frozen "
          f"linear layers (codes + block constants); loss_before_training: the held-out loss of the model training "
          f"starts from (quantized, calibrated, LoftQ-initialised) — the pure cost of the data type and its "
          f"preparation; the peer's is not taken (an eval-mode forward before training corrupts bitsandbytes' CPU "
          f"weights), its bytes are qlora-nf4's.\n\n"
          + table(rows, ["method", "seeds", "bits/param", "loss_before_training", "eval_loss", "topic_acc",
                         "retention_vs_full", "retention_vs_lora", "weights_MiB",
                         "peak_RSS_MiB", "tokens/s", "prep_s"]))
    preps = [f"- **{m}**: " + "; ".join(line.removeprefix("calibration: ") for line in e["preparation"])
             for m, e in out["methods"].items() if e.get("preparation")]
    if preps:
        md += ("\n\nprep_s: the time to calibrate the base before training (one process, this machine). What each "
               "stage logged:\n\n" + "\n".join(preps))
    (results / "retention.md").write_text(md + "\n")
    print("\n" + md)
    _chart(out, results / "retention.png")
    if readme:
        update_readme("retention", f"{md}\n\n![memory vs quality](bench/results/retention.png)")
    return md


def _prep_seconds(e: dict) -> str:
    import re

    found = [re.search(r"samples, (\d+) s\)", line) for line in e.get("preparation") or []]
    return next((f.group(1) for f in found if f), "—")


def _chart(out: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, e in out["methods"].items():
        ax.scatter(e["peak_rss_bytes"] / 2**20, e["eval_loss"], s=40)
        ax.annotate(m, (e["peak_rss_bytes"] / 2**20, e["eval_loss"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.axhline(out["base"]["eval_loss"], ls="--", c="gray", lw=1, label="base model")
    ax.set_xlabel("peak RSS while training (MiB)")
    ax.set_ylabel("held-out loss (lower is better)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: memory vs quality")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
