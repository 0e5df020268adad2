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

import torch

from raylm.errors import InputError
from raylm.model.gpt import GPT, GPTConfig
from raylm.tokenize.ingest import BackgroundIterator, DataPosition, SequenceOrder, TokenStream, sample_checksum
from raylm.tokenize.shards import read_token_meta
from raylm.train.topology import rank_coords
from raylm.train.config import OptimizerConfig, TrainConfig
from raylm.train.metrics import TrainLog, perplexity, progress_line

STATE_FILE = "state.json"
DEEPSPEED_DIR = "deepspeed"
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
    betas = (cfg.optimizer.beta1, cfg.optimizer.beta2)
    if cfg.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the host; DeepSpeed's vectorized CPU Adam is made for that.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.optimizer.lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=betas, fused=cfg.use_gpu or None)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config["spec"]` is a LoopSpec."""
    spec: LoopSpec = config["spec"]
    cfg = spec.train
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

    coords = rank_coords(rank, world, pipeline_stages=1)
    meta = read_token_meta(cfg.data)
    order = SequenceOrder(meta.num_sequences["train"], cfg.micro_batch_size, coords.dp_size, spec.seed, cfg.shuffle)
    checkpoint = ray.train.get_checkpoint()
    state, data = _read_state(checkpoint, spec, order, rank)
    # The data stream starts now, in the background, so its first batches are ready when the engine is.
    stream = TokenStream(cfg.data, "train", order, coords.dp_rank, prefetch_batches=cfg.prefetch_batches)
    train_batches = BackgroundIterator(stream.iter_torch(data.position, device), depth=max(1, cfg.prefetch_batches))

    engine, scheduler, num_params = _build_engine(spec)
    start_step = _restore(engine, checkpoint, state)
    history = list(state["history"]) if state else []
    torch.manual_seed(spec.seed + 1 + rank + 7919 * start_step)  # dropout differs per rank and per restart

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    loss_fn = spec.loss_hook.build(device, dtype) if spec.loss_hook is not None else lm_loss
    val_batches = _validation_batches(cfg, meta.num_sequences["validation"], coords, device)
    log = TrainLog(spec.run_name, history, spec.tensorboard_dir) if rank == 0 else None
    if rank == 0:
        logger.info(
            f"[raylm] {spec.run_name}: {num_params:,} params, {world} workers,"
            f" ZeRO {cfg.zero_stage}, {cfg.precision}, steps {start_step}->{cfg.max_steps},"
            f" data from epoch {data.position.epoch} batch {data.position.batch} of {order.batches_per_epoch}"
        )

    seq_len = int(val_batches[0].size(1) - 1)
    tokens_per_step = spec.deepspeed["train_batch_size"] * seq_len
    window = _Window(device, cfg.grad_accum_steps)
    started = time.perf_counter()
    # a run resumed at (or past) max_steps trains no further: it re-reports the last logged figures
    last_logged = next(({k: v for k, v in h.items() if k != "step"} for h in reversed(history) if "loss" in h), {})
    for step in range(start_step + 1, cfg.max_steps + 1):
        for _ in range(cfg.grad_accum_steps):
            waited = time.perf_counter()
            tokens, indices, position = next(train_batches)
            window.data_wait += time.perf_counter() - waited
            data.consume(indices, position)
            inputs, targets = _shift(tokens)
            loss, parts = loss_fn(engine, inputs, targets)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer and scheduler only at accumulation boundaries
            window.add(loss, parts)
        final = step == cfg.max_steps
        report = final or step % cfg.eval_interval_steps == 0 or step % cfg.checkpoint_interval_steps == 0
        if step % cfg.log_interval_steps == 0 or report:
            last_logged = window.flush(scheduler.get_last_lr()[0], tokens_per_step)
            if log is not None:
                log.record(step, last_logged)
                logger.info(f"[raylm] {progress_line(step, cfg.max_steps, last_logged)}")
        if report and not final:
            checkpoint = step % cfg.checkpoint_interval_steps == 0
            _report(engine, spec, step, start_step, last_logged, val_batches, log, started, data, checkpoint=checkpoint)
            window.started = time.perf_counter()  # evaluation and checkpoint time is not training throughput
            window.data_wait = 0.0
    train_batches.close()
    final_step = max(cfg.max_steps, start_step)
    _report(engine, spec, final_step, start_step, last_logged, val_batches, log, started, data, checkpoint=True, export=True)
    if log is not None:
        log.close()


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
    """Sums of the training loss (and its parts) since the last log line, kept on the device."""

    def __init__(self, device: torch.device, grad_accum_steps: int):
        self.device = device
        self.grad_accum_steps = grad_accum_steps
        self.run_wait = self.run_seconds = 0.0  # over every window of this run (this process)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_steps = 0
        self.data_wait = 0.0  # seconds spent waiting for the next micro-batch
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        for key, value in {"loss": loss, **parts}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.micro_steps += 1

    def flush(self, lr: float, tokens_per_step: int) -> dict:
        """Mean loss over all ranks and micro-batches since the last flush, the LR and the global throughput."""
        import torch.distributed as dist

        keys = sorted(self.sums)
        count = torch.tensor(float(self.micro_steps), device=self.device)
        totals = torch.stack([self.sums[k] for k in keys] + [count]).to(self.device, torch.float64)
        dist.all_reduce(totals)  # (len(keys) + 1,): summed over ranks
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.run_wait += self.data_wait
        self.run_seconds += seconds
        wait = torch.tensor([self.data_wait / seconds, self.run_wait / self.run_seconds], device=self.device,
                            dtype=torch.float64)  # fmt: skip
        dist.all_reduce(wait, op=dist.ReduceOp.MAX)  # the rank that waited longest
        steps = max(self.micro_steps / self.grad_accum_steps, 1e-9)  # every rank ran the same micro-steps
        values = {k: float(totals[i] / totals[-1]) for i, k in enumerate(keys)}
        values.update(
            lr=float(lr),
            step_time_s=seconds / steps,
            tokens_per_s=tokens_per_step * steps / seconds,
            data_wait_frac=float(wait[0]),
            run_data_wait_frac=float(wait[1]),
        )
        self._reset()
        return values


