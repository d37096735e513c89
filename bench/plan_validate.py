"""Check the memory planner against measured peaks on this CPU: peak RSS minus the process baseline (after
imports, before loading) for a grid of models, sequence lengths, batches and LoRA ranks; prints predicted vs
measured and writes bench/results/plan_validate.json. Also prints the seed's headline from the planner.

    python bench/plan_validate.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_rss_bytes, run_worker, table, update_readme, write_json


def worker(model: str, seq: int, batch: int, r: int, gc: bool) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports count in the baseline)

    from lowbit.io.loader import load
    from lowbit.io.resolve import resolve_model
    from lowbit.nn.lora import add_lora
    from lowbit.training.host_memory import release_between_layers
    from lowbit.training.loss import autocast, lm_loss

    folder = resolve_model(model)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (batch, seq))
    b = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    base = peak_rss_bytes()
    net = load(folder, compute_dtype=torch.bfloat16)
    add_lora(net, r=r, alpha=2 * r, verbose=False)
    release_between_layers(net)  # as lowbit train does (training/host_memory.py)
    if gc:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    for _ in range(3):
        with autocast(torch.bfloat16):
            s, n = lm_loss(net, b)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"measured": peak_rss_bytes() - base, "config": json.loads((Path(folder) / "config.json").read_text())}


def recipe_worker(seq: int, batch: int, r: int, gc: bool) -> dict:
    """A whole ``lowbit.train`` run (tokenizer, data through ``datasets``/Arrow, evaluation, checkpoints) of the
    built-in model on the built-in data, every row padded to ``seq`` tokens: peak RSS above the import baseline, and
    the plan of the same config."""
    import logging
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from lowbit.planner.memory import plan_config
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    base = peak_rss_bytes()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(base_model="smollm2-135m", datasets="chatterbot", sequence_len=seq, micro_batch_size=batch,
                          pad_to_sequence_len=True, lora_r=r, lora_alpha=2 * r, max_steps=3, gradient_checkpointing=gc,
                          compute_dtype="float32", output_dir=out, eval_steps=3, save_steps=3, val_set_size=16)
        train(cfg, progress=False, log=lambda *a: None, force=True)
    measured = peak_rss_bytes() - base
    from lowbit.training.preflight import _plannable

    return {"measured": measured, "predicted": plan_config(_plannable(cfg), device="cpu").total_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", nargs=5)
    ap.add_argument("--recipe-worker", nargs=4)
    a = ap.parse_args()
    if a.worker:
        m, s, b, r, gc = a.worker
        print("RESULT " + json.dumps(worker(m, int(s), int(b), int(r), gc == "1")))
        return
    if a.recipe_worker:
        s, b, r, gc = a.recipe_worker
        print("RESULT " + json.dumps(recipe_worker(int(s), int(b), int(r), gc == "1")))
        return
    from lowbit.planner.memory import plan

    tmp = Path(tempfile.mkdtemp())
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import save_tiny

    tiny = tmp / "tiny"
    save_tiny(tiny, "llama", hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024)
    grid = [(str(tiny), 256, 4, 16, False), (str(tiny), 512, 8, 16, False), (str(tiny), 1024, 4, 64, False)]
    smol = [("smollm2-135m", s, b, r, gc) for s, b, r, gc in
            [(128, 4, 16, False), (256, 4, 16, False), (512, 4, 16, False), (256, 8, 16, False), (512, 2, 64, False),
             (1024, 2, 16, False), (512, 8, 16, True), (1024, 4, 16, True)]]
    grid += smol[:3] if a.quick else smol
    rows, out = [], []
    for m, s, b, r, gc in grid:
        res = run_worker(__file__, ["--worker", m, str(s), str(b), str(r), "1" if gc else "0"], f"{m} {s}x{b}",
                         tail=1500)
        if res is None:
            continue
        pred = plan(res["config"], sequence_len=s, micro_batch_size=b, lora_r=r, gradient_checkpointing=gc,
                    device="cpu",
                    compute_dtype="bfloat16")
        # this bare loop has no tokenizer, datasets/Arrow runtime or token tables: the plan without that item
        predicted = pred.total_bytes - pred.items.get("data_pipeline", 0)
        err = predicted / res["measured"] - 1
        name = "tiny-6L-256h" if m == str(tiny) else m
        rows.append({"model": name, "seq": s, "batch": b, "r": r, "ckpt": gc,
                     "predicted_MB": round(predicted / 2**20),
                     "measured_MB": round(res["measured"] / 2**20), "error_%": round(100 * err, 1)})
        out.append({**rows[-1], "items": pred.items})
        print(rows[-1], flush=True)
    for s_, b, r, gc in [(256, 4, 16, False)] if a.quick else [(256, 4, 16, False), (512, 4, 16, False),
                                                                (1024, 2, 16, True)]:
        res = run_worker(__file__, ["--recipe-worker", str(s_), str(b), str(r), "1" if gc else "0"],
                         f"lowbit.train {s_}x{b}", tail=1500)
        if res is None:
            continue
        rows.append({"model": "smollm2-135m (lowbit.train)", "seq": s_, "batch": b, "r": r, "ckpt": gc,
                     "predicted_MB": round(res["predicted"] / 2**20), "measured_MB": round(res["measured"] / 2**20),
                     "error_%": round(100 * (res["predicted"] / res["measured"] - 1), 1)})
        out.append(rows[-1])
        print(rows[-1], flush=True)
    grid_md = table(rows, ["model", "seq", "batch", "r", "ckpt", "predicted_MB", "measured_MB", "error_%"])
    print("\n" + grid_md)
    worst = max(abs(r["error_%"]) for r in rows) if rows else None
    print(f"\nworst error: {worst}%")
    head = []
    for fam in ("llama-65b", "llama-2-70b", "llama-3-70b"):
        for mem in ("24GB", "48GB", "80GB"):
            from lowbit.planner.memory import largest

            kw = dict(micro_batch_size=1, lora_r=16, gradient_checkpointing=True, optimizer="paged_adamw_8bit")
            p512 = plan(fam, sequence_len=512, device_memory=mem, **kw)
            head.append({"model": fam, "gpu": mem, "total_at_512_GiB": round(p512.total_bytes / 2**30, 1),
                         "fits_at_512": p512.fits,
                         "max_seq_len": largest(fam, "sequence_len", mem, sequence_len=512, **kw)})
    head_md = table(head, ["model", "gpu", "total_at_512_GiB", "fits_at_512", "max_seq_len"])
    print("\nQLoRA NF4+DQ, LoRA r=16 all-linear, paged 8-bit AdamW, gradient checkpointing, batch 1:\n")
    print(head_md)
    if not a.quick:
        update_readme("plan", f"Peak RSS minus the process baseline while training on this CPU, against `lowbit plan "
                      f"--device cpu`:\n\n{grid_md}\n\nWorst error {worst}%. The rows without `lowbit.train` run a "
                      "bare training loop (no tokenizer or data pipeline: the plan's data_pipeline item is left out "
                      "for them). The CPU backward/allocator factors without checkpointing (0.2× / 1.2× the "
                      "activations, with / without the heap trimmed between layers) were fitted to an earlier run "
                      "of this grid, both models, so it is not an independent test of them. GPU numbers below: the "
                      "checkpointed backward term from lowbit's step simulated on fake tensors "
                      "(bench/device_memory.py), the allocator's slack and the CUDA context estimated; nothing "
                      "measured on a GPU.\n\n"
                      "The seed's headline from the planner (QLoRA NF4+DQ, LoRA r=16 all-linear, paged 8-bit AdamW, "
                      f"gradient checkpointing, batch 1):\n\n{head_md}")
    data = {"machine": machine(), "rows": out, "worst_error_pct": worst, "headline": head}
    print(f"wrote {write_json('plan_validate', data)}")


if __name__ == "__main__":
    main()
