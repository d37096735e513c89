"""Shared helpers for bench/ scripts: timing (median of repeats after warm-up), tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm_bytes() -> int:
    """This process's own peak resident memory (Linux VmHWM; ``ru_maxrss`` carries over across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_vm_hwm() -> bool:
    """Start this process's VmHWM afresh from its current RSS (Linux ``clear_refs`` 5); whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peer_qlora_model(name: str):
    """(model, tokenizer, compute dtype) as the peer stack loads a QLoRA base: transformers with bitsandbytes NF4 +
    double quantization in lowbit's default compute dtype; the peer's warnings and logs quieted."""
    import logging
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lowbit.dtypes import default_compute_dtype
    from lowbit.io.resolve import resolve_model
    from lowbit.io.tokenizer import load_tokenizer

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    dtype = default_compute_dtype()
    path = resolve_model(name)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    return net, load_tokenizer(path), dtype


def hf_step_clock(times: list):
    """A transformers ``TrainerCallback`` appending each optimizer step's wall time to ``times``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    return Clock()


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cores": os.cpu_count()}


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}") if isinstance(v, float) else str(v)  # no 1.65e+03
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([fmt(r.get(c, "")) for c in cols]) for r in rows]
    return "\n".join(out)


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def publish(name: str, markdown: str, data: dict, readme: bool) -> None:
    """Print the table, write ``bench/results/<name>.json`` (with the machine) and, if asked, the README section
    ``name``."""
    print(markdown)
    write_json(name, {"machine": machine(), **data})
    if readme:
        update_readme(name, markdown)


def update_readme(section: str, markdown: str) -> bool:
    """Replace the README text between ``<!-- section:start -->`` and ``<!-- section:end -->``."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}")
    return True


def run_worker(script: str, args: list[str], label: str, tail: int = 2000) -> dict | None:
    """Run ``script`` with ``args`` in a fresh process (peak RSS is per process) and return the JSON it prints on a
    ``RESULT `` line; None (with the end of its stderr, under ``label``) when it fails."""
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    line = [row for row in p.stdout.splitlines() if row.startswith("RESULT ")]
    if p.returncode or not line:
        print(f"{label} failed:\n{p.stderr[-tail:]}", file=sys.stderr)
        return None
    return json.loads(line[0][7:])
