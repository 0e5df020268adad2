"""The per-worker training loop: one Ray Train worker = one DeepSpeed data-parallel rank.

Each worker builds the GPT, hands it to `deepspeed.initialize` with torch AdamW and a
warmup + cosine schedule, reads its shard of the token data from Ray Data, and trains.
Every `eval_interval_steps` and `checkpoint_interval_steps` (and at the end) all workers
evaluate and call `ray.train.report`; at checkpoint steps each rank also saves its part
of a DeepSpeed checkpoint, and Ray merges the parts into one checkpoint directory:

    <checkpoint>/deepspeed/latest, step<N>/...   engine.save_checkpoint, every rank's files
    <checkpoint>/state.json                      step, model config, metrics history, data position,
                                                 data order and sample checksum (rank 0)
    <checkpoint>/model/                          final checkpoint only: the exported raylm-gpt model
    <checkpoint>/export_probe.safetensors        final checkpoint only: logits of the trained engine on
                                                 one validation row, to check the export against

Data: each rank streams its data-parallel share through Ray Data (raylm.tokenize.ingest),
in an order fixed by the seed, so a resumed run continues at the checkpoint's data position.
Ray Train's own dataset split is not used: it hands blocks to whichever rank asks first, so
neither an exact resume position nor the pairing of pipeline stages would hold.

The loss is pluggable (`LoopSpec.loss_hook`), so distillation runs this same loop.
Everything a worker needs arrives in its `LoopSpec`; nothing is read from module globals.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from raylm.errors import InputError
from raylm.model.gpt import GPT, GPTConfig
from raylm.model.lora import apply_lora, merge_lora
from raylm.tokenize.ingest import BackgroundIterator, DataPosition, SequenceOrder, TokenStream, sample_checksum
from raylm.tokenize.shards import read_token_meta
from raylm.tokenize.sft import masked_targets
from raylm.train.objectives import Objective, shift as _shift
from raylm.train import pipeline as pipe
from raylm.train.topology import rank_coords
from raylm.train.checkpoint import (
    DEEPSPEED_DIR, STATE_FILE, TOKENIZER_FILE, CheckpointClock, mark_complete, resume_checkpoint,
    verify_deepspeed_checkpoint,
)  # fmt: skip
from raylm.train.config import OptimizerConfig, TrainConfig
from raylm.train.finetune import load_init_weights
from raylm.train.flops import flops_per_token, peak_flops_per_worker
from raylm.train.metrics import TRAIN_FIGURES, TrainLog, bits_per_byte, params_held, perplexity, progress_line, target_bytes

MODEL_DIR = "model"
PROBE_FILE = "export_probe.safetensors"

# loss_fn(engine, inputs (B, T), targets (B, T)) -> (scalar loss to backpropagate, {name: scalar} parts to log)
logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class LossHook(Protocol):
    """A picklable recipe for the training loss, built once inside each worker (e.g. loading a teacher)."""

    def build(self, device: torch.device, dtype: torch.dtype) -> LossFn: ...


@dataclass(frozen=True)
class LoopSpec:
    """Everything one worker needs, computed on the driver and pickled to every worker."""

    train: TrainConfig
    model: dict
    """GPTConfig fields of the model to train."""
    deepspeed: dict
    """The DeepSpeed config from raylm.train.deepspeed_config, used unchanged."""
    tokenizer_file: str
    eos_token_id: int
    run_name: str
    seed: int = 0
    tensorboard_dir: str | None = None
    loss_hook: LossHook | None = None
    """None: next-token cross-entropy. Validation always measures cross-entropy."""
    export_extra: dict = field(default_factory=dict)
    """Extra keys for the exported model's config.json (e.g. what it was distilled from)."""
    objective: Objective = Objective()
    """How token rows become (inputs, targets): next-token prediction, or masked-language modelling."""


