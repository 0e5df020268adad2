"""Training figures: the history kept by rank 0, progress lines, TensorBoard, Ray gauges, the loss-curve PNG.

The history is a list of flat dicts, one per logged step (`loss`, `lr`, `grad_norm`, `tokens_per_s`,
`mfu`, the step-time split, `peak_rss_mb`, ...) or evaluation (`val_loss`, `val_ppl`, `val_bpb`).
It travels inside every checkpoint, so a resumed run's loss curve starts at step 0, not at the resume point.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from ray.util.metrics import Gauge

from raylm import storage


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy), capped so that an early, huge loss stays a finite number in JSON."""
    return math.exp(min(loss, 50.0))


# Per-window training figures (besides loss and lr) that go into the reported metrics and the summary.
TRAIN_FIGURES = (
    "grad_norm", "mfu", "data_wait_s", "forward_backward_s", "optimizer_s", "forward_backward_frac", "optimizer_frac",
    "peak_rss_mb", "peak_gpu_mem_mb",
)  # fmt: skip
# Figures taken once per run (raylm.train.loop._run_figures), reported with every evaluation.
RUN_FIGURES = ("flops_per_token", "peak_flops_per_worker", "peak_flops_source", "params_per_worker")


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """Mean cross-entropy `loss` (nats per token) of text with `tokens_per_byte` tokens per UTF-8 byte, in bits per
    byte: comparable across tokenizers, as the same text has the same bytes whatever its tokens."""
    return loss * tokens_per_byte / math.log(2)


def target_bytes(tokenizer, sequences: np.ndarray) -> int:
    """UTF-8 bytes of the text the targets of packed rows (N, T + 1) spell out, special tokens (end of text) excluded.

    Consecutive rows overlap by one token, so the targets of consecutive rows are one
    contiguous stretch of text: decoding them at once keeps multi-byte characters whole.
    """
    ids = sequences[:, 1:].reshape(-1).tolist()
    return len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))


