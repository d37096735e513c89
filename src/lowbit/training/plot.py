"""loss.png from metrics.jsonl: train loss per step and its moving average, eval loss points starting from the
model before training (step 0)."""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import writing_file

__all__ = ["plot_losses"]


def plot_losses(out: Path, base_eval_loss: float | None = None) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = [r["step"] for r in recs], [r["loss"] for r in recs]
    ax.plot(steps, losses, label="train", lw=0.8, alpha=0.4)
    avg, smooth = losses[0], []
    for x in losses:
        avg = 0.9 * avg + 0.1 * x
        smooth.append(avg)
    ax.plot(steps, smooth, label="train (moving average)", lw=1.5)
    ev = ([(0, base_eval_loss)] if base_eval_loss is not None else []) + \
        [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with writing_file(out / "loss.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out / "loss.png"
