"""The CPU backward term (planner/host_backward.py): its shape, and the planner against the long-context peaks
measured by bench/long_context.py (the search's lowbit rows and --plan-check's rows, each replanned now)."""

import json
from pathlib import Path

from lowbit.io.allocator import TRIM_MIN_BYTES, TRIM_SLACK_BYTES
from lowbit.planner.host_backward import CHECKPOINTED_FLOOR, DISK_EXTRA, GLIBC_MMAP_MAX, host_backward_bytes
from lowbit.planner.memory import plan

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _measured_rows() -> list[dict]:
    """(tokens, dtype, checkpointing, tiled_mlp, measured GiB above imports) of every stored lowbit step."""
    search = json.loads((RESULTS / "long_context.json").read_text())
    rows = [dict(tokens=r["tokens"], dtype=search["dtype"], checkpointing=search["checkpointing"],
                 tiled_mlp=search["tiled_mlp"], above=r["above_imports_GiB"])
            for r in search["rows"] if r["side"] == "lowbit" and "above_imports_GiB" in r]
    checks = json.loads((RESULTS / "long_context_plan.json").read_text())["rows"]
    return rows + [dict(tokens=r["tokens"], dtype=r["dtype"], checkpointing=r["checkpointing"],
                        tiled_mlp=r["tiled_mlp"], above=r["above_imports_GiB"]) for r in checks]


def test_the_planner_is_within_ten_percent_of_every_measured_long_context_step(monkeypatch):
    monkeypatch.syspath_prepend(str(RESULTS.parent))  # bench/, for this test only
    from long_context import _planned  # the bench's own plan of the run it measured (its data pipeline left out)

    rows = _measured_rows()
    assert len({r["dtype"] for r in rows}) == 2 and len(rows) >= 8  # both compute dtypes, lengths 2k to the longest
    errors = {}
    for r in rows:
        planned = _planned(r["tokens"], r["tiled_mlp"], r["checkpointing"], r["dtype"]) / 2**30
        errors[r["dtype"], r["checkpointing"], r["tokens"]] = round(100 * (planned / r["above"] - 1), 1)
    assert all(abs(e) <= 10 for e in errors.values()), errors


TINY = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=24, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def test_checkpointed_steps_keep_a_floor_then_grow_with_a_layer_and_drop_where_blocks_are_mapped():
    def back(n, checkpointing=True, dtype="float32"):
        return plan(TINY, sequence_len=n, device="cpu", gradient_checkpointing=checkpointing,
                    compute_dtype=dtype).items["backward_and_allocator"]

    assert back(2048) == back(4096) == CHECKPOINTED_FLOOR  # short steps: what the runtime and the heap keep
    mapped = GLIBC_MMAP_MAX // (TINY["hidden_size"] * 4)  # tokens whose float32 hidden states reach 32 MiB
    assert back(mapped - 1024) > back(mapped - 8192) > CHECKPOINTED_FLOOR  # past the floor: ~2 layers' activations
    assert back(mapped) < back(mapped - 1024)  # from 32 MiB every freed block goes back at once
    assert back(4096, "offload_disk") - back(4096) == DISK_EXTRA
    assert back(mapped, "offload_disk") - back(mapped) == DISK_EXTRA
    on_gpu = [plan(TINY, sequence_len=8192, device="cuda", gradient_checkpointing=c).items["backward_and_allocator"]
              for c in (True, "offload_disk")]
    assert on_gpu[1] <= on_gpu[0]  # a CPU measurement: the GPU estimate adds nothing for files


def test_checkpointing_never_plans_more_than_without_it():
    few = dict(TINY, num_hidden_layers=1)
    for n in (1024, 4096, 65536):
        kw = dict(sequence_len=n, device="cpu", compute_dtype="float32")
        assert plan(few, gradient_checkpointing=True, **kw).items["backward_and_allocator"] <= \
            plan(few, gradient_checkpointing=False, **kw).items["backward_and_allocator"]


def test_without_checkpointing_trimmed_steps_plan_a_fifth_of_the_activations_and_half_the_trim_slack():
    """Trims wait for TRIM_SLACK_BYTES of growth (training/host_memory.py): half of it is counted from the hidden-state
    size at which trims run (TRIM_MIN_BYTES); shorter steps keep 1.2× their activations instead."""
    act = 100 * 2**20
    short, trimmed = (host_backward_bytes(0, act, False, h) for h in (TRIM_MIN_BYTES - 1, TRIM_MIN_BYTES))
    assert short == int(1.2 * act) and trimmed == int(0.2 * act) + TRIM_SLACK_BYTES // 2
    gpu = [plan(TINY, sequence_len=n, device="cuda").items["backward_and_allocator"] for n in (8191, 8192)]
    assert gpu[1] - gpu[0] < TRIM_SLACK_BYTES // 100  # a CPU allocator's habit: the GPU estimate does not take it
