"""Host memory while a big checkpoint streams in: a random LLaMA-2-7B-shaped model (bf16 safetensors shards on
disk) loaded with lowbit's quantize-on-load, NF4 + double quantization, on the CPU device.

    python bench/load_memory.py [--layers 32] [--keep DIR] [--smoke]

The goal (issue #22): peak RSS of the loading process ≤ 1.2 × the loaded model's bytes (4-bit linears, constants,
bf16 embeddings / norms) + one decoder layer's float weights — the loader holds one tensor at a time. Reported
beside it: the process's RSS before loading (Python, torch, transformers), and the checkpoint's size.
``--smoke``: a 2-layer model of the same widths (what the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, table

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, max_position_embeddings=4096)  # LLaMA-2-7B
SHARD_BYTES = 2 << 30


def write_random(folder: Path, layers: int, shape: dict = SHAPE) -> int:
    """A random bf16 checkpoint of a LLaMA ``shape`` (config.json fields; the 7B's by default, untied) with
    ``layers`` decoder layers; returns its bytes. Written shard by shard, so the writer holds one shard at most; the
    index is written last, so a folder without it is not a whole checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    fields = {"tie_word_embeddings": False, **{k: v for k, v in shape.items() if k != "model_type"}}
    config = LlamaConfig(**{**fields, "num_hidden_layers": layers, "torch_dtype": "bfloat16"})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    shard, size, index, total, n = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for k, shape in shapes.items():
        t = torch.ones(shape, dtype=torch.bfloat16) if k.endswith("norm.weight") else \
            (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        shard[k] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}))
    return total


def measure(folder: str) -> dict:
    """Runs in its own process: load, then report peak RSS and the model's bytes."""
    import torch

    from lowbit.io.loader import load
    from lowbit.nn.linear8bit import QUANTIZED
    from lowbit.quant.spec import QuantSpec
    from lowbit.training.distributed import base_bytes

    def status(field):  # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the parent (the writer)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    before = status("VmRSS")
    t = time.perf_counter()
    net = load(folder, QuantSpec("nf4", double_quant=True), compute_dtype=torch.bfloat16, device="cpu")
    seconds = time.perf_counter() - t
    peak = status("VmHWM")
    own = [t for m in net.modules() if not isinstance(m, QUANTIZED)
           for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
    model_bytes = base_bytes(net) + sum(t.numel() * t.element_size() for t in own)
    layer = net.model.layers[0]
    layer_float = sum(m.in_features * m.out_features * 2 for m in layer.modules() if hasattr(m, "in_features"))
    return {"rss_before_load": before, "peak_rss": peak, "model_bytes": model_bytes,
            "one_layer_bf16_bytes": layer_float, "load_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--keep", help="write (or reuse) the random checkpoint here instead of a temporary folder")
    ap.add_argument("--smoke", action="store_true", help="2 layers (the test suite's check)")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    layers = 2 if args.smoke else args.layers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp) / "llama-7b-shaped"
        if (folder / "model.safetensors.index.json").exists():
            disk = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        else:
            t = time.perf_counter()
            disk = write_random(folder, layers)
            print(f"wrote {disk / 2**30:.2f} GiB of random bf16 weights in {time.perf_counter() - t:.0f} s",
                  flush=True)
        out = subprocess.run([sys.executable, __file__, "--measure", str(folder)], capture_output=True, text=True,
                             check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    goal = 1.2 * r["model_bytes"] + r["one_layer_bf16_bytes"]
    row = {"model": f"LLaMA-2-7B shape, {layers} layers", "checkpoint_GiB": disk / 2**30,
           "loaded_model_GiB": r["model_bytes"] / 2**30, "one_layer_bf16_GiB": r["one_layer_bf16_bytes"] / 2**30,
           "rss_before_load_GiB": r["rss_before_load"] / 2**30, "peak_rss_GiB": r["peak_rss"] / 2**30,
           "goal_GiB": goal / 2**30, "meets_goal": r["peak_rss"] <= goal, "load_s": r["load_s"]}
    note = ("NF4 + DQ, bf16 compute, device cpu; peak RSS is VmHWM of the loading process (imports included); "
            "goal = 1.2 × loaded model + one layer in bf16. GPU device: not measured.")
    markdown = table([row], list(row)) + "\n\n" + note
    if args.smoke:
        print(markdown)
    else:
        publish("load_memory", markdown, {"results": [row], "note": note}, args.readme)
    if not row["meets_goal"]:
        raise SystemExit(f"peak RSS {row['peak_rss_GiB']:.2f} GiB is over the goal of {row['goal_GiB']:.2f} GiB")


if __name__ == "__main__":
    main()
