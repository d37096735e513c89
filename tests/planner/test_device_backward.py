"""The GPU's checkpointed backward term and the simulation it comes from (bench/device_memory.py): the live-bytes
count is exact on known allocations, fake tensors count what real ones hold, and the planner's term is never below
a stored simulated row."""

import json
from pathlib import Path

import pytest
import torch

from lowbit.planner.device_backward import device_backward_bytes

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import device_memory

    return device_memory


def test_live_bytes_counts_new_storages_while_they_live(bench):
    mib = 1 << 20
    with bench.LiveBytes() as live:
        a = torch.ones(mib // 4)  # 1 MiB of float32
        b = a + 1  # a new storage: 2 MiB live
        v = b.view(-1, 2)  # a view adds nothing
        b.add_(1)  # in place adds nothing
        del a  # freed: 1 MiB live
        c = torch.ones(mib // 2)  # 2 MiB more: 3 MiB live, the peak
        del b, v, c
    assert live.peak == 3 * mib and live.live == 0


def test_flash_workspace_follows_flash_attention_2(bench):
    q = torch.empty(1, 32, 1000, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 8, 1000, 128, dtype=torch.bfloat16, device="meta")
    func = next(iter(bench.FLASH_BACKWARD))
    dq_accum, softmax_d, expanded = 1024 * 32 * 128 * 4, 32 * 1000 * 4, 2 * 1000 * 32 * 128 * 2
    assert bench.flash_workspace(func, (q, q, k, k)) == dq_accum + softmax_d + expanded
    assert bench.flash_workspace(func, (q, q, q, q)) == dq_accum + softmax_d  # no grouped heads: nothing expanded
    assert bench.flash_workspace(torch.ops.aten.mm.default, (q, q)) == 0


@pytest.mark.parametrize("checkpointing", ["offload", "true"])
def test_fake_tensors_count_what_real_ones_hold(bench, tmp_path, checkpointing):
    from tiny import save_tiny

    save_tiny(tmp_path, "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=3, vocab_size=512)
    real = bench.simulate(tmp_path, 96, checkpointing, "true", fake=False)
    fake = bench.simulate(tmp_path, 96, checkpointing, "true", fake=True)
    assert fake["peak_bytes"] == real["peak_bytes"] > 0
    assert fake["forward_peak_bytes"] == real["forward_peak_bytes"] > 0


def test_fake_step_builds_no_dense_mask(bench, tmp_path):
    """A row whose L×L mask would dwarf its activations: the simulated peak stays below two bytes an entry
    (transformers builds the mask as a bool and a bfloat16 tensor; it skips it for a real row, and the stand-ins
    give fake tensors the same answer: without them this peak is 4.5 bytes an entry)."""
    from tiny import save_tiny

    save_tiny(tmp_path, "llama", hidden_size=64, intermediate_size=128, vocab_size=256, max_position_embeddings=4096)
    n = 4096
    assert bench.simulate(tmp_path, n, "true", "false")["peak_bytes"] < 2 * n * n  # a mask: ≥ 3 bytes an entry


def test_planner_term_is_not_below_a_simulated_row():
    runs = json.loads((BENCH / "results" / "device_memory.json").read_text())["runs"]
    from lowbit.planner.catalog import load_model_config

    checked = 0
    for run in runs.values():
        cfg = load_model_config(run["family"])
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        for r in run["rows"]:  # the MLP's shards as the planner counted them for the row
            term = device_backward_bytes(r["tokens"], h, i, r["mlp_shards"])
            assert r["simulated_backward_bytes"] <= term <= r["simulated_backward_bytes"] + (3 << 29), (run, r)
            checked += 1
    assert checked >= 8
