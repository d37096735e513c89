"""What a GPU training step holds, simulated on this CPU: lowbit's own step run on fake tensors, every allocation
summed while it lives — the planner's GPU activation and backward terms checked against it.

No GPU has been lent to this project's sessions, so the planner's GPU backward term was a guess (two decoder layers'
activations). This bench replaces the guess with a count. The step is the one ``lowbit train`` runs on a GPU
(eager — compiled layers are a CPU default —, bfloat16, LoRA r=16 on all linear layers, batch 1, gradient
checkpointing ``offload`` or ``true``, ``tiled_mlp``), on a model of the family's exact shapes with ``--layers``
decoder layers (2: the peak is one layer's recompute and backward; more layers add only checkpoints, which the
planner counts exactly). The weights are random, written once to a folder and loaded by lowbit's loader (NF4 +
double quantization); then every parameter becomes a fake tensor (``torch._subclasses.FakeTensorMode``: shape,
dtype, device and aliasing, no bytes) and one forward + backward runs through a dispatch mode that adds each new
storage's bytes when an operator makes it and takes them off when it is freed. The peak of that sum is what the
step's tensors need at once, before any allocator's rounding and caching.

Stand-ins, each for what a real GPU run does (fake tensors have no values, so data-dependent branches are told the
answer a real row gives: one sequence per row, every label learned):

    dequantize          the Triton kernel writes the layer's weight into the reused buffer and allocates nothing
                        else (the PyTorch reference would allocate its temporaries)
    offload             ``gradient_checkpointing: offload``: saved tensors ≥ training/offload.MIN_BYTES leave the
                        device when saved and come back (a new device tensor) when backward unpacks them
    causal mask         transformers takes fake positions for traced ones, reads them as packed documents and would
                        build the L×L mask a real row skips: told the row holds one sequence
    document spans      one document per row; the boolean selection of learned positions keeps every row (a copy)
    backward thread     CUDA runs backward on autograd's own thread, which dequantizes into its own buffer: the
                        backward gets a second buffer while the forward's stays
    attention backward  FlashAttention-2's own workspace, which no fake kernel allocates: a float32 dq accumulator
                        (tokens × heads × head_dim rounded up to 32), float32 softmax sums (heads × tokens) and,
                        for grouped KV heads, dK and dV expanded to every query head (flash_api.cpp, mha_bwd)

Not counted (the planner adds them beside): the CUDA context, the caching allocator's rounding and fragmentation,
the base weights, LoRA's parameters and optimizer state, pinned host memory.

    python bench/device_memory.py [--family llama-3.1-8b] [--lengths 4096,16384,65536]
                                  [--checkpointing offload|true] [--tiled-mlp true|false] [--readme]
    python bench/device_memory.py --replan [--readme]   # the stored runs against the planner as it is now

Each run is kept in bench/results/device_memory.json under its family and settings (a new run of the same
settings replaces it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, publish, table

GIB = 2**30
FLASH_BACKWARD = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


class LiveBytes(TorchDispatchMode):
    """Sums the bytes of the storages operators create while they live (views and in-place results share their
    input's storage and add nothing — also a view of a real tensor that the fake mode converts on the way);
    ``peak`` is the largest sum, ``top`` the biggest storages alive then."""

    def __init__(self, workspace=None):
        super().__init__()
        self.live = self.peak = 0
        self.top: list[tuple[str, int, tuple]] = []
        self._sizes: dict[int, tuple[str, int, tuple]] = {}
        self._seen = weakref.WeakKeyDictionary()
        self.workspace = workspace  # (func, args) → bytes an operator allocates inside itself, or None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not t._is_view():
                st = t.untyped_storage()
                if st not in self._seen and id(st) not in inputs:
                    self._add(st, str(func), tuple(t.shape))
        inside = self.workspace(func, args) if self.workspace else 0
        self._note(self.live + inside)
        return out

    def _add(self, st, what: str, shape: tuple) -> None:
        n = st.nbytes()
        self._seen[st] = n
        self._sizes[id(st)] = (what, n, shape)
        self.live += n
        weakref.finalize(st, self._free, id(st), n)

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._sizes.pop(key, None)

    def _note(self, level: int) -> None:
        if level > self.peak:
            self.peak = level
            self.top = sorted(self._sizes.values(), key=lambda x: -x[1])[:6]


def flash_workspace(func, args) -> int:
    """FlashAttention-2's backward workspace for a CPU flash backward call's shapes (see the module docstring)."""
    if func not in FLASH_BACKWARD:
        return 0
    q, k = args[1], args[2]  # grad_out, query, key, ...: [B, H, L, D]
    b, heads, n, d = q.shape
    dq_accum = b * (-(-n // 128) * 128) * heads * (-(-d // 32) * 32) * 4
    expanded = 2 * b * k.shape[2] * heads * d * q.element_size() if k.shape[1] != heads else 0
    return dq_accum + b * heads * n * 4 + expanded


def checkpoint(family: str, layers: int, folder: Path) -> Path:
    """A random bfloat16 checkpoint of ``family``'s shapes (planner/families) with ``layers`` decoder layers
    (bench/load_memory.py's writer), reused when a whole one is there."""
    from load_memory import write_random

    from lowbit.planner.catalog import load_model_config

    cfg = load_model_config(family)
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"{family}: only llama-shaped families are written here")
    if not (folder / "model.safetensors.index.json").is_file():
        write_random(folder, layers, cfg)
    return folder


@contextlib.contextmanager
def stand_ins(n: int):
    """The module docstring's stand-ins, undone on exit."""
    import transformers.masking_utils as masks

    import lowbit.nn.document_attention as doc
    import lowbit.nn.linear as linear
    import lowbit.quant.tensor as qt
    import lowbit.training.loss as loss

    def dequantize(packed, absmax, code, blocksize, shape, dtype=torch.float32, out=None, nested=None):
        return out if out is not None else torch.empty(shape, dtype=dtype, device=packed.device)

    saved = [(qt, "dequantize"), (masks, "find_packed_sequence_indices"),
             (doc, "document_spans"), (loss, "answer_tokens"), (linear, "_scratch")]
    old = [getattr(m, k) for m, k in saved]
    new = [dequantize, lambda position_ids: None,
           lambda pid: [[(0, pid.shape[1])] for _ in range(pid.shape[0])], lambda batch: n - 1, linear._Scratch()]
    for (m, k), f in zip(saved, new):
        setattr(m, k, f)
    forward_buffers = []

    def backward_thread():  # the forward's buffers stay alive; the backward dequantizes into new ones
        forward_buffers.append(linear._scratch)
        linear._scratch = linear._Scratch()

    try:
        yield backward_thread
    finally:
        for (m, k), f in zip(saved, old):
            setattr(m, k, f)


class _EveryRowLearned(TorchDispatchMode):
    """The boolean selection of learned positions keeps every row (every label is learned): a copy."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            return args[0].clone()
        return func(*args, **(kwargs or {}))


def _offloaded(min_bytes: int):
    """Saved-tensor hooks with the device memory of training/offload.HostOffload on a GPU."""
    def pack(t):
        if isinstance(t, nn.Parameter) or t.numel() * t.element_size() < min_bytes:
            return t
        return (t.shape, t.dtype, t.device)

    def unpack(x):
        return torch.empty(x[0], dtype=x[1], device=x[2]) if isinstance(x, tuple) else x

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _fake(net: nn.Module, mode) -> None:
    """Every parameter and buffer of ``net`` replaced by a fake tensor of its shape (the real bytes are freed)."""
    for m in net.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = nn.Parameter(mode.from_tensor(p.data), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = mode.from_tensor(b)


def _config(model, n: int, checkpointing: str, tiled: str):
    from lowbit.training.config import TrainConfig, apply_overrides

    cfg = TrainConfig(base_model=str(model), lora_r=16, lora_alpha=32, sequence_len=n, micro_batch_size=1,
                      compute_dtype="bfloat16", compile=False)  # the flags' words as lowbit's command line reads them
    return apply_overrides(cfg, {"gradient_checkpointing": checkpointing, "tiled_mlp": tiled}, from_string=True)


def simulate(folder: Path, n: int, checkpointing: str = "offload", tiled: str = "true", fake: bool = True) -> dict:
    """One step of ``n`` tokens on fake tensors (see the module docstring): the peak of live bytes, the forward's
    own peak, the biggest storages at the peak. ``fake=False``: the same on real tensors (what the tests compare)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit.dtypes import autocast
    from lowbit.training.loss import lm_loss
    from lowbit.training.model import load_model
    from lowbit.training.offload import MIN_BYTES

    net = load_model(_config(folder, n, checkpointing, tiled), torch.bfloat16, log=lambda *a: None)
    net.train()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    if fake:
        _fake(net, mode)
    ids = torch.randint(0, net.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    ids = mode.from_tensor(ids) if fake else ids  # the batch as the device has it
    hooks = _offloaded(MIN_BYTES) if checkpointing == "offload" else contextlib.nullcontext()
    t = time.perf_counter()
    with stand_ins(n) as backward_thread, mode, _EveryRowLearned(), LiveBytes(flash_workspace) as live:
        with hooks, autocast(torch.bfloat16):
            s, k = lm_loss(net, {"input_ids": ids, "labels": ids})
        forward = live.peak
        backward_thread()
        (s / k).backward()
    return {"tokens": n, "peak_bytes": live.peak, "forward_peak_bytes": forward, "seconds": time.perf_counter() - t,
            "top": [{"op": a, "mib": round(b / 2**20, 1), "shape": list(c)} for a, b, c in live.top]}


def _shapes(family: str, layers: int) -> dict:
    from lowbit.planner.catalog import load_model_config

    return {**load_model_config(family), "num_hidden_layers": layers}


def planned(family: str, layers: int, n: int, checkpointing: str, tiled: str) -> dict:
    """The planner's GPU items for the same run: the step's tensors (saved activations, loss chunk, dequantized
    weight, LoRA gradients), its backward-and-allocator term and the MLP's shards."""
    from lowbit.planner.memory import config_settings, plan

    cfg = _config(family, n, checkpointing, tiled)
    p = plan(_shapes(family, layers), **config_settings(cfg, device="cuda"))
    step = sum(p.items.get(k, 0) for k in ("activations", "logits_and_loss", "transient_weight", "gradients"))
    return {"planned_step_bytes": step, "planned_backward_bytes": p.items["backward_and_allocator"],
            "mlp_shards": p.settings["mlp_shards"]}


def _row(folder: Path, family: str, layers: int, n: int, checkpointing: str, tiled: str) -> dict:
    r = simulate(folder, n, checkpointing, tiled)
    _replanned(r, family, layers, checkpointing, tiled)
    print(json.dumps({k: v for k, v in r.items() if k != "top"}), flush=True)
    return r


def _replanned(r: dict, family: str, layers: int, checkpointing: str, tiled: str) -> None:
    """A row's planner columns, from the planner as it is now."""
    r.update(planned(family, layers, r["tokens"], checkpointing, tiled))
    r["simulated_backward_bytes"] = r["peak_bytes"] - r["planned_step_bytes"]


def _markdown(runs: dict) -> str:
    g = lambda b: f"{b / GIB:.2f}"
    cols = ["tokens", "simulated peak GiB", "forward peak GiB", "planned step tensors GiB",
            "simulated backward GiB", "planned backward+allocator GiB"]
    out = ["Fake tensors on this CPU (no GPU measured): one step's live tensor bytes — base weights, allocator and "
           "CUDA context aside; bfloat16, NF4 r=16 all-linear, batch 1, 2 decoder layers of the family's shapes. "
           "Simulated backward = simulated peak − the planner's step tensors: what its backward term has to cover "
           "(planner/device_backward.py); the planned column adds the allocator's 5 % of the whole plan."]
    for key, run in runs.items():
        rows = [{"tokens": f"{r['tokens']:,}", "simulated peak GiB": g(r["peak_bytes"]),
                 "forward peak GiB": g(r["forward_peak_bytes"]),
                 "planned step tensors GiB": g(r["planned_step_bytes"]),
                 "simulated backward GiB": g(r["simulated_backward_bytes"]),
                 "planned backward+allocator GiB": g(r["planned_backward_bytes"])} for r in run["rows"]]
        out.append(f"**{key}**\n\n{table(rows, cols)}")
    return "\n\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--checkpointing", default="offload", choices=["offload", "true"])
    ap.add_argument("--tiled-mlp", default="true", choices=["true", "false", "auto"])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lowbit-device-memory"))
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--replan", action="store_true", help="the stored runs' planner columns, planned again")
    a = ap.parse_args()
    stored = RESULTS / "device_memory.json"
    runs = json.loads(stored.read_text()).get("runs", {}) if stored.is_file() else {}
    if a.replan:
        for run in runs.values():
            for r in run["rows"]:
                _replanned(r, run["family"], run["layers"], run["checkpointing"], run["tiled_mlp"])
        return publish("device_memory", _markdown(runs), {"runs": runs}, a.readme)
    folder = checkpoint(a.family, a.layers, Path(a.work) / f"{a.family}-{a.layers}l")
    rows = [_row(folder, a.family, a.layers, int(n), a.checkpointing, a.tiled_mlp) for n in a.lengths.split(",")]
    key = f"{a.family}, checkpointing {a.checkpointing}, tiled_mlp {a.tiled_mlp}"
    runs[key] = {"family": a.family, "layers": a.layers, "checkpointing": a.checkpointing,
                 "tiled_mlp": a.tiled_mlp, "rows": rows}
    publish("device_memory", _markdown(runs), {"runs": runs}, a.readme)


if __name__ == "__main__":
    main()
