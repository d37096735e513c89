"""Several processes with torchrun and gloo on this CPU: DDP and FSDP2 equal one process over the same
micro-batches; FSDP2 shards the 4-bit base; checkpoints resume exactly; a dead rank ends the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.io.adapters import read_adapter
from lowbit.training import recipe
from lowbit.training.config import TrainConfig

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def varied(setup):
    """Chat data whose answers differ in length, so ranks hold unequal numbers of learned tokens."""
    root, model_dir, _ = setup
    g = torch.Generator().manual_seed(0)
    words = "paris london rome berlin madrid lisbon vienna prague".split()
    rows = []
    for i in range(40):
        n = int(torch.randint(1, 12, (1,), generator=g))
        answer = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
        rows.append({"messages": [{"role": "user", "content": f"name {n} cities {i}"},
                                  {"role": "assistant", "content": answer}]})
    data = root / "varied.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model_dir, data


def _cfg(model_dir, data, out, **kw):
    base = dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4, lora_alpha=8,
                lora_dropout=0.0, micro_batch_size=2, gradient_accumulation_steps=2, sequence_len=64, max_steps=4,
                learning_rate=3e-3, warmup_steps=0, eval_steps=4, save_steps=2, val_set_size=8, output_dir=str(out))
    base.update(kw)
    return base


def _torchrun(cfg: dict, report: Path, opts: dict | None = None, nproc: int = 2, timeout: int = 300):
    report.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           json.dumps(cfg), str(report), json.dumps(opts or {})]
    # PYTHONFAULTHANDLER: a rank that dies on a signal (an abort inside torch) prints its Python stack to stderr
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _why(p: subprocess.CompletedProcess) -> str:
    """What a failed torchrun said: a rank that died on a signal first (faulthandler's "Fatal Python error" and its
    Python stack, which the list of extension modules after it would push out of a plain tail), then the tail."""
    head = p.stderr.find("Fatal Python error")
    return (p.stderr[head:head + 3000] + "\n…\n" if head >= 0 else "") + p.stderr[-2000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: Path, b: Path, rtol=1e-5, atol=5e-6) -> bool:
    """Same losses and adapters up to float32 summation order: on a machine whose oneDNN kernels sum in another
    order across processes (measured on a 2-core AMX CPU) the adapters of 2 ranks and of one process differ by up
    to 1.5e-6 after four AdamW steps at lr 3e-3 (Adam scales near-zero gradients' rounding up to the step size)."""
    la, lb = _losses(a), _losses(b)
    ta, tb = read_adapter(a)[1], read_adapter(b)[1]
    same_losses = len(la) == len(lb) and all(x == pytest.approx(y, rel=rtol) for x, y in zip(la, lb))
    return same_losses and set(ta) == set(tb) and all(torch.allclose(ta[k], tb[k], atol=atol, rtol=0) for k in ta)


@pytest.fixture(scope="module")
def single(varied, tmp_path_factory):
    """One process, micro-batch 2 × accumulation 4: the reference for 2 ranks × accumulation 2."""
    model_dir, data = varied
    out = tmp_path_factory.mktemp("dist") / "single"
    res = recipe.train(TrainConfig(**_cfg(model_dir, data, out, gradient_accumulation_steps=4)), progress=False,
                       log=lambda *a: None)
    return out, res


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(varied, single, tmp_path, mode):
    model_dir, data = varied
    out = tmp_path / mode
    cfg = _cfg(model_dir, data, out, distributed=mode, gradient_checkpointing=mode == "fsdp")
    p = _torchrun(cfg, tmp_path / "report")
    assert p.returncode == 0, _why(p)
    assert _close(out, single[0]), (_losses(out), _losses(single[0]))
    reports = [json.loads((tmp_path / "report" / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["eval_loss"] == pytest.approx(single[1]["eval_loss"], rel=1e-5)
    assert all(r["codes_equal_after_training"] for r in reports), "gathered codes must equal the originals"
    total = reports[0]["full_base_bytes"]
    if mode == "fsdp":  # each rank holds about half of the 4-bit base; together, all of it (plus padding)
        local = [r["base_bytes"] for r in reports]
        assert all(b <= total / 2 + 4096 for b in local) and total <= sum(local) <= total + 4096, (local, total)
    else:
        assert all(r["base_bytes"] == total for r in reports)
    cks = sorted(x.name for x in (out / "checkpoints").iterdir())
    assert cks == ["step-0000002", "step-0000004"], cks  # one folder per save, no leftovers from other ranks


def test_packed_rows_on_two_ranks_equal_one_process(varied, tmp_path):
    """sample_packing under DDP: the ranks share each step's packed micro-batches as one process would run them."""
    model_dir, data = varied
    one = tmp_path / "one"
    recipe.train(TrainConfig(**_cfg(model_dir, data, one, gradient_accumulation_steps=4, sample_packing=True)),
                 progress=False, log=lambda *a: None)
    two = tmp_path / "two"
    p = _torchrun(_cfg(model_dir, data, two, distributed="ddp", sample_packing=True), tmp_path / "report")
    assert p.returncode == 0, _why(p)
    # the ranks' gradients add as (g1+g3)+(g2+g4), one process's as ((g1+g2)+g3)+g4: float32 rounding that Adam's
    # normalisation carries into the factors at ~1e-6 after 4 steps (measured 1.01e-6 here, every run)
    assert _close(two, one, atol=2e-6), (_losses(two), _losses(one))


def test_per_rank_normalisation_breaks_the_equivalence(varied, single, tmp_path):
    """The negative control: dividing by each rank's own tokens is not what one process computes."""
    model_dir, data = varied
    out = tmp_path / "wrong"
    p = _torchrun(_cfg(model_dir, data, out, distributed="ddp"), tmp_path / "report",
                  {"per_rank_normalisation": True})
    assert p.returncode == 0, _why(p)
    assert not _close(out, single[0])


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_8bit"])
def test_checkpoint_resume_equals_uninterrupted_and_loads_in_peft(varied, single, tmp_path, optimizer):
    """kill -9 in step 3, --resume: the run equals an uninterrupted one — for torch's AdamW (whose FSDP run equals
    one process) and for lowbit's paged 8-bit AdamW on each rank's shard (compared with 2 uninterrupted ranks:
    8-bit blocks of a shard are not those of the whole tensor)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, data = varied
    out = tmp_path / "resumed"
    cfg = _cfg(model_dir, data, out, distributed="fsdp", optimizer=optimizer, optimizer_budget_mb=0.01)
    reference = single[0]
    if optimizer != "adamw":  # LoRA tensors of 8192 elements: 4096 per rank, enough for 8-bit state (≥ 4096)
        cfg.update(lora_r=64, lora_alpha=64, lora_target_modules=["up_proj", "down_proj"])
        reference = tmp_path / "uninterrupted"
        p = _torchrun({**cfg, "output_dir": str(reference)}, tmp_path / "r0")
        assert p.returncode == 0, _why(p)
    # kill -9 one rank in step 3 (its 5th training forward), after the step-2 checkpoint; torchrun ends the other
    p = _torchrun(cfg, tmp_path / "r1", {"kill_rank": 1, "kill_at_call": 5})
    assert p.returncode != 0 and sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step-0000002"]
    p = _torchrun(cfg, tmp_path / "r2", {"resume": True})
    assert p.returncode == 0, _why(p)
    assert _close(out, reference), (_losses(out), _losses(reference))
    if optimizer != "adamw":
        from safetensors import safe_open

        with safe_open(str(out / "checkpoints" / "step-0000004" / "trainer_state.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert any(k.endswith("m_q.rank0") for k in keys) and any(k.endswith("m_q.rank1") for k in keys), keys
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, out)  # the adapter the ranks wrote is an ordinary PEFT adapter
    # a different number of processes is refused, naming both
    p = _torchrun({**cfg, "distributed": "auto"}, tmp_path / "r3", {"resume": True}, nproc=1)
    assert p.returncode != 0 and "written by 2 process(es) (fsdp)" in p.stderr, p.stderr[-2000:]


def test_a_dead_rank_ends_the_run(varied, tmp_path):
    model_dir, data = varied
    p = _torchrun(_cfg(model_dir, data, tmp_path / "dead", distributed="ddp", ddp_timeout=60), tmp_path / "report",
                  {"kill_rank": 1, "kill_at_call": 3}, timeout=120)
    assert p.returncode != 0
    assert not (tmp_path / "report" / "rank0.json").exists(), "rank 0 must not finish as if nothing happened"


def test_ranks_with_different_bases_are_refused(varied, tmp_path):
    model_dir, data = varied
    p = _torchrun(_cfg(model_dir, data, tmp_path / "two-bases", distributed="ddp"), tmp_path / "report",
                  {"corrupt_rank": 1})
    assert p.returncode != 0 and "the ranks loaded different base models" in p.stderr, p.stderr[-2000:]


def test_distributed_settings_in_one_process_train_as_one_process(varied, single, tmp_path):
    """distributed: fsdp (Axolotl's fsdp keys) without torchrun: one process's run, said so."""
    model_dir, data = varied
    said = []
    cfg = _cfg(model_dir, data, tmp_path / "x", distributed="fsdp", gradient_accumulation_steps=4)
    recipe.train(TrainConfig(**cfg), progress=False, log=said.append)
    assert any("distributed: fsdp in one process: nothing to share or shard" in s for s in said)
    assert _close(tmp_path / "x", single[0])


@pytest.mark.slow
def test_torchrun_lowbit_train_on_smollm2(tmp_path):
    """What a user types: torchrun … -m lowbit train config.yaml, on the built-in model, FSDP over 2 processes."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"base_model: smollm2-135m\ndatasets: chatterbot\nmicro_batch_size: 4\nsequence_len: 128\n"
                   f"max_steps: 6\neval_steps: 6\nsave_steps: 3\nval_set_size: 16\nlearning_rate: 3.0e-4\n"
                   f"distributed: fsdp\noutput_dir: {tmp_path / 'run'}\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "lowbit", "train", str(cfg), "--quiet"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, _why(p)
    assert p.stdout.count("adapter saved to") == 1, "only rank 0 reports"
    before, after = map(float, next(x for x in p.stdout.splitlines() if x.startswith("eval loss:"))[10:].split("->"))
    assert after < before
    assert "of 4-bit base per rank" in p.stdout
    assert sorted(x.name for x in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    assert read_adapter(tmp_path / "run")[1], "the adapter is written"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dpo_on_two_ranks_equals_one_process(varied, tmp_path, mode):
    """Preference pairs are never split: 2 ranks × accumulation 2 compute the losses and adapter of one process with
    accumulation 4 (the reference — the base with LoRA switched off — included)."""
    model_dir, data = varied
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["messages"][:1], "chosen": r["messages"][1:],
                                         "rejected": [{"role": "assistant", "content": rows[i - 1]["messages"][1]
                                                       ["content"]}]}) + "\n" for i, r in enumerate(rows)))
    one = tmp_path / "one"
    recipe.train(TrainConfig(**_cfg(model_dir, pairs, one, gradient_accumulation_steps=4, rl="dpo")),
                 progress=False, log=lambda *a: None)
    two = tmp_path / mode
    p = _torchrun(_cfg(model_dir, pairs, two, distributed=mode, rl="dpo"), tmp_path / "report")
    assert p.returncode == 0, _why(p)
    assert _close(two, one), (_losses(two), _losses(one))
    assert "rewards/margins" in (two / "metrics.jsonl").read_text()


@pytest.mark.parametrize("mode,scale", [("ddp", "batch"), ("fsdp", "group")])
def test_grpo_on_two_ranks_equals_one_process(varied, tmp_path, mode, scale):
    """Each rank samples whole groups (seeded by step and position, not by rank): 2 ranks × accumulation 2 sample
    the completions of one process with accumulation 4 and compute its losses, held-out rewards and adapter — with
    the step's reward statistics taken over both ranks for scale_rewards: batch."""
    model_dir, data = varied
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": json.loads(line)["messages"][:1]}) + "\n"
                               for line in data.read_text().splitlines()))
    (tmp_path / "rewards.py").write_text("def length(prompts, completions, completion_ids, **_):\n"
                                         "    return [len(c) / 8 for c in completion_ids]\n")
    trl = {"num_generations": 4, "max_completion_length": 8, "scale_rewards": scale, "beta": 0.05,
           "reward_funcs": [f"{tmp_path / 'rewards.py'}:length"]}
    kw = dict(rl="grpo", trl=trl, micro_batch_size=4, val_set_size=3, eval_steps=2)  # 3 held out: a padding pass
    one = tmp_path / "one"
    recipe.train(TrainConfig(**_cfg(model_dir, prompts, one, **{**kw, "gradient_accumulation_steps": 4})),
                 progress=False, log=lambda *a: None)
    two = tmp_path / mode
    p = _torchrun(_cfg(model_dir, prompts, two, distributed=mode, **kw), tmp_path / "report")
    assert p.returncode == 0, _why(p)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["reward"] for r in rows[0]] == pytest.approx([r["reward"] for r in rows[1]], rel=1e-6)
    held = [[r["eval_reward"] for r in rs if "eval_reward" in r] for rs in rows]
    assert len(held[0]) == 2 and held[0] == pytest.approx(held[1], rel=1e-6)
    assert _close(two, one), (_losses(two), _losses(one))
