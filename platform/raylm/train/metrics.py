"""Training figures: the history kept by rank 0, progress lines, TensorBoard, Ray gauges, the loss-curve PNG.

The history is a list of flat dicts, one per logged step (`loss`, `lr`, `tokens_per_s`, ...)
or evaluation (`val_loss`, `val_ppl`). It travels inside every checkpoint, so a resumed
run's loss curve starts at step 0, not at the resume point.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy), capped so that an early, huge loss stays a finite number in JSON."""
    return math.exp(min(loss, 50.0))


class TrainLog:
    """Rank 0's record of a run: appends to the history and prints, writes TensorBoard and Ray gauges."""

    def __init__(self, run_name: str, history: list[dict], tensorboard_dir: str | None = None):
        self.run_name = run_name
        self.history = history
        self._writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self._writer = SummaryWriter(tensorboard_dir)
        self._gauges = _ray_gauges()

    def record(self, step: int, values: dict) -> None:
        """Append `values` at `step` to the history and publish them."""
        self.history.append({"step": step, **values})
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"train/{key}", value, step)
            self._writer.flush()
        for key, value in values.items():
            gauge = self._gauges.get(key)
            if gauge is not None:
                gauge.set(value, tags={"run": self.run_name})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _ray_gauges() -> dict:
    """Dashboard gauges (Ray's Prometheus metrics); empty outside a Ray worker."""
    try:
        from ray.util.metrics import Gauge
    except ImportError:
        return {}
    names = {
        "loss": "training loss (mean cross-entropy, or the distillation loss)",
        "val_loss": "validation cross-entropy",
        "lr": "learning rate",
        "tokens_per_s": "training throughput over all workers",
        "data_wait_frac": "fraction of step time the slowest-fed worker waited for data",
    }
    try:
        return {k: Gauge(f"raylm_train_{k}", description=d, tag_keys=("run",)) for k, d in names.items()}
    except Exception:  # no Ray worker context: figures still go to the history and stdout
        return {}


def progress_line(step: int, max_steps: int, values: dict) -> str:
    """One compact line for the console, e.g. `step   50/200 loss 4.1234 lr 1.00e-03 21,340 tok/s 0.19 s/step`."""
    parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.4f}")
    if "kl" in values and "ce" in values:
        parts.append(f"(kl {values['kl']:.4f} ce {values['ce']:.4f})")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2e}")
    if "tokens_per_s" in values:
        parts.append(f"{values['tokens_per_s']:,.0f} tok/s")
    if "step_time_s" in values:
        parts.append(f"{values['step_time_s']:.3f} s/step")
    if "data_wait_frac" in values:
        parts.append(f"data wait {100 * values['data_wait_frac']:.1f}%")
    if "val_loss" in values:
        parts.append(f"val_loss {values['val_loss']:.4f} val_ppl {values['val_ppl']:.2f}")
    return " ".join(parts)


def plot_loss_curve(history: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Training and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ce = [(h["step"], h["ce"]) for h in history if "ce" in h]
    if train:
        ax.plot(*zip(*train), label="distillation loss" if ce else "train loss", color="tab:blue")
    if ce:
        ax.plot(*zip(*ce), label="train cross-entropy", color="tab:green")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