def lm_loss(engine: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Next-token cross-entropy: the GPT's own loss."""
    _, loss = engine(inputs, targets)
    return loss, {}


def lr_factor(step: int, opt: OptimizerConfig, max_steps: int) -> float:
    """Multiplier of the peak LR after `step` optimizer steps: linear warmup, then cosine or linear down to min_lr_ratio."""
    if step < opt.warmup_steps:
        return (step + 1) / (opt.warmup_steps + 1)
    span = max(1, max_steps - opt.warmup_steps)
    progress = min(1.0, (step - opt.warmup_steps) / span)
    remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if opt.decay == "cosine" else 1.0 - progress
    return opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * remaining


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings (>= 2-D) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optimizer.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # LoRA trains matrices only: ZeRO drops an empty group, and the LR schedule must see as many as it does
    groups = [g for g in groups if g["params"]]
    betas = (cfg.optimizer.beta1, cfg.optimizer.beta2)
    if cfg.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the host; DeepSpeed's vectorized CPU Adam is made for that.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.optimizer.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=betas, fused=cfg.use_gpu or None)


def extensions_dir() -> str:
    """Where this process's JIT-built torch extensions live: a folder of its own under torch's default root, one per
    Python environment, torch version and ninja binary.

    DeepSpeed compiles ops on first use (on the CPU, its shared-memory all-reduce, `deepspeed_shm_comm`, whenever its
    comm backend starts: 30-90 s of every core here). torch keeps them in one folder per Python version, shared by
    every virtual environment, and ninja rebuilds whatever it finds built by a different command or a different
    ninja: the build commands name the environment's include paths, and ninja 1.12 changed how its log hashes
    commands. Workers of a local Ray find the system's ninja on PATH, those of a cluster started from the
    environment (raylm.cluster.multihost, an activated virtualenv) the `ninja` package's; each took the op for
    rebuilding after the other. Keyed by all three, every combination builds once.
    """
    import hashlib
    import shutil
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    ninja = shutil.which("ninja")
    ninja = os.path.realpath(ninja) if ninja else ""
    key = hashlib.sha1(f"{sys.prefix}\0{torch.__version__}\0{ninja}".encode()).hexdigest()[:10]
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}-{key}")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config["spec"]` is a LoopSpec."""
    spec: LoopSpec = config["spec"]
    cfg = spec.train
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())  # a user's own setting wins
    if not cfg.use_gpu:
        # Must precede the first `import deepspeed` in this process: DeepSpeed picks its accelerator on import.
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(cfg.threads_per_worker)
    # DeepSpeed's ZeRO collectives call torch APIs that warn of their deprecation on every rank, every run.
    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _check_precision(cfg.precision, device)

    coords = rank_coords(rank, world, pipeline_stages=cfg.pipeline_stages)
    pipelined = cfg.pipeline_stages > 1
    # where each stage runs (checked against pipeline_placement), for the reported metrics
    placement = {"pipeline_stage_nodes": pipe.stage_nodes(coords, cfg.pipeline_placement)} if pipelined else {}
    meta = read_token_meta(cfg.data)
    order = SequenceOrder(meta.num_sequences["train"], cfg.micro_batch_size, coords.dp_size, spec.seed, cfg.shuffle)
    checkpoint = _resume_from(ray.train.get_checkpoint(), rank)
    state, data = _read_state(checkpoint, spec, order, rank)
    # The data stream starts now, in the background, so its first batches are ready when the engine is.
    # (Middle pipeline stages get activations from the previous stage, not data.)
    reads_data = not pipelined or pipe.reads_data(coords)
    stream = TokenStream(cfg.data, "train", order, coords.dp_rank, prefetch_batches=cfg.prefetch_batches,
                         loss_mask=meta.loss_mask)  # fmt: skip
    train_batches = (
        BackgroundIterator(stream.iter_torch(data.position, device), depth=max(1, cfg.prefetch_batches)) if reads_data else None
    )

    if pipelined:
        engine, scheduler, num_params = pipe.build_pipeline_engine(
            spec,
            functools.partial(build_optimizer, cfg=cfg),
            functools.partial(lr_factor, opt=cfg.optimizer, max_steps=cfg.max_steps),
        )
    else:
        engine, scheduler, num_params = _build_engine(spec)
    start_step = _restore(engine, checkpoint, state)
    history = list(state["history"]) if state else []
    torch.manual_seed(spec.seed + 1 + rank + 7919 * start_step)  # dropout differs per rank and per restart

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    loss_fn = spec.loss_hook.build(device, dtype) if spec.loss_hook is not None else lm_loss
    val_batches = _validation_batches(cfg, meta.num_sequences["validation"], coords, device)
    val_masks = _validation_batches(cfg, meta.num_sequences["validation"], coords, device, masks=True) if meta.loss_mask else None
    log = TrainLog(spec.run_name, history, spec.tensorboard_dir) if rank == 0 else None
    if rank == 0:
        logger.info(
            f"[raylm] {spec.run_name}: {num_params:,} params, {world} workers,"
            f" ZeRO {_zero_stage_text(spec)}, {cfg.precision}, steps {start_step}->{cfg.max_steps},"
            + (f" {cfg.pipeline_stages} pipeline stages on nodes {pipe.short_nodes(placement)}," if pipelined else "")
            +
            f" data from epoch {data.position.epoch} batch {data.position.batch} of {order.batches_per_epoch}"
        )

    seq_len = int(val_batches[0].size(1) - 1)
    tokens_per_step = spec.deepspeed["train_batch_size"] * seq_len
    figures, tokens_per_byte = _run_figures(engine, spec, meta, coords, device, seq_len)
    window = _Window(
        device, cfg.grad_accum_steps, flops_per_token=figures["flops_per_token"], workers=world,
        peak_flops_per_worker=figures["peak_flops_per_worker"], synchronize=cfg.synchronize_timing,
        own_grad_norm=not pipelined and not _deepspeed_keeps_grad_norm(engine), split_times=not pipelined,
    )  # fmt: skip
    clock = CheckpointClock(cfg.checkpoint_interval_s, device)
    started = time.perf_counter()
    # a run resumed at (or past) max_steps trains no further: it re-reports the last logged figures
    last_logged = next(({k: v for k, v in h.items() if k != "step"} for h in reversed(history) if "loss" in h), {})
    feed = pipe.PipelineFeed(train_batches, data, window, spec.objective, coords) if pipelined else None
    for step in range(start_step + 1, cfg.max_steps + 1):
        if feed is not None:
            # One pipeline step: DeepSpeed pulls the step's micro-batches, runs them through the stages and
            # steps the optimizer; the loss returned (on every stage) is their mean, so it counts once per micro-batch.
            loss = engine.train_batch(feed.for_step(step))
            for _ in range(cfg.grad_accum_steps):
                window.add(loss, {})
            window.add_grad_norm(engine.get_global_grad_norm())
        else:
            for micro in range(cfg.grad_accum_steps):
                waited = time.perf_counter()
                tokens, indices, position, *loss_mask = next(train_batches)
                window.data_wait += time.perf_counter() - waited
                data.consume(indices, position)
                inputs, targets = spec.objective.train_pair(tokens, rank, step, micro)
                if loss_mask:  # SFT data: only completion tokens are targets
                    targets = masked_targets(targets, loss_mask[0])
                _train_micro_batch(engine, loss_fn, inputs, targets, window)
        final = step == cfg.max_steps
        checkpoint_due = step % cfg.checkpoint_interval_steps == 0 or clock.due()
        report = final or step % cfg.eval_interval_steps == 0 or checkpoint_due
        if step % cfg.log_interval_steps == 0 or report:
            last_logged = window.flush(scheduler.get_last_lr()[0], tokens_per_step)
            if log is not None:
                log.record(step, last_logged)
                logger.info(f"[raylm] {progress_line(step, cfg.max_steps, last_logged)}")
        if report and not final:
            checkpoint = checkpoint_due
            _report(engine, spec, step, start_step, last_logged, val_batches, log, started, data, checkpoint=checkpoint,
                    extra={**placement, **figures}, val_masks=val_masks, tokens_per_byte=tokens_per_byte)  # fmt: skip
            window.restart()  # evaluation and checkpoint time is not training throughput
            if checkpoint:
                clock.reset()
    if train_batches is not None:
        train_batches.close()
    final_step = max(cfg.max_steps, start_step)
    _report(engine, spec, final_step, start_step, last_logged, val_batches, log, started, data, checkpoint=True, export=True,
            extra={**placement, **figures}, val_masks=val_masks, tokens_per_byte=tokens_per_byte)  # fmt: skip
    if log is not None:
        log.close()


