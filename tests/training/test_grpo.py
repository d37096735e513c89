"""GRPO runs through ``lowbit.train`` (the reward rises, resume reproduces the same completions and losses, a failing
reward function is named in one line), the sampler (greedy equals transformers' ``generate``; a prompt's completions
do not depend on what shares its batch; top-k / top-p equal transformers' warpers), the config's checks, the prompt
data and the built-in rewards."""

import json
from pathlib import Path

import pytest
import torch

from lowbit.data.prompts import prompt_row
from lowbit.data.records import Record
from lowbit.errors import LowbitError
from lowbit.generation import filter_logits
from lowbit.rewards import answer_format, exact_answer
from lowbit.training import recipe
from lowbit.training.config import TrainConfig, load_config
from lowbit.training.rollout import sample_completions

REWARDS = '''
def low_ids(prompts, completions, completion_ids, **_):
    """The share of completion tokens with an id below 128: a behaviour a tiny random model can learn."""
    return [sum(t < 128 for t in ids) / len(ids) for ids in completion_ids]


def picky(prompts, completions, answer, **_):
    return [{"ok": 1.0}[a] for a in answer]   # a KeyError for any other answer
'''


@pytest.fixture(scope="module")
def task(setup, tmp_path_factory):
    """A folder with rewards.py, prompts.jsonl (24 chat prompts with an answer column) and model/: the tiny model
    with its (tied) output matrix tripled, so that its LoRA can move the token distribution far enough for a reward
    on token ids to rise (the plain tiny model's logits stay within ~±0.6 of each other)."""
    from tiny import save_tiny_with_tokenizer

    root = tmp_path_factory.mktemp("grpo")
    model, _ = save_tiny_with_tokenizer(root / "model")
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    model.save_pretrained(root / "model")
    (root / "rewards.py").write_text(REWARDS)
    rows = [{"prompt": [{"role": "user", "content": f"what is the capital of france {i}"}], "answer": "ok"}
            for i in range(24)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(setup, task, out, trl=None, **kw):
    base = dict(base_model=str(task / "model"), datasets=str(task / "prompts.jsonl"), compute_dtype="float32",
                lora_r=4, lora_alpha=8, micro_batch_size=8, sequence_len=64, max_steps=12, learning_rate=3e-2,
                warmup_steps=0,
                save_steps=4, val_set_size=0, output_dir=str(task / out), rl="grpo",
                trl={"num_generations": 4, "max_completion_length": 8,
                     "reward_funcs": [f"{task / 'rewards.py'}:low_ids"], **(trl or {})})
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward_and_resumes_exactly(setup, task):
    from tiny import InterruptAt

    logs = []
    recipe.train(_cfg(setup, task, "full", trl={"log_completions": True}), progress=False, log=logs.append)
    assert any("24 train / 0 valid prompts, 2 a step" in str(m) for m in logs)
    rows = _metrics(task / "full")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"reward", "reward_std", "rewards/low_ids/mean", "completions/mean_length", "clip_ratio/region_mean",
            "frac_reward_zero_std"} <= set(rows[0])
    first, last = rows[0]["reward"], sum(r["reward"] for r in rows[-4:]) / 4
    assert last > first + 0.3, [r["reward"] for r in rows]
    logged = [json.loads(line) for line in (task / "full" / "completions.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "completion", "reward"} <= set(logged[0]) and logged[-1]["step"] == 12

    with pytest.raises(LowbitError, match="interrupted at step 5"):
        recipe.train(_cfg(setup, task, "resumed"), progress=False, log=lambda *a: None, callbacks=[InterruptAt(5)])
    recipe.train(_cfg(setup, task, "resumed"), resume=True, progress=False, log=lambda *a: None)
    got = _metrics(task / "resumed")
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(got, rows):  # the same completions (their rewards) and the same losses
        assert a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"], a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]


def test_held_out_prompts_are_scored_before_during_and_after(setup, task):
    """val_set_size holds prompts out: each evaluation samples a group for each with fixed seeds and reports the
    mean reward (eval_reward; the eval loss is minus it) — it rises with the training reward."""
    logs = []
    res = recipe.train(_cfg(setup, task, "held", val_set_size=4, eval_steps=6), progress=False, log=logs.append)
    assert any("20 train / 4 valid prompts" in str(m) for m in logs)
    before = next(str(m) for m in logs if "eval loss before training" in str(m))
    start = float(before.split("held-out reward ")[1].rstrip(")"))
    assert res["base_eval_loss"] == pytest.approx(-start, abs=1e-4)
    evals = [r for r in _metrics(task / "held") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert r["eval_loss"] == pytest.approx(-r["eval_reward"], rel=1e-6)
        assert "eval_rewards/low_ids/mean" in r
    assert evals[-1]["eval_reward"] > start + 0.2, (start, [r["eval_reward"] for r in evals])


def test_beta_and_batch_scaling_train(setup, task):
    recipe.train(_cfg(setup, task, "beta", max_steps=3, trl={"beta": 0.05, "scale_rewards": "batch",
                                                             "loss_type": "grpo", "epsilon_high": 0.28}),
                 progress=False, log=lambda *a: None)
    rows = _metrics(task / "beta")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero: policy = reference
    assert rows[-1]["kl"] > 0


def test_a_failing_reward_function_is_named_with_its_sample(setup, task, tmp_path):
    rows = [{"prompt": f"what is the capital of france {i}", "answer": "ok" if i != 5 else "no"} for i in range(8)]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(setup, task, "fails", datasets=str(data), save_steps=1, max_steps=8,
               trl={"reward_funcs": [f"{task / 'rewards.py'}:picky"]})
    with pytest.raises(LowbitError) as e:
        recipe.train(cfg, progress=False, log=lambda *a: None)
    msg = str(e.value)
    assert "\n" not in msg
    assert "reward function picky failed on sample 5 of the data, completion 1" in msg and "KeyError: 'no'" in msg
    step = int(msg.split(":", 1)[0].removeprefix("step "))
    kept = msg.rsplit("Last good checkpoint: ", 1)[1]
    assert (kept == "none") == (step == 1)
    if step > 1:
        assert Path(kept).is_dir() and Path(kept).name.endswith(str(step - 1))


def _greedy_reference(model, prompts, n, pad):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=pad,
                         eos_token_id=None, temperature=None, top_p=None, top_k=None)
    return out[:, width:].tolist()


def test_sampling_matches_greedy_generate_and_is_independent_of_the_batch(setup):
    from lowbit.io.loader import load
    from lowbit.io.tokenizer import tokenizer_for

    tok = tokenizer_for(str(setup[1]))
    model = load(setup[1], None, compute_dtype=torch.float32)
    a = tok("what is the capital of france", add_special_tokens=False)["input_ids"]
    b = tok("hello", add_special_tokens=False)["input_ids"]
    greedy, _ = sample_completions(model, [a, b], 1, [1, 2], 10, [], tok.pad_token_id, temperature=1e-6)
    assert greedy == _greedy_reference(model, [a, b], 10, tok.pad_token_id)
    alone, _ = sample_completions(model, [b], 3, [7], 10, [tok.eos_token_id], tok.pad_token_id)
    shared, _ = sample_completions(model, [a, b], 3, [9, 7], 10, [tok.eos_token_id], tok.pad_token_id)
    assert shared[3:] == alone
    other, _ = sample_completions(model, [b], 3, [8], 10, [tok.eos_token_id], tok.pad_token_id)
    assert other != alone  # another seed, other completions


def test_sampling_with_a_cache_that_cannot_repeat_or_drop_rows(setup, monkeypatch):
    """Caches of other architectures may lack batch_repeat_interleave / batch_select_indices: the prompts are then
    read once per row and finished rows run on — the same completions."""
    from transformers.cache_utils import DynamicCache

    from lowbit.io.loader import load
    from lowbit.io.tokenizer import tokenizer_for

    tok = tokenizer_for(str(setup[1]))
    model = load(setup[1], None, compute_dtype=torch.float32)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("what is the capital of france", "hello")]
    args = (prompts, 3, [7, 9], 12, [tok.eos_token_id, *range(40, 120)], tok.pad_token_id)  # many stops: rows end
    usual = sample_completions(model, *args)
    assert len({len(c) for c in usual[0]}) > 2  # rows left the batch at different steps

    def missing(self):
        raise AttributeError

    for name in ("batch_repeat_interleave", "batch_select_indices"):
        monkeypatch.setattr(DynamicCache, name, property(missing), raising=False)
    assert not hasattr(DynamicCache(), "batch_select_indices")
    assert sample_completions(model, *args) == usual


@pytest.mark.parametrize("k,p", [(5, 1.0), (0, 0.7), (20, 0.5)])
def test_top_k_and_top_p_equal_transformers(k, p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    want = logits.clone()
    if k:
        want = TopKLogitsWarper(k)(None, want)
    if p < 1:
        want = TopPLogitsWarper(p)(None, want)
    assert torch.equal(filter_logits(logits, k, p).isinf(), want.isinf())
    assert torch.equal(filter_logits(logits, k, p)[~want.isinf()], logits[~want.isinf()])


@pytest.mark.parametrize("change,message", [
    ({"trl": {"num_generations": 4}}, "trl.reward_funcs: rl: grpo needs at least one reward function"),
    ({"trl": {"reward_funcs": ["m.f"], "loss_type": "gspo"}}, "trl.loss_type: must be one of grpo, bnpo"),
    ({"trl": {"reward_funcs": ["m.f"], "num_iterations": 2}}, "trl.num_iterations: 2: lowbit generates"),
    ({"trl": {"reward_funcs": ["m.f"], "num_generations": 3}}, "micro_batch_size × gradient_accumulation_steps "
                                                                 r"\(8 completions a step\) must be a multiple"),
    ({"trl": {"reward_funcs": ["m.f"], "num_gens": 3}}, "trl.num_gens: is not read by lowbit's GRPO"),
    ({"trl": {"reward_funcs": ["m.f"], "importance_sampling_level": "sequence"}},
     "trl.importance_sampling_level: 'sequence' is not built in"),
    ({"trl": {"reward_funcs": ["m.f"], "reward_weights": [1, 2]}}, "trl.reward_weights: needs one number per"),
    ({"trl": {"reward_funcs": ["m.f"], "beta": 0.1}, "lora_model_dir": "runs/sft"},
     "trl.beta: > 0 needs a run that starts from the base"),
    ({"trl": {"reward_funcs": ["m.f"]}, "datasets": [{"path": "x.jsonl", "type": "alpaca"}]},
     r"datasets\[0\].type: alpaca — rl: grpo reads prompts"),
])
def test_config_mistakes_are_one_line(change, message):
    cfg = TrainConfig(**{**dict(rl="grpo", micro_batch_size=8, val_set_size=0, datasets="arithmetic"), **change})
    with pytest.raises(LowbitError, match=message) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


def test_reward_functions_beside_the_config_and_import_errors(setup, task, tmp_path):
    path = task / "grpo.yml"
    path.write_text("rl: grpo\nval_set_size: 0\nmicro_batch_size: 8\ntrl:\n  reward_funcs: [rewards.low_ids, "
                    "lowbit.rewards.exact_answer]\n")
    cfg = load_config(path).validate()
    assert cfg.trl["reward_funcs"] == [f"{(task / 'rewards.py').resolve()}:low_ids", "lowbit.rewards.exact_answer"]
    bad = _cfg(setup, task, "bad-import", trl={"reward_funcs": ["no_such_module.f"]})
    with pytest.raises(LowbitError, match=r"trl.reward_funcs: no_such_module.f: cannot import no_such_module"):
        recipe.train(bad, progress=False, log=lambda *a: None)
    (tmp_path / "broken.py").write_text("def f(:\n")
    bad = _cfg(setup, task, "bad-file", trl={"reward_funcs": [f"{tmp_path / 'broken.py'}:f"]})
    with pytest.raises(LowbitError, match="broken.py failed to import: SyntaxError"):
        recipe.train(bad, progress=False, log=lambda *a: None)
    assert not (task / "bad-file" / "checkpoints").exists()


def test_prompt_rows_tokenize_as_trl_and_keep_their_columns(setup):
    from lowbit.io.tokenizer import tokenizer_for

    tok = tokenizer_for(str(setup[1]))
    msgs = [{"role": "user", "content": "what is the capital of france"}]
    row = prompt_row(Record({"prompt": msgs, "answer": "paris", "n": 3}, "x:1"), tok, "prompt", 64, {})
    want = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"] == want and json.loads(row["columns"]) == {"prompt": msgs, "answer": "paris", "n": 3}
    text = prompt_row(Record({"prompt": "hello how are you"}, "x:2"), tok, "prompt", 64, {})
    assert text["prompt_ids"] == tok("hello how are you", add_special_tokens=False)["input_ids"]
    assert prompt_row(Record({"prompt": "hello " * 80}, "x:3"), tok, "prompt", 16, {})["length"] == 0
    with pytest.raises(LowbitError, match="x:4: field 'prompt' must be text or a list"):
        prompt_row(Record({"prompt": 5}, "x:4"), tok, "prompt", 64, {})


def test_builtin_rewards():
    comps = ["The answer is 42.", [{"role": "assistant", "content": "#### 41"}], "no number", "7"]
    assert exact_answer(None, comps, answer=["42", "41", "3", "7.0"]) == [1.0, 1.0, 0.0, 1.0]
    assert exact_answer(None, comps[:1], answer=[None]) == [None]
    assert answer_format(None, comps) == [0.0, 0.0, 0.0, 1.0]


AXOLOTL_REWARDS = '''
def oai_gsm8k_transform(cfg, *args, **kwargs):
    def transform_fn(example, tokenizer=None):
        label = example["answer"].split("####")[-1].strip().replace(",", "")
        return {"prompt": [{"role": "user", "content": example["question"]}], "answer": label}
    return transform_fn, {"remove_columns": ["question"]}


def columns_seen(prompts, completions, **columns):
    assert "question" not in columns and columns["answer"][0] == "42", sorted(columns)
    assert prompts[0][0]["content"].startswith("what is")
    return [0.0 for _ in completions]
'''


def test_an_axolotl_grpo_config_with_its_own_transform_trains(task, tmp_path):
    """Axolotl's GRPO recipe as its docs write it: rewards.py beside the config holds the reward functions and the
    data transform (``type: rewards.oai_gsm8k_transform``), a vllm: section (sampling runs in-process here)."""
    (tmp_path / "rewards.py").write_text(AXOLOTL_REWARDS)
    rows = [{"question": f"what is {i} + {42 - i}?", "answer": f"{i} + {42 - i} = 42 #### 42"} for i in range(8)]
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "grpo.yml").write_text(f"""base_model: {task / 'model'}
rl: grpo
vllm:
  host: 0.0.0.0
  port: 8000
trl:
  use_vllm: true
  beta: 0.001
  max_completion_length: 8
  num_generations: 4
  reward_funcs: ["rewards.columns_seen"]
  reward_weights: [1.0]
datasets:
  - path: {tmp_path / 'gsm.jsonl'}
    type: rewards.oai_gsm8k_transform
val_set_size: 0.0
micro_batch_size: 4
gradient_accumulation_steps: 2
max_steps: 2
sequence_len: 64
output_dir: {tmp_path / 'out'}
""")
    cfg = load_config(tmp_path / "grpo.yml")
    assert cfg.datasets[0]["type"] == f"{(tmp_path / 'rewards.py').resolve()}:oai_gsm8k_transform"
    logs = []
    res = recipe.train(cfg.validate(), progress=False, log=logs.append)
    assert res["steps"] == 2 and any("8 train / 0 valid prompts, 2 a step" in str(m) for m in logs)
    (tmp_path / "rewards.py").write_text(AXOLOTL_REWARDS.replace("[-1]", "[0]"))  # the token cache follows the code
    with pytest.raises(LowbitError, match="reward function columns_seen failed on sample .*AssertionError"):
        recipe.train(load_config(tmp_path / "grpo.yml").validate(), progress=False, log=lambda *a: None,
                     overwrite=True)


def test_prompts_under_another_field_and_a_missing_one(setup, tmp_path):
    from lowbit.data.sources import parse_sources
    from lowbit.data.table import source_tables
    from lowbit.io.tokenizer import tokenizer_for

    tok = tokenizer_for(str(setup[1]))
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"what is {i}", "answer": str(i)}) + "\n" for i in range(4)))
    table = source_tables(parse_sources([{"path": str(data), "field": "question"}]), tok, 0, 0, 64,
                          kind="prompt").train
    assert json.loads(table.row(0)["columns"])["prompt"] == "what is 0"
    with pytest.raises(LowbitError, match=r"q.jsonl:1: rl: grpo reads prompts: field 'prompt' .* is missing "
                                          r"\(fields: answer, question; name another with field:\)"):
        source_tables(parse_sources(str(data)), tok, 0, 0, 64, kind="prompt")


def test_compiled_layers_give_the_same_grpo_run(setup, task):
    """Sampling runs the eager layers (it uses a cache), the policy loss the compiled ones: the same rewards and
    losses as an eager run."""
    from tiny import runs_compiled_layers

    for c in (False, True):
        _, ran = runs_compiled_layers(lambda: recipe.train(_cfg(setup, task, f"compile-{c}", compile=c,
                                                                max_steps=3), progress=False, log=lambda *a: None))
        assert ran == c
    eager, compiled = (_metrics(task / f"compile-{c}") for c in (False, True))
    assert [r["reward"] for r in compiled] == [r["reward"] for r in eager]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4, abs=1e-6)
