"""The per-worker training loop: one Ray Train worker = one DeepSpeed data-parallel rank (or one pipeline stage).

Each worker builds its DeepSpeed engine (raylm.train.engine; pipeline stages: raylm.train.pipeline_parallel),
reads its share of the token data through Ray Data (raylm.train.ingest), and trains one step at a time
(raylm.train.step). Every `eval_interval_steps` and `checkpoint_interval_steps` (and at the end) all workers
evaluate (raylm.train.validation) and call `ray.train.report`; at checkpoint steps each rank also saves its
part of a DeepSpeed checkpoint (raylm.train.checkpoint), and Ray merges the parts into one directory:

    <checkpoint>/deepspeed/latest, step<N>/...   engine.save_checkpoint, every rank's files
    <checkpoint>/state.json                      step, model config, metrics history, data position,
                                                 data order and sample checksum (rank 0)
    <checkpoint>/model/                          final checkpoint only: the exported raylm-gpt model
    <checkpoint>/export_probe.safetensors        final checkpoint only: logits of the trained engine on
                                                 one validation row, to check the export against (raylm.train.export)

Data: each rank streams its data-parallel share in an order fixed by the seed, so a resumed run continues at
the checkpoint's data position. Ray Train's own dataset split is not used: it hands blocks to whichever rank
asks first, so neither an exact resume position nor the pairing of pipeline stages would hold.

The loss is pluggable (`LoopSpec.loss_hook`), so distillation runs this same loop.
Everything a worker needs arrives in its `LoopSpec`; nothing is read from module globals.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm.model.config import GPTConfig
from raylm.storage import is_uri
from raylm.tokenize.shards import TokenMeta, read_token_meta
from raylm.train import pipeline_parallel as pipe
from raylm.train.checkpoint import CheckpointClock, mark_complete, read_state, restore, resume_from, save
from raylm.train.config import TrainConfig
from raylm.train.engine import build_engine, check_precision, zero_stage_text
from raylm.train.export import ExportSpec, export_engine
from raylm.train.flops import flops_per_token, peak_flops_per_worker
from raylm.train.ingest import BackgroundIterator, SequenceOrder, TokenStream
from raylm.train.metrics import TRAIN_FIGURES, TrainLog, bits_per_byte, params_held, perplexity, progress_line
from raylm.train.objectives import Objective, shift
from raylm.train.step import LossFn, StepWindow, deepspeed_keeps_grad_norm, lm_loss, train_micro_batch
from raylm.train.topology import RankCoords, rank_coords
from raylm.train.validation import ValidationSet, validation_tokens_per_byte
from raylm.train.worker_runtime import prepare_worker_process

logger = logging.getLogger(__name__)


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

    def export_spec(self) -> ExportSpec:
        """What the final checkpoint's exported model holds besides its weights."""
        return ExportSpec(
            model=self.model, tokenizer_file=self.tokenizer_file, eos_token_id=self.eos_token_id,
            run_name=self.run_name, dtype=self.train.export_dtype, lora=self.train.lora, extra=self.export_extra,
        )  # fmt: skip


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: `config["spec"]` is a LoopSpec."""
    spec: LoopSpec = config["spec"]
    cfg = spec.train
    prepare_worker_process(cfg)
    worker = _Worker(spec)  # restored from the run's latest checkpoint, if it has one
    last = worker.last_logged
    for step in range(worker.start_step + 1, cfg.max_steps + 1):
        worker.train_step(step)
        final = step == cfg.max_steps
        checkpoint = step % cfg.checkpoint_interval_steps == 0 or worker.clock.due()
        report = final or step % cfg.eval_interval_steps == 0 or checkpoint
        if step % cfg.log_interval_steps == 0 or report:
            last = worker.log_window(step)
        if report and not final:
            worker.report(step, last, checkpoint=checkpoint)
    worker.finish(last)


class _Worker:
    """One rank's part of the run: its engine, data stream, validation set, step window and (rank 0) log."""

    def __init__(self, spec: LoopSpec):
        self.spec = spec
        cfg = self.cfg = spec.train
        context = ray.train.get_context()
        self.rank, world = context.get_world_rank(), context.get_world_size()
        self.device = device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        check_precision(cfg.precision, device)
        self.coords = coords = rank_coords(self.rank, world, pipeline_stages=cfg.pipeline_stages)
        self.pipelined = cfg.pipeline_stages > 1
        # where each rank (and each pipeline stage, checked against pipeline_placement) runs, for the reported metrics
        placement = {"worker_nodes": worker_nodes()}
        if self.pipelined:
            placement["pipeline_stage_nodes"] = pipe.stage_nodes(coords, cfg.pipeline_placement)

        meta = read_token_meta(cfg.data)
        if is_uri(cfg.data):  # the tokenizer of this node's copy of the data, not the driver's
            self.spec = spec = replace(spec, tokenizer_file=str(meta.tokenizer_file))
        order = SequenceOrder(meta.num_sequences["train"], cfg.micro_batch_size, coords.dp_size, spec.seed, cfg.shuffle)
        checkpoint = resume_from(ray.train.get_checkpoint(), self.rank)
        state, self.data = read_state(checkpoint, spec.model, order, self.rank)
        # The data stream starts now, in the background, so its first batches are ready when the engine is.
        # (Middle pipeline stages get activations from the previous stage, not data.)
        self.batches = None
        if not self.pipelined or pipe.reads_data(coords):
            stream = TokenStream(cfg.data, "train", order, coords.dp_rank, prefetch_batches=cfg.prefetch_batches,
                                 loss_mask=meta.loss_mask)  # fmt: skip
            self.batches = BackgroundIterator(stream.iter_torch(self.data.position, device), depth=max(1, cfg.prefetch_batches))

        build = pipe.build_pipeline_engine if self.pipelined else build_engine
        self.engine, self.scheduler, num_params = build(cfg, GPTConfig.from_dict(spec.model), spec.deepspeed, spec.seed)
        self.start_step = restore(self.engine, checkpoint, state)
        torch.manual_seed(spec.seed + 1 + self.rank + 7919 * self.start_step)  # dropout differs per rank and per restart
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
        self.loss_fn = spec.loss_hook.build(device, dtype) if spec.loss_hook is not None else lm_loss
        self.validation = ValidationSet.read(cfg, meta, coords, device)

        history = list(state["history"]) if state else []
        self.log = TrainLog(spec.run_name, history, spec.tensorboard_dir) if self.rank == 0 else None
        if self.log is not None:
            logger.info(
                f"[raylm] {spec.run_name}: {num_params:,} params, {world} workers,"
                f" ZeRO {zero_stage_text(spec.deepspeed, cfg.zero_stage)}, {cfg.precision},"
                f" steps {self.start_step}->{cfg.max_steps},"
                + (f" {cfg.pipeline_stages} pipeline stages on nodes {pipe.short_nodes(placement)}," if self.pipelined else "")
                + f" data from epoch {self.data.position.epoch} batch {self.data.position.batch} of {order.batches_per_epoch}"
            )
        seq_len = int(self.validation.batches[0].size(1) - 1)
        self.tokens_per_step = spec.deepspeed["train_batch_size"] * seq_len
        figures, self.tokens_per_byte = _run_figures(self.engine, spec, meta, coords, device, seq_len)
        self.extra = {**placement, **figures}  # reported with every evaluation
        self.window = StepWindow(
            device, cfg.grad_accum_steps, flops_per_token=figures["flops_per_token"], workers=world,
            peak_flops_per_worker=figures["peak_flops_per_worker"], synchronize=cfg.synchronize_timing,
            own_grad_norm=not self.pipelined and not deepspeed_keeps_grad_norm(self.engine), split_times=not self.pipelined,
        )  # fmt: skip
        self.clock = CheckpointClock(cfg.checkpoint_interval_s, device)
        self.started = time.perf_counter()
        # a run resumed at (or past) max_steps trains no further: it re-reports the last logged figures
        self.last_logged = next(({k: v for k, v in h.items() if k != "step"} for h in reversed(history) if "loss" in h), {})
        self.feed = pipe.PipelineFeed(self.batches, self.data, self.window, spec.objective, coords) if self.pipelined else None

    def train_step(self, step: int) -> None:
        """One optimizer step: grad_accum_steps micro-batches, forward, backward, then DeepSpeed's step."""
        if self.feed is not None:
            # DeepSpeed pulls the step's micro-batches, runs them through the stages and steps the optimizer;
            # the loss returned (on every stage) is their mean, so it counts once per micro-batch.
            loss = self.engine.train_batch(self.feed.for_step(step))
            for _ in range(self.cfg.grad_accum_steps):
                self.window.add(loss, {})
            self.window.add_grad_norm(self.engine.get_global_grad_norm())
            return
        for micro in range(self.cfg.grad_accum_steps):
            waited = time.perf_counter()
            tokens, indices, position, *loss_mask = next(self.batches)
            self.window.data_wait += time.perf_counter() - waited
            self.data.consume(indices, position)
            mask = loss_mask[0] if loss_mask else None  # SFT data: only completion tokens are targets
            inputs, targets = self.spec.objective.train_pair(tokens, self.rank, step, micro, loss_mask=mask)
            train_micro_batch(self.engine, self.loss_fn, inputs, targets, self.window)

    def log_window(self, step: int) -> dict:
        """The figures of the steps since the last log line, over all ranks; logged and published by rank 0."""
        values = self.window.flush(self.scheduler.get_last_lr()[0], self.tokens_per_step)
        if self.log is not None:
            self.log.record(step, values)
            logger.info(f"[raylm] {progress_line(step, self.cfg.max_steps, values)}")
        return values

    def report(self, step: int, train_values: dict, *, checkpoint: bool, export: bool = False) -> None:
        """Evaluate, then report to Ray Train on every rank, with this rank's checkpoint files when due (and the
        exported model with the final one)."""
        if self.pipelined:
            val_loss = pipe.evaluate_pipeline(self.engine, self.validation, self.spec.objective)
        else:
            val_loss = self.validation.evaluate(self.engine, self.spec.objective)
        evaluation = {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}
        if self.tokens_per_byte is not None:
            evaluation["val_bpb"] = bits_per_byte(val_loss, self.tokens_per_byte)
        if self.log is not None:
            self.log.record(step, evaluation)
            logger.info(f"[raylm] {progress_line(step, self.cfg.max_steps, evaluation)}")
        checksum = _global_checksum(self.data.checksum)
        nan = float("nan")
        metrics = {
            "step": step,
            "loss": train_values.get("loss", nan),
            "lr": train_values.get("lr", nan),
            "tokens_per_s": train_values.get("tokens_per_s", nan),
            "step_time_s": train_values.get("step_time_s", nan),
            **{k: v for k, v in train_values.items() if k in ("ce", "kl", *TRAIN_FIGURES)},
            **evaluation,
            "data_wait_frac": train_values.get("data_wait_frac", nan),
            "run_data_wait_frac": train_values.get("run_data_wait_frac", nan),
            "elapsed_s": time.perf_counter() - self.started,
            "start_step": self.start_step,  # > 0: this run resumed from a checkpoint at that step
            "epoch": self.data.position.epoch,
            "sample_checksum": checksum,
            **self.extra,
        }
        if not checkpoint:
            ray.train.report(metrics)
            self.window.restart()  # evaluation time is not training throughput
            return
        directory = Path(tempfile.mkdtemp(prefix="raylm-checkpoint-"))
        try:
            state = None
            if self.log is not None:
                state = {"model": self.spec.model, "history": self.log.history, "data": self.data.to_state(checksum),
                         "eos_token_id": self.spec.eos_token_id}  # fmt: skip
            save(self.engine, directory, step, state, self.spec.tokenizer_file)
            if export:
                probe = shift(self.validation.batches[0][:1])[0]  # (1, T)
                export_engine(self.engine, self.spec.export_spec(), step, probe, directory, self.cfg.pipeline_stages)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        dist.barrier()  # every rank's report has returned: all its files are in storage
        if self.log is not None:
            mark_complete(ray.train.get_checkpoint(), step)
        self.window.restart()  # nor is checkpoint time
        self.clock.reset()

    def finish(self, last: dict) -> None:
        """The final report: evaluation, checkpoint and the exported model."""
        if self.batches is not None:
            self.batches.close()
        self.report(max(self.cfg.max_steps, self.start_step), last, checkpoint=True, export=True)
        if self.log is not None:
            self.log.close()