def _zero_stage_text(spec: LoopSpec) -> str:
    stage = spec.deepspeed["zero_optimization"]["stage"]
    if stage == spec.train.zero_stage:
        return str(stage)
    return f"{stage} (zero_stage {spec.train.zero_stage} shards nothing over one data-parallel rank)"


def _check_precision(precision: str, device: torch.device) -> None:
    """ConfigError on a worker whose device cannot compute in `precision` (bf16 needs compute capability 8.0+)."""
    from raylm.errors import ConfigError

    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(
            f"train.precision=bf16: GPU {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
            "has no bf16; use precision fp16 or fp32"
        )


@dataclass
class _DataState:
    """Where this rank's data stream stands, and a checksum of every sample it has trained on."""

    position: DataPosition
    order: SequenceOrder
    checksum: int = 0

    def consume(self, indices: torch.Tensor, position: DataPosition) -> None:
        self.checksum = (self.checksum + sample_checksum(indices.cpu().numpy(), self.position.epoch)) % (2**61 - 1)
        self.position = position

    def to_state(self, global_checksum: int) -> dict:
        """For state.json: the position (the same on every rank), the order it refers to, all ranks' checksum."""
        return {"position": self.position.to_dict(), "order": _order_key(self.order), "sample_checksum": global_checksum}


