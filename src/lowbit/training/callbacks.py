"""What the loop reports to: each callback sees the run begin, every finished step (with its metrics record,
which it may add to) and the end (also after Ctrl-C or an error, so files are closed).

    Evaluator      held-out loss every ``every`` steps and at the last one → record["eval_loss"], history
    StepMetrics    a preference run's rewards, margins and accuracy, a GRPO run's rewards, lengths and clip ratios
                   (the step's and the evaluation's) → record
    MetricsLog     one JSON line per logged step (metrics.jsonl)
    ProgressBar    tqdm on stderr: loss, lr, tokens/s, eval loss
    CompileTime    with compiled layers: the first step's time (compiling included) against the second's
    (experiment trackers — TensorBoard, Weights & Biases, MLflow — are in trackers.py)

Order matters: the Evaluator goes before StepMetrics, and both before the writers, so they see what is added.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .evaluation import evaluate

__all__ = ["Callback", "Evaluator", "StepMetrics", "MetricsLog", "ProgressBar", "CompileTime", "logged"]


class Callback:
    def on_train_begin(self, state) -> None:
        pass

    def on_step_end(self, state, record: dict) -> None:
        pass

    def on_train_end(self, state) -> None:
        pass


class Evaluator(Callback):
    """``run``: ``evaluate``'s keywords (dtype, loss_fn, world)."""

    def __init__(self, model, valid, every: int, last_step: int, **run):
        self.model, self.valid, self.every, self.last, self.run = model, valid, every, last_step, run

    def on_step_end(self, state, record):
        if state.step % self.every == 0 or state.step == self.last:
            record["eval_loss"] = evaluate(self.model, self.valid, **self.run)
            state.history["eval"].append([state.step, record["eval_loss"]])


class StepMetrics(Callback):
    """The metrics a loss module keeps (``preference.PreferenceLoss.take_metrics``), summed over the ranks: every
    rank runs this callback, as the sums are collective."""

    def __init__(self, module, world):
        self.module, self.world = module, world

    def on_step_end(self, state, record):
        record.update(self.module.take_metrics("train", self.world))
        if "eval_loss" in record:
            record.update(self.module.take_metrics("eval", self.world))


class CompletionsLog(Callback):
    """A GRPO run's sampled completions (``trl.log_completions``): the first few of every logged step, with their
    prompt and reward, appended to ``completions.jsonl``."""

    def __init__(self, module, path: Path, every: int = 1):
        self.module, self.path, self.every = module, Path(path), every

    def on_step_end(self, state, record):
        if logged(state, record, self.every):
            with open(self.path, "a") as f:
                for s in self.module.samples:
                    f.write(json.dumps({"step": state.step, **s}, ensure_ascii=False) + "\n")


def logged(state, record, every: int) -> bool:
    return state.step % every == 0 or "eval_loss" in record


class MetricsLog(Callback):
    def __init__(self, path: Path, every: int = 1):
        self.path, self.every, self.f = Path(path), every, None

    def on_train_begin(self, state):
        self.f = open(self.path, "a")

    def on_step_end(self, state, record):
        if logged(state, record, self.every):
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def on_train_end(self, state):
        if self.f is not None:
            self.f.close()


class ProgressBar(Callback):
    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled, self.bar = total, enabled, None

    def on_train_begin(self, state):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=state.step, desc="train", unit="step", disable=not self.enabled,
                        dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, state, record):
        self.bar.update(1)
        extra = {"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}
        if "rewards/accuracies" in record:
            extra["acc"] = f"{record['rewards/accuracies']:.2f}"
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", **extra)

    def on_train_end(self, state):
        if self.bar is not None:
            self.bar.close()


class CompileTime(Callback):
    """Says what compiling the layers cost: the first step of this process (compiled then) against the next."""

    def __init__(self, log):
        self.log, self.times = log, []

    def on_train_begin(self, state):
        self.times = [time.perf_counter()]

    def on_step_end(self, state, record):
        if len(self.times) < 3:
            self.times.append(time.perf_counter())
            if len(self.times) == 3:
                first, second = self.times[1] - self.times[0], self.times[2] - self.times[1]
                self.log(f"compile: the first step took {first:.1f} s (compiling included), the second {second:.1f} s")