def worker_nodes() -> list[str]:
    """The IP address of each rank's node (index: rank), gathered from every rank."""
    ips = [None] * dist.get_world_size()
    dist.all_gather_object(ips, ray.util.get_node_ip_address())
    return ips


def _run_figures(engine, spec: LoopSpec, meta: TokenMeta, coords: RankCoords, device: torch.device,
                 seq_len: int) -> tuple[dict, float | None]:  # fmt: skip
    """Figures taken once per run: ({flops_per_token, peak_flops_per_worker, peak_flops_source,
    params_per_worker}, validation tokens per byte or None where bits per byte do not apply).

    The peak is measured (or looked up) on every rank and the largest taken, as is the count of parameter
    elements a rank holds (under ZeRO-3 its partitions); the tokens per byte are counted on rank 0.
    """
    cfg = spec.train
    peak, source = peak_flops_per_worker(cfg.peak_flops_per_worker, cfg.precision, device)
    largest = torch.tensor([peak, params_held(engine.module)], dtype=torch.float64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    # Bits per byte need next-token losses over whole text: not masked-LM losses, not SFT completions only.
    per_byte = spec.objective.kind == "causal" and not meta.loss_mask
    rank0 = per_byte and dist.get_rank() == 0
    shared = [validation_tokens_per_byte(cfg, meta, spec.tokenizer_file, coords.dp_size) if rank0 else None]
    dist.broadcast_object_list(shared, src=0)
    figures = {
        "flops_per_token": flops_per_token(spec.model, seq_len),
        "peak_flops_per_worker": float(largest[0]),
        "peak_flops_source": source,
        "params_per_worker": int(largest[1]),
    }
    return figures, shared[0]


def _global_checksum(checksum: int) -> int:
    """The sample checksums of all ranks combined (a sum mod 2**61 - 1, as each rank's)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, checksum)
    return sum(parts) % (2**61 - 1)