def _order_key(order: SequenceOrder) -> dict:
    """What must not change between a checkpoint and its resumption for the data position to mean the same."""
    return dataclasses.asdict(order)


def _build_engine(spec: LoopSpec):
    """(DeepSpeed engine, its LR scheduler, parameter count) for the spec's GPT, AdamW and DeepSpeed config."""
    import deepspeed

    cfg = spec.train
    torch.manual_seed(spec.seed)  # the same initial weights on every rank
    model = GPT(GPTConfig.from_dict(spec.model))
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.init_from:  # continued pretraining or fine-tuning: the base model's weights (raylm.train.finetune)
        load_init_weights(model, cfg.init_from)
    if cfg.lora is not None:  # freezes the base: build_optimizer then takes only the adapters
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout)
    num_params = model.num_params(non_embedding=False)  # before ZeRO-3 partitions the parameters away
    optimizer = build_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, opt=cfg.optimizer, max_steps=cfg.max_steps)
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=spec.deepspeed
    )
    return engine, scheduler, num_params


class _Window:
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
        import torch.distributed as dist

        from raylm.train.flops import model_flops_utilization
        from raylm.train.metrics import peak_rss_mb

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


def _train_micro_batch(engine, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor, window: _Window) -> None:
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


def _deepspeed_keeps_grad_norm(engine) -> bool:
    """Whether engine.get_global_grad_norm() is set at each step: by ZeRO 1-3 and DeepSpeed's bf16/fp16 optimizers,
    not when ZeRO 0 in fp32 steps torch's optimizer directly."""
    return hasattr(engine.optimizer, "_global_grad_norm")


