"""One training step on a DeepSpeed engine, and the window of steps between two log lines.

    window = StepWindow(device, grad_accum_steps, flops_per_token=..., peak_flops_per_worker=..., workers=world)
    for micro in range(grad_accum_steps):
        train_micro_batch(engine, loss_fn, inputs, targets, window)   # forward, backward, (optimizer step)
    values = window.flush(lr, tokens_per_step)   # means over all ranks: loss, grad norm, tokens/s, MFU, ...
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from raylm.train.flops import model_flops_utilization
from raylm.train.metrics import peak_rss_mb

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""loss_fn(engine, inputs (B, T), targets (B, T)) -> (scalar loss to backpropagate, {name: scalar} parts to log)."""


def lm_loss(engine: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Next-token cross-entropy: the GPT's own loss."""
    _, loss = engine(inputs, targets)
    return loss, {}


class StepWindow:
    """What happened since the last log line: sums of the training loss (and its parts) and of the global
    gradient norm, kept on the device, and where the time went.

    Step time splits into data wait (for the next micro-batch), forward + backward, and the optimizer
    step; the rest (logging, loss bookkeeping) is step_time_s minus the three. Communication stays inside
    the last two, not split out: ZeRO's reductions run within backward, its gathers of updated weights within
    the step (and under ZeRO-3 also in forward). DeepSpeed's comms logger was measured for it and gives no
    honest figure (0.19.8: each op's logged latency is the running total of all earlier ops of that name,
    kept in a list that grows every call; async all-gathers are timed at launch). On GPUs the split needs
    `synchronize_timing` (kernels run asynchronously); without it only data wait is timed there.
    """

    def __init__(
        self,
        device: torch.device,
        grad_accum_steps: int,
        *,
        flops_per_token: float = 0.0,
        peak_flops_per_worker: float | None = None,
        workers: int = 1,
        own_grad_norm: bool = False,
        synchronize: bool = False,
        split_times: bool = True,
    ):
        self.device = device
        self.grad_accum_steps = grad_accum_steps
        self.flops_per_token, self.peak_flops_per_worker, self.workers = flops_per_token, peak_flops_per_worker, workers
        self.own_grad_norm = own_grad_norm
        """True where DeepSpeed keeps no gradient norm (ZeRO 0 in fp32 steps torch's optimizer itself)."""
        self.synchronize = synchronize and device.type == "cuda"
        # split_times False: the caller cannot time the parts (a pipeline step is one DeepSpeed call)
        self.timed = split_times and (device.type != "cuda" or self.synchronize)
        self.run_wait = self.run_seconds = 0.0  # over every window of this run (this process)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps = 0
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.grad_norms = torch.zeros((), device=self.device)  # how many finite norms were summed
        self.restart()

    def restart(self) -> None:
        """Start the clock again (after an evaluation or checkpoint: their time is not training throughput)."""
        self.data_wait = 0.0  # seconds spent waiting for the next micro-batch
        self.forward_backward = self.optimizer = 0.0  # seconds in forward + backward, in the optimizer step
        self.started = time.perf_counter()

    def clock(self) -> float:
        """perf_counter, after the device has finished its queued work when timing is synchronized."""
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        for key, value in {"loss": loss, **parts}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.micro_steps += 1

    def add_grad_norm(self, norm: float | torch.Tensor | None) -> None:
        """One optimizer step's global gradient norm (None: not known; inf or NaN: an overflow step, skipped)."""
        if norm is None:
            return
        norm = torch.as_tensor(norm, device=self.device).detach().float()
        finite = torch.isfinite(norm)
        self.grad_norm_sum += torch.where(finite, norm, 0.0)
        self.grad_norms += finite.float()

    def flush(self, lr: float, tokens_per_step: int) -> dict:
        """Means since the last flush over all ranks: loss, gradient norm, step time and its parts; the LR,
        the global throughput and MFU; the largest worker's peak memory."""
        seconds = max(time.perf_counter() - self.started, 1e-9)
        keys = sorted(self.sums)
        host = torch.tensor([self.micro_steps, seconds, self.data_wait, self.forward_backward, self.optimizer],
                            dtype=torch.float64, device=self.device)  # fmt: skip
        device_sums = [self.sums[k] for k in keys] + [self.grad_norm_sum, self.grad_norms]
        totals = torch.cat([torch.stack(device_sums).to(self.device, torch.float64), host])
        dist.all_reduce(totals)  # summed over ranks: loss parts, grad norm sum and count, then the host figures
        count, sum_seconds, sum_wait, sum_fb, sum_opt = totals[-5:].tolist()
        world = dist.get_world_size()
        self.run_wait += self.data_wait
        self.run_seconds += seconds
        gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        peaks = torch.tensor([self.data_wait / seconds, self.run_wait / self.run_seconds, peak_rss_mb(), gpu_mb],
                             device=self.device, dtype=torch.float64)  # fmt: skip
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # the rank that waited longest, the largest process
        steps = max(self.micro_steps / self.grad_accum_steps, 1e-9)  # every rank ran the same micro-steps
        step_seconds = sum_seconds / world / steps  # mean over ranks
        values = {k: float(totals[i] / count) for i, k in enumerate(keys)}
        values["lr"] = float(lr)
        norms = float(totals[len(keys) + 1])
        if norms > 0:
            values["grad_norm"] = float(totals[len(keys)]) / norms
        values.update(
            step_time_s=step_seconds,
            tokens_per_s=tokens_per_step / step_seconds,
            data_wait_frac=float(peaks[0]),
            run_data_wait_frac=float(peaks[1]),
            data_wait_s=sum_wait / world / steps,
        )
        if self.timed:
            values.update(
                forward_backward_s=sum_fb / world / steps,
                optimizer_s=sum_opt / world / steps,
                forward_backward_frac=sum_fb / sum_seconds,
                optimizer_frac=sum_opt / sum_seconds,
            )
        if self.peak_flops_per_worker:
            values["mfu"] = model_flops_utilization(
                self.flops_per_token, values["tokens_per_s"], self.peak_flops_per_worker, self.workers
            )
        values["peak_rss_mb"] = float(peaks[2])
        if self.device.type == "cuda":
            values["peak_gpu_mem_mb"] = float(peaks[3])
        self._reset()
        return values


def train_micro_batch(engine, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, window: StepWindow) -> None:
    """Forward, backward and (at accumulation boundaries) the optimizer step of one micro-batch, timed into `window`."""
    started = window.clock()
    loss, parts = loss_fn(engine, inputs, targets)
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    stepping = window.clock()
    # ZeRO 0 in fp32: DeepSpeed keeps no norm; the backward pass at the boundary has already averaged the
    # gradients over ranks, so their norm here is the global one (the same on every rank).
    own_norm = _local_grad_norm(engine) if boundary and window.own_grad_norm else None
    engine.step()  # DeepSpeed steps the optimizer and scheduler only at accumulation boundaries
    window.optimizer += window.clock() - stepping
    window.forward_backward += stepping - started
    window.add(loss, parts)
    if boundary:
        window.add_grad_norm(own_norm if own_norm is not None else engine.get_global_grad_norm())


def deepspeed_keeps_grad_norm(engine) -> bool:
    """Whether engine.get_global_grad_norm() is set at each step: by ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers,
    not when ZeRO 0 in fp32 steps torch's optimizer directly."""
    return hasattr(engine.optimizer, "_global_grad_norm")


def _local_grad_norm(engine) -> torch.Tensor | None:
    """2-norm of the gradients the module holds (a 0-d tensor on the device), None if it holds none."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None
