"""Freed heap pages handed back between decoder layers: the trim runs in training steps (forward and backward,
every k-th layer) and never in evaluation or sampling, only once resident memory grew past the slack since the last
trim; the step's numbers are unchanged."""

import itertools

import torch

from lowbit.io import allocator
from lowbit.io.loader import load
from lowbit.nn.lora import add_lora
from lowbit.training import host_memory
from lowbit.training.host_memory import release_between_layers

from tiny import save_tiny


def _model(tmp_path):
    save_tiny(tmp_path, "llama", num_hidden_layers=4, max_position_embeddings=8192)
    net = load(tmp_path, None, compute_dtype=torch.float32)
    add_lora(net, r=4, alpha=8, verbose=False)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return net.train()


def test_trims_in_training_steps_only(tmp_path, monkeypatch):
    net = _model(tmp_path)
    ids = torch.randint(0, 256, (1, 4200), generator=torch.Generator().manual_seed(0))  # layer outputs ≥ 1 MiB
    want = net(input_ids=ids, labels=ids, use_cache=False).loss
    want.backward()
    g_want = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    net.zero_grad()
    calls, growing = [], itertools.count(2**30, 2**30)  # a GiB more resident at every look: always past the slack
    monkeypatch.setattr(host_memory, "trim_host_heap", lambda: calls.append(torch.is_grad_enabled()))
    monkeypatch.setattr(allocator, "resident_bytes", lambda: next(growing))
    assert release_between_layers(net, calls_per_pass=2) == 2  # every 2nd of 4 layers
    got = net(input_ids=ids, labels=ids, use_cache=False).loss
    forward_calls = len(calls)
    got.backward()
    assert forward_calls == 2 and len(calls) > forward_calls  # after layers 2 and 4, then again in backward
    assert torch.equal(got, want)
    assert all(torch.equal(a, p.grad) for a, p in zip(g_want, [p for p in net.parameters() if p.grad is not None]))
    calls.clear()
    with torch.no_grad():
        net(input_ids=ids, use_cache=False)
    short = ids[:, :64]
    net(input_ids=short, labels=short, use_cache=False).loss.backward()
    assert calls == []  # evaluation / sampling, and short steps: never


def test_trims_only_past_the_slack(tmp_path, monkeypatch):
    """A trim when resident memory is more than ``slack`` above what the last trim left, not otherwise."""
    net = _model(tmp_path)
    ids = torch.randint(0, 256, (1, 4200), generator=torch.Generator().manual_seed(0))
    mib = 2**20
    # resident memory at each look: the first hook trims (and then reads 100 MiB); +50 and +99 MiB stay within a
    # 100 MiB slack, +101 MiB does not: it trims, and what it leaves (60 MiB) is the new reference
    seen = iter([100 * mib, 100 * mib, 150 * mib, 199 * mib, 201 * mib, 60 * mib] + [61 * mib] * 20)
    calls = []
    monkeypatch.setattr(host_memory, "trim_host_heap", lambda: calls.append(1))
    monkeypatch.setattr(allocator, "resident_bytes", lambda: next(seen))
    release_between_layers(net, calls_per_pass=4, slack=100 * mib)  # all 4 layers: 4 looks forward, 4 backward
    net(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert len(calls) == 2


TRIM = """
import torch
from pathlib import Path
from lowbit.io import allocator
from lowbit.training import host_memory

def rss():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) << 10

big = torch.ones(6_000_000)  # a freed 24 MB mmapped block lifts the mmap threshold: 8 MB blocks come from the heap
del big
pairs = [(torch.ones(2_000_000), torch.ones(500_000)) for _ in range(40)]
keep = [k for _, k in pairs]
del pairs  # the 8 MB blocks are freed: holes between the kept ones
held = rss()
print(host_memory.trim_host_heap(), held - rss(), len(keep))
"""


def test_the_trim_gives_pages_back():
    """glibc keeps the pages of freed blocks that lie between live ones; the trim returns them (measured in a fresh
    process — a long-lived one's heap holds other free chunks —: 40 freed 8 MB blocks, each followed by a kept 2 MB
    one)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, timeout=120, check=True)
    trimmed, released, kept = out.stdout.split()
    assert trimmed == "True" and kept == "40"
    assert int(released) > 200 * 2**20, released  # their pages were still resident until the trim