def _local_grad_norm(engine) -> torch.Tensor | None:
    """2-norm of the gradients the module holds (a 0-d tensor on the device), None if it holds none."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def _validation_order(cfg: TrainConfig, num_sequences: int, dp_size: int) -> tuple[SequenceOrder, int]:
    """(the validation split's order in file order, micro-batches per rank): which rows the evaluations read."""
    micro = max(1, min(cfg.micro_batch_size, num_sequences // dp_size))
    order = SequenceOrder(num_sequences, micro, dp_size, seed=0, shuffle=False)
    return order, min(cfg.eval_batches, order.batches_per_epoch)


def _validation_tokens_per_byte(spec: LoopSpec, meta, dp_size: int) -> float | None:
    """Targets per UTF-8 byte of the validation rows all ranks evaluate together (end-of-text counts 0 bytes);
    None if they spell no text at all.

    Those rows are the first of the split in file order, so decoding their targets as one stream is exact.
    """
    from raylm.tokenize.bpe import load_tokenizer
    from raylm.tokenize.shards import TokenSplit

    order, count = _validation_order(spec.train, meta.num_sequences["validation"], dp_size)
    indices = np.sort(np.concatenate([order.epoch_indices(0, r)[:count].reshape(-1) for r in range(dp_size)]))
    rows = TokenSplit(meta, "validation").rows(indices)  # (N, T + 1)
    num_bytes = target_bytes(load_tokenizer(spec.tokenizer_file), rows)
    return rows[:, 1:].size / num_bytes if num_bytes else None


def _run_figures(engine, spec: LoopSpec, meta, coords, device: torch.device, seq_len: int) -> tuple[dict, float | None]:
    """Figures taken once per run: ({flops_per_token, peak_flops_per_worker, peak_flops_source,
    params_per_worker}, validation tokens per byte or None where bits per byte do not apply).

    The peak is measured (or looked up) on every rank and the largest taken, as is the count of parameter
    elements a rank holds (under ZeRO-3 its partitions); the tokens per byte are counted on rank 0.
    """
    import torch.distributed as dist

    cfg = spec.train
    peak, source = peak_flops_per_worker(cfg.peak_flops_per_worker, cfg.precision, device)
    largest = torch.tensor([peak, params_held(engine.module)], dtype=torch.float64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    # Bits per byte need next-token losses over whole text: not masked-LM losses, not SFT completions only.
    per_byte = spec.objective.kind == "causal" and not meta.loss_mask
    shared = [_validation_tokens_per_byte(spec, meta, coords.dp_size) if per_byte and dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    figures = {
        "flops_per_token": flops_per_token(spec.model, seq_len),
        "peak_flops_per_worker": float(largest[0]),
        "peak_flops_source": source,
        "params_per_worker": int(largest[1]),
    }
    return figures, shared[0]


def _validation_batches(
    cfg: TrainConfig, num_sequences: int, coords, device: torch.device, masks: bool = False
) -> list[torch.Tensor]:
    """This rank's validation batches: the first `eval_batches` of the split in file order, read once and reused.

    Every rank gets the same number (under ZeRO-3 every forward pass is a collective).
    masks: the loss masks of those batches instead (token data with loss masks).
    """
    order, count = _validation_order(cfg, num_sequences, coords.dp_size)
    stream = TokenStream(cfg.data, "validation", order, coords.dp_rank)
    read = stream.numpy_mask_batches if masks else stream.numpy_batches
    return [torch.from_numpy(b).to(device) for b in read(epoch=0, count=count)]


@torch.no_grad()
def _evaluate(
    engine, batches: list[torch.Tensor], objective: Objective = Objective(), masks: list[torch.Tensor] | None = None
) -> float:
    """Mean cross-entropy per target token (next-token, or masked tokens) over every rank's validation batches.

    masks: the batches' loss masks (SFT data): only masked-in targets count.
    """
    import torch.distributed as dist

    engine.eval()
    device = batches[0].device
    rank = dist.get_rank()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    for index, batch in enumerate(batches):
        inputs, targets = objective.eval_pair(batch, rank, index)
        if masks is not None:
            targets = masked_targets(targets, masks[index])
        _, loss = engine(inputs, targets)
        tokens = int((targets != -100).sum())  # the loss is a mean over the targets that count
        if tokens == 0:
            continue  # a batch with nothing to predict (its loss is NaN)
        totals += torch.stack([loss.detach().double() * tokens, torch.tensor(float(tokens), device=device).double()])
    dist.all_reduce(totals)
    engine.train()
    return float(totals[0] / totals[1])


def _report(
    engine,
    spec: LoopSpec,
    step: int,
    start_step: int,
    train_values: dict,
    val_batches: list[torch.Tensor],
    log: TrainLog | None,
    started: float,
    data: _DataState,
    *,
    checkpoint: bool,
    export: bool = False,
    extra: dict | None = None,
    val_masks: list[torch.Tensor] | None = None,
    tokens_per_byte: float | None = None,
) -> None:
    """Evaluate, then report to Ray Train on every rank, with this rank's checkpoint files when due.

    extra: more metrics to report as they are (the pipeline's stage -> nodes map, the run's figures).
    tokens_per_byte: validation targets per UTF-8 byte of their text, for bits per byte (None: not reported).
    """
    import ray.train

    pipelined = spec.train.pipeline_stages > 1
    if pipelined:
        val_loss = pipe.evaluate_pipeline(engine, val_batches, spec.objective, val_masks)
    else:
        val_loss = _evaluate(engine, val_batches, spec.objective, val_masks)
    evaluation = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
    if tokens_per_byte is not None:
        evaluation["val_bpb"] = bits_per_byte(val_loss, tokens_per_byte)
    if log is not None:
        log.record(step, evaluation)
        logger.info(f"[raylm] {progress_line(step, spec.train.max_steps, evaluation)}")
    checksum = _global_checksum(data.checksum)
    metrics = {
        "step": step,
        "loss": train_values.get("loss", float("nan")),
        "lr": train_values.get("lr", float("nan")),
        "tokens_per_s": train_values.get("tokens_per_s", float("nan")),
        "step_time_s": train_values.get("step_time_s", float("nan")),
        **{k: v for k, v in train_values.items() if k in ("ce", "kl", *TRAIN_FIGURES)},
        **evaluation,
        "data_wait_frac": train_values.get("data_wait_frac", float("nan")),
        "run_data_wait_frac": train_values.get("run_data_wait_frac", float("nan")),
        "elapsed_s": time.perf_counter() - started,
        "start_step": start_step,  # > 0: this run resumed from a checkpoint at that step
        "epoch": data.position.epoch,
        "sample_checksum": checksum,
        **(extra or {}),
    }
    if not checkpoint:
        ray.train.report(metrics)
        return
    directory = Path(tempfile.mkdtemp(prefix="raylm-checkpoint-"))
    try:
        _save(engine, spec, step, log, directory, data.to_state(checksum))
        if export:
            (pipe.export_pipeline if pipelined else _export)(engine, spec, step, _shift(val_batches[0][:1])[0], directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    import torch.distributed as dist

    dist.barrier()  # every rank's report has returned: all its files are in storage
    if log is not None:
        mark_complete(ray.train.get_checkpoint(), step)


def _resume_from(registered, rank: int):
    """The checkpoint this attempt starts from (raylm.train.checkpoint.resume_checkpoint), chosen by rank 0 for all."""
    import ray.train
    import torch.distributed as dist

    choice = [registered]
    if rank == 0:
        storage = ray.train.get_context().get_storage()
        choice = [resume_checkpoint(registered, storage.storage_filesystem, storage.experiment_fs_path)]
        if choice[0] is not None and (registered is None or choice[0].path != registered.path):
            logger.info(f"[raylm] resuming from {choice[0].path}: complete on every rank, not yet registered by Ray Train")
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _global_checksum(checksum: int) -> int:
    """The sample checksums of all ranks combined (a sum mod 2**61 - 1, as each rank's)."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, checksum)
    return sum(parts) % (2**61 - 1)


def _save(engine, spec: LoopSpec, step: int, log: TrainLog | None, directory: Path, data: dict) -> None:
    """This rank's part of the DeepSpeed checkpoint; rank 0 adds state.json (step, model, history, data position)."""
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=f"step{step}", client_state={"step": step})
    if log is not None:
        state = {"step": step, "model": spec.model, "history": log.history, "data": data,
                 "eos_token_id": spec.eos_token_id}  # fmt: skip
        (directory / STATE_FILE).write_text(json.dumps(state))
        shutil.copyfile(spec.tokenizer_file, directory / TOKENIZER_FILE)  # an intermediate checkpoint exports alone


def _read_state(checkpoint, spec: LoopSpec, order: SequenceOrder, rank: int) -> tuple[dict | None, _DataState]:
    """state.json of the checkpoint Ray Train hands this run (None for a fresh start) and where the data resumes.

    The position is the same on every rank. The sample checksum saved is all ranks' sum: rank 0
    carries it on, the others start from 0, so the sum over ranks continues unchanged.
    """
    if checkpoint is None:
        return None, _DataState(DataPosition(), order)
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
    if state["model"] != spec.model:
        raise InputError(
            f"{checkpoint.path}: checkpoint of a different model ({state['model']}); "
            "choose another run name or remove the old run's storage"
        )
    saved, current = state["data"]["order"], _order_key(order)
    if saved != current:
        raise InputError(
            f"{checkpoint.path}: the checkpoint's data order {saved} differs from this run's {current}; "
            "resuming would repeat or skip samples (keep micro_batch_size, num_workers, seed and the data)"
        )
    checksum = int(state["data"]["sample_checksum"]) if rank == 0 else 0
    return state, _DataState(DataPosition(**state["data"]["position"]), order, checksum)


def _restore(engine, checkpoint, state: dict | None) -> int:
    """Load the engine from the checkpoint (model, optimizer, scheduler); returns its step (0 for a fresh start)."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        # DeepSpeed unpickles with weights_only=False: every file first passes torch's weights-only unpickler
        verify_deepspeed_checkpoint(Path(d) / DEEPSPEED_DIR)
        path, client_state = engine.load_checkpoint(str(Path(d) / DEEPSPEED_DIR))
    if path is None:
        raise InputError(f"{checkpoint.path}: DeepSpeed could not load the checkpoint")
    if int(client_state["step"]) != int(state["step"]):
        raise InputError(f"{checkpoint.path}: DeepSpeed files at step {client_state['step']}, state.json at {state['step']}")
    return int(client_state["step"])


def _export(engine, spec: LoopSpec, step: int, probe: torch.Tensor, directory: Path) -> None:
    """Consolidated fp32 weights as a raylm-gpt model dir (rank 0), plus the engine's logits on `probe`.

    `safe_get_full_fp32_param` assembles each parameter from the optimizer's fp32 master
    copy (ZeRO 1-3, bf16): a collective, so every rank walks the parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    full = {}
    for name, param in engine.module.named_parameters():
        value = safe_get_full_fp32_param(param)
        if value is None:  # ZeRO 0 in fp32: the module holds the whole fp32 weight itself
            value = param.detach()
        if rank == 0:
            full[name] = value.detach().float().cpu().clone()
    with torch.no_grad():
        engine.eval()
        logits, _ = engine(probe)  # a collective under ZeRO-3
        engine.train()
    if rank == 0:
        write_export(spec, step, full, probe, logits, directory)


def write_export(
    spec: LoopSpec, step: int, full: dict[str, torch.Tensor], probe: torch.Tensor, logits: torch.Tensor,
    directory: Path, extra: dict | None = None,
) -> None:
    """Rank 0's half of an export, for plain and pipeline engines alike: the gathered fp32 weights `full`
    (the engine's parameter names) as a raylm-gpt model dir in `export_dtype`, LoRA merged, and the
    engine's `logits` on `probe` beside it, to check the export against."""
    from safetensors.torch import save_file

    from raylm.model.artifact import save_model

    model = GPT(GPTConfig.from_dict(spec.model))
    lora = spec.train.lora
    if lora is not None:  # the engine's parameter names: the frozen base weights and the adapters
        apply_lora(model, lora.rank, lora.alpha, lora.targets)
    missing = {name for name, _ in model.named_parameters()} - set(full)
    if missing:
        raise RuntimeError(f"export: parameters missing from the engine: {sorted(missing)}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(full[name])
    if lora is not None:
        model = merge_lora(model, inplace=True)  # W + (alpha / rank) * B @ A: a plain raylm-gpt model
    meta = {"trained_steps": step, "run_name": spec.run_name, **(extra or {}), **spec.export_extra}
    save_model(directory / MODEL_DIR, model, spec.tokenizer_file, eos_token_id=spec.eos_token_id, extra=meta,
               dtype=getattr(torch, spec.train.export_dtype))  # fmt: skip
    probe_tensors = {"input_ids": probe.cpu().contiguous(), "logits": logits.float().cpu().contiguous()}
    save_file(probe_tensors, str(directory / PROBE_FILE))