def params_held(module) -> int:
    """Parameter elements this process holds: under ZeRO-3 its partitions (`ds_tensor`), else every parameter whole."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainLog:
    """Rank 0's record of a run: appends to the history and prints, writes TensorBoard and Ray gauges.

    TensorBoard events for a directory on an object store are written to a local directory first and copied
    there at most every `upload_interval_s` and when the log closes (an event file only grows; a resumed run
    adds a file of its own beside the earlier ones, as on a disk).
    """

    def __init__(self, run_name: str, history: list[dict], tensorboard_dir: str | None = None,
                 upload_interval_s: float = 30.0):
        self.run_name = run_name
        self.history = history
        self._writer = None
        self._upload_to = None
        self._upload_interval_s = upload_interval_s
        self._uploaded_at = 0.0
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # loads TensorBoard: only when it is on

            local = tensorboard_dir
            if storage.is_uri(tensorboard_dir):
                self._upload_to = tensorboard_dir
                local = tempfile.mkdtemp(prefix="raylm-tensorboard-")
            os.makedirs(local, exist_ok=True)
            self._writer = SummaryWriter(local)
        self._gauges = _ray_gauges()

    def _upload(self, force: bool = False) -> None:
        """Copy the local event files to the object-store directory, if it is time to (or `force`)."""
        if self._upload_to is None or not (force or time.monotonic() - self._uploaded_at >= self._upload_interval_s):
            return
        local = self._writer.get_logdir()
        for name in sorted(os.listdir(local)):
            storage.write_bytes(storage.join(self._upload_to, name), Path(local, name).read_bytes())
        self._uploaded_at = time.monotonic()

    def record(self, step: int, values: dict) -> None:
        """Append `values` at `step` to the history and publish them."""
        self.history.append({"step": step, **values})
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"train/{key}", value, step)
            self._writer.flush()
            self._upload()
        for key, value in values.items():
            gauge = self._gauges.get(key)
            if gauge is not None:
                gauge.set(value, tags={"run": self.run_name})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if self._upload_to is not None:
                self._upload(force=True)
                shutil.rmtree(self._writer.get_logdir(), ignore_errors=True)


def _ray_gauges() -> dict:
    """Dashboard gauges (Ray's Prometheus metrics); empty outside a Ray worker."""
    names = {
        "loss": "training loss (mean cross-entropy, or the distillation loss)",
        "val_loss": "validation cross-entropy",
        "lr": "learning rate",
        "tokens_per_s": "training throughput over all workers",
        "data_wait_frac": "fraction of step time the slowest-fed worker waited for data",
        "grad_norm": "global gradient 2-norm before clipping, mean over the optimizer steps since the last log",
        "mfu": "model FLOP utilization: model FLOPs/s over the workers' combined peak",
        "forward_backward_frac": "fraction of step time in forward and backward passes (with the communication in them)",
        "optimizer_frac": "fraction of step time in the optimizer step (with ZeRO's gathers of updated weights)",
        "val_bpb": "validation bits per byte (tokenizer-independent)",
        "peak_rss_mb": "peak resident memory of the largest worker process (MiB)",
        "peak_gpu_mem_mb": "peak GPU memory allocated by torch on the largest worker (MiB)",
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
    if "grad_norm" in values:
        parts.append(f"gnorm {values['grad_norm']:.3f}")
    if "tokens_per_s" in values:
        parts.append(f"{values['tokens_per_s']:,.0f} tok/s")
    if "mfu" in values:
        parts.append(f"mfu {100 * values['mfu']:.1f}%")
    if "step_time_s" in values:
        parts.append(f"{values['step_time_s']:.3f} s/step")
    split = [(k, values.get(f"{k}_frac")) for k in ("data_wait", "forward_backward", "optimizer")]
    if all(frac is not None for _, frac in split):
        parts.append("(data {:.0%} fwd+bwd {:.0%} opt {:.0%})".format(*(frac for _, frac in split)))
    elif "data_wait_frac" in values:
        parts.append(f"data wait {100 * values['data_wait_frac']:.1f}%")
    if "peak_rss_mb" in values:
        parts.append(f"rss {values['peak_rss_mb']:,.0f} MiB")
    if "val_loss" in values:
        parts.append(f"val_loss {values['val_loss']:.4f} val_ppl {values['val_ppl']:.2f}")
    if "val_bpb" in values:
        parts.append(f"val_bpb {values['val_bpb']:.3f}")
    return " ".join(parts)


def plot_loss_curve(history: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Training and validation loss against step, as a PNG; below it, throughput and MFU when logged."""
    import matplotlib  # a second of imports, for the one picture: not at module import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    speed = [(h["step"], h["tokens_per_s"]) for h in history if "tokens_per_s" in h]
    # MFU is tokens/s times a constant of the run (FLOPs per token over the peak): a second scale on that axis
    per_token = [100 * h["mfu"] / h["tokens_per_s"] for h in history if "mfu" in h and h.get("tokens_per_s")]
    rows = 2 if speed else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 4 + 2.5 * (rows - 1)), dpi=120, sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2][:rows]})  # fmt: skip
    ax = axes[0, 0]
    ce = [(h["step"], h["ce"]) for h in history if "ce" in h]
    if train:
        ax.plot(*zip(*train), label="distillation loss" if ce else "train loss", color="tab:blue")
    if ce:
        ax.plot(*zip(*ce), label="train cross-entropy", color="tab:green")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if speed:
        low = axes[1, 0]
        low.plot(*zip(*speed), color="tab:purple", label="tokens/s")
        low.set_ylabel("tokens/s (all workers)")
        low.grid(alpha=0.3)
        if per_token:
            k = per_token[-1]
            low.secondary_yaxis("right", functions=(lambda t: t * k, lambda m: m / k)).set_ylabel("MFU (%)")
        low.set_xlabel("optimizer step")
    else:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
