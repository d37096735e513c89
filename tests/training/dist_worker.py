"""Run by tests/training/test_distributed.py under torchrun: ``train()`` from a JSON config, with optional faults,
and a report per rank (<report>/rank<r>.json) of what the tests check that only the ranks can see."""

import json
import os
import signal
import sys

import torch


def main():
    cfg, report, opts = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")
    from lowbit.training import distributed, loop, loss, recipe
    from lowbit.training.config import TrainConfig

    rank = int(os.environ["RANK"])
    if opts.get("per_rank_normalisation"):  # the negative control: each rank divides by its own tokens
        loop.learned_tokens = lambda group, world: float(sum(loss.answer_tokens(b) for b in group))
    if opts.get("kill_rank") == rank:  # a rank that dies in the middle of a step
        real, calls = loss.lm_loss, {"n": 0}

        def dying(model, batch, *a, **k):
            calls["n"] += torch.is_grad_enabled()
            if calls["n"] == opts["kill_at_call"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(model, batch, *a, **k)

        loss.lm_loss = dying
    if opts.get("corrupt_rank") == rank:  # this rank's base differs from the others' by one code byte
        load_model = recipe.load_model

        def corrupted(*a, **k):
            model = load_model(*a, **k)
            codes = next(m for m in model.modules() if hasattr(m, "codes")).codes
            with torch.no_grad():
                codes.view(-1)[0] ^= 1
            return model

        recipe.load_model = corrupted
    distributed.World.close = lambda self: None  # keep the group for the checks below
    res = recipe.train(TrainConfig(**cfg), resume=opts.get("resume", False), progress=False)
    world = distributed.World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    model = res["model"]
    from lowbit.io.loader import load
    from lowbit.nn.linear import Linear4bit

    fresh = load(cfg["base_model"], compute_dtype=torch.float32)
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    orig = lambda n: fresh.get_submodule(n.removesuffix(".base"))  # inside a LoRA layer the base is .base
    same = all(torch.equal(whole(m.codes), orig(n).codes) and torch.equal(whole(m.absmax), orig(n).absmax)
               for n, m in model.named_modules() if isinstance(m, Linear4bit))
    out = {"rank": rank, "base_bytes": distributed.base_bytes(model), "full_base_bytes":
           distributed.base_bytes(fresh), "codes_equal_after_training": same, "eval_loss": res["eval_loss"]}
    with open(os.path.join(report, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    world.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