def _shift(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) rows -> inputs (B, T) = row[:-1], targets (B, T) = row[1:], each contiguous."""
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def _validation_batches(cfg: TrainConfig, num_sequences: int, coords, device: torch.device) -> list[torch.Tensor]:
    """This rank's validation batches: the first `eval_batches` of the split in file order, read once and reused.

    Every rank gets the same number (under ZeRO-3 every forward pass is a collective).
    """
    micro = max(1, min(cfg.micro_batch_size, num_sequences // coords.dp_size))
    order = SequenceOrder(num_sequences, micro, coords.dp_size, seed=0, shuffle=False)
    stream = TokenStream(cfg.data, "validation", order, coords.dp_rank)
    count = min(cfg.eval_batches, order.batches_per_epoch)
    return [torch.from_numpy(b).to(device) for b in stream.numpy_batches(epoch=0, count=count)]


@torch.no_grad()
def _evaluate(engine, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over every rank's validation batches."""
    import torch.distributed as dist

    engine.eval()
    device = batches[0].device
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    for batch in batches:
        inputs, targets = _shift(batch)
        _, loss = engine(inputs, targets)
        tokens = targets.numel()
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
) -> None:
    """Evaluate, then report to Ray Train on every rank, with this rank's checkpoint files when due."""
    import ray.train

    val_loss = _evaluate(engine, val_batches)
    evaluation = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
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
        **{k: v for k, v in train_values.items() if k in ("ce", "kl")},
        **evaluation,
        "data_wait_frac": train_values.get("data_wait_frac", float("nan")),
        "run_data_wait_frac": train_values.get("run_data_wait_frac", float("nan")),
        "elapsed_s": time.perf_counter() - started,
        "start_step": start_step,  # > 0: this run resumed from a checkpoint at that step
        "epoch": data.position.epoch,
        "sample_checksum": checksum,
    }
    if not checkpoint:
        ray.train.report(metrics)
        return
    directory = Path(tempfile.mkdtemp(prefix="raylm-checkpoint-"))
    try:
        _save(engine, spec, step, log, directory, data.to_state(checksum))
        if export:
            _export(engine, spec, step, _shift(val_batches[0][:1])[0], directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


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
        state = {"step": step, "model": spec.model, "history": log.history, "data": data}
        (directory / STATE_FILE).write_text(json.dumps(state))


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
    from safetensors.torch import save_file

    from raylm.model.artifact import save_model

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
    if rank != 0:
        return
    model = GPT(GPTConfig.from_dict(spec.model))
    missing = {name for name, _ in model.named_parameters()} - set(full)
    if missing:
        raise RuntimeError(f"export: parameters missing from the engine: {sorted(missing)}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(full[name])
    extra = {"trained_steps": step, "run_name": spec.run_name, **spec.export_extra}
    save_model(directory / MODEL_DIR, model, spec.tokenizer_file, eos_token_id=spec.eos_token_id, extra=extra)
    probe_tensors = {"input_ids": probe.cpu().contiguous(), "logits": logits.float().cpu().contiguous()}
    save_file(probe_tensors, str(directory / PROBE_FILE))
