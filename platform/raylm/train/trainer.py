"""The train stage's driver: a Ray Train TorchTrainer whose workers run the DeepSpeed loop in loop.py.

    trainer = build_trainer(cfg.train, run_name="demo", storage_path="/abs/runs/demo/train.ray")
    result = trainer.fit()          # result.metrics: step, loss, val_loss, val_ppl, lr, tokens_per_s, ...

`run_train(cfg.train, ctx)` is the stage: it fits into a stable Ray storage directory beside the output
(`<train.output>.ray/<fingerprint>/<run.name>`), so a run that was killed resumes from its
latest checkpoint when started again with the same config, then writes the finished output
atomically:

    <train.output>/model/              exported raylm-gpt model (fp32 safetensors, tokenizer, config)
    <train.output>/metrics.json        summary, final reported metrics, the full metrics history
    <train.output>/loss_curve.png      training and validation loss against step
    <train.output>/ray/<run.name>/     Ray Train storage: DeepSpeed checkpoints, TensorBoard events
    <train.output>/manifest.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import time
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load_file

from raylm.artifacts import StageOutput, stage_output
from raylm.context import RunContext
from raylm.errors import ConfigError, InputError
from raylm.model.config import GPTConfig
from raylm.storage import (
    absolute, copy_tree, filesystem, is_uri, join, local_file, remove,
    run_config_storage,
)
from raylm.tokenize.shards import TokenMeta, read_token_meta
from raylm.train.checkpoint import STATE_FILE, latest_run_checkpoint, verify_checkpoint
from raylm.train.config import TrainConfig
from raylm.train.deepspeed_config import deepspeed_config
from raylm.train.export import MODEL_DIR, PROBE_FILE, export_check
from raylm.train.finetune import init_model_config, prepare_finetune
from raylm.train.loop import LossHook, LoopSpec, train_loop_per_worker
from raylm.train.memory import check_memory
from raylm.train.metrics import RUN_FIGURES, TRAIN_FIGURES, plot_loss_curve
from raylm.train.objectives import build_objective
from raylm.train.pipeline_parallel import check_pipeline, check_spread_possible
from raylm.train.worker_runtime import worker_runtime_env

RAY_DIR = "ray"


def model_config(train_cfg: TrainConfig, meta: TokenMeta, section: str = "train") -> GPTConfig:
    """The GPTConfig of `train_cfg.model`, sized to the token data's vocabulary and sequence length.

    With train.init_from, the base model's config (train.model may only change dropout).
    """
    if train_cfg.init_from:
        return init_model_config(train_cfg, meta, section)[0]
    try:
        gpt = train_cfg.model.gpt_config(vocab_size=meta.vocab_size, block_size=meta.seq_len)
    except ValueError as e:
        raise ConfigError(f"{section}.model: {e}") from None
    if train_cfg.objective == "masked":  # a masked-LM encoder sees the whole sequence
        gpt = dataclasses.replace(gpt, attention="bidirectional")
    return gpt


def _check_data(train_cfg: TrainConfig, meta: TokenMeta, gpt: GPTConfig) -> None:
    """Fail on the driver, naming the path, when the data cannot feed every worker or the model."""
    # Each data-parallel rank reads its own share; the stages of one pipeline share theirs.
    dp = train_cfg.data_parallel_size
    need_train = train_cfg.micro_batch_size * dp
    have = meta.num_sequences.get("train", 0)
    if have < need_train:
        raise InputError(
            f"{meta.split_dir('train')}: {have} sequences, need at least micro_batch_size x data-parallel size = {need_train}"
        )
    if meta.num_sequences.get("validation", 0) < dp:
        raise InputError(
            f"{meta.split_dir('validation')}: {meta.num_sequences.get('validation', 0)} sequences,"
            f" need at least one per data-parallel rank ({dp})"
        )
    if gpt.block_size < meta.seq_len:
        raise InputError(
            f"{meta.location}: sequences of {meta.seq_len} tokens (tokenize.seq_len) exceed the model's context of "
            f"{gpt.block_size} (model.block_size); tokenize with a seq_len of at most {gpt.block_size} or widen the context"
        )
    if gpt.vocab_size < meta.vocab_size:
        raise InputError(f"{meta.location}: vocab_size {meta.vocab_size} exceeds the model's vocab_size {gpt.vocab_size}")


def build_trainer(
    train_cfg: TrainConfig,
    *,
    run_name: str,
    storage_path: str,
    seed: int = 0,
    callbacks: list = (),
    model: GPTConfig | None = None,
    loss_hook: LossHook | None = None,
    export_extra: dict | None = None,
    section: str = "train",
    reads: list[str] = (),
):
    """A TorchTrainer training `train_cfg` with DeepSpeed; `fit()` it to run.

    Workers report `step, loss, val_loss, val_ppl, val_bpb, lr, grad_norm, tokens_per_s, mfu, step_time_s`
    and its parts, `peak_rss_mb, params_per_worker, peak_flops_per_worker, elapsed_s` at every evaluation and at the end, with a checkpoint at checkpoint steps and at the end
    (the final one holds the exported model in `model/`). Re-fitting with the same
    `storage_path` and `run_name` resumes from the latest checkpoint.

    model: the GPTConfig to train (default: `train_cfg.model` sized to the token data).
    loss_hook: the training loss (default: cross-entropy); distillation passes its own.
    export_extra: extra keys for the exported model's config.json.
    section: config section named in errors ("train", "distill").
    reads: other locations the workers read (a distillation teacher), for their storage settings.
    """
    meta = read_token_meta(train_cfg.data)
    # workers run in other directories: they get the absolute path
    train_cfg = train_cfg.model_copy(update={"data": absolute(train_cfg.data)})
    gpt = model or model_config(train_cfg, meta, section)
    train_cfg, export_extra = prepare_finetune(train_cfg, meta, gpt, export_extra, section)  # init_from, LoRA, SFT
    check_pipeline(train_cfg, gpt, section, distill=loss_hook is not None)
    check_spread_possible(train_cfg, section)
    _check_data(train_cfg, meta, gpt)
    check_memory(train_cfg, gpt, meta.seq_len, section)  # a model too large for the workers: refused here
    storage_path = absolute(storage_path)
    if not is_uri(storage_path):
        # The checkpoint this run would resume from: a truncated or tampered one fails here, naming its file.
        resume_from = latest_run_checkpoint(Path(storage_path) / run_name)
        if resume_from is not None:
            verify_checkpoint(resume_from)
    tensorboard_dir = join(storage_path, run_name, "tensorboard") if train_cfg.tensorboard else None
    spec = LoopSpec(
        train=train_cfg,
        model=gpt.to_dict(),
        deepspeed=deepspeed_config(train_cfg, data_parallel_size=train_cfg.data_parallel_size, section=section),
        tokenizer_file=str(meta.tokenizer_file.resolve()),
        eos_token_id=meta.eos_token_id,
        run_name=run_name,
        seed=seed,
        tensorboard_dir=tensorboard_dir,
        loss_hook=loss_hook,
        export_extra=dict(export_extra or {}),
        objective=build_objective(train_cfg, meta, seed, section),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if train_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=train_cfg.use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker},
            # Ray Train V2 numbers world ranks grouped by node, and stage s holds ranks [s * dp, (s + 1) * dp):
            # spreading the workers over as many nodes as there are stages gives each stage its own node.
            placement_strategy="SPREAD" if train_cfg.pipeline_placement == "spread" else "PACK",
        ),
        run_config=RunConfig(
            name=run_name,
            **run_config_storage(storage_path),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train_cfg.checkpoints_to_keep),
            callbacks=list(callbacks),
            # the workers also write to the run's storage themselves (rank 0's TensorBoard events)
            worker_runtime_env=worker_runtime_env(train_cfg, [*reads, storage_path]),
        ),
    )


def ray_storage(output: str | os.PathLike, fingerprint: str) -> str:
    """Where a stage's Ray Train run lives until it finishes: stable across restarts of the same config."""
    return join(f"{absolute(output)}.ray", fingerprint)


def fit_to_output(
    trainer, out: StageOutput, *, run_storage: str, run_name: str, title: str, extra: dict | None = None
) -> dict:
    """Fit, then fill the output with the model, metrics and loss curve; move the Ray storage in.

    Works on a disk and on an object store alike. Returns the summary (final figures and output
    paths, plus `extra`), also written to metrics.json.
    """
    started = time.time()
    result = trainer.fit()
    seconds = time.time() - started
    if result.checkpoint is None:
        raise RuntimeError(f"{join(run_storage, run_name)}: the run reported no checkpoint")
    with result.checkpoint.as_directory() as d:  # an object store's checkpoint is downloaded here
        checkpoint = Path(d)
        copy_tree(str(checkpoint / MODEL_DIR), out.file(MODEL_DIR))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        model_meta = json.loads((checkpoint / MODEL_DIR / "config.json").read_text())
        export_diff = export_check(checkpoint / MODEL_DIR, load_file(str(checkpoint / PROBE_FILE)))
    final = dict(result.metrics)
    in_storage = posixpath.relpath(result.checkpoint.path, filesystem(run_storage)[1])
    summary = {
        "output": out.path,
        "model": join(out.path, MODEL_DIR),
        "metrics": join(out.path, "metrics.json"),
        "loss_curve": join(out.path, "loss_curve.png"),
        "checkpoint": join(out.path, RAY_DIR, in_storage),
        "steps": int(final["step"]),
        "loss": final["loss"],
        "val_loss": final["val_loss"],
        "val_ppl": final["val_ppl"],
        "tokens_per_s": final["tokens_per_s"],
        "step_time_s": final.get("step_time_s"),
        # the last window's figures (raylm.train.metrics.TRAIN_FIGURES) and the run's own
        **{k: final[k] for k in (*TRAIN_FIGURES, *RUN_FIGURES, "val_bpb") if k in final},
        "seconds": round(seconds, 1),
        "num_params": model_meta["num_params"],
        "export_max_abs_diff": export_diff,
        "resumed_from_step": final.get("start_step", 0),
        # where the ranks ran: each rank's node address; pipeline runs: the Ray node ids of each stage's workers
        **({"worker_nodes": final["worker_nodes"]} if "worker_nodes" in final else {}),
        **({"pipeline_stage_nodes": final["pipeline_stage_nodes"]} if "pipeline_stage_nodes" in final else {}),
        **(extra or {}),
    }
    history = state["history"]
    out.write_json("metrics.json", {"summary": summary, "final": final, "history": history})
    with local_file(out.file("loss_curve.png")) as png:
        plot_loss_curve(history, png, title)
    # The run is finished: its checkpoints move into the output; the resumable copy beside it goes.
    if is_uri(run_storage):  # no rename on an object store: a copy (server-side), then the original goes
        copy_tree(join(run_storage, run_name), out.file(RAY_DIR, run_name))
        remove(run_storage)
        return summary
    shutil.move(join(run_storage, run_name), out.file(RAY_DIR, run_name))
    shutil.rmtree(run_storage, ignore_errors=True)
    try:
        os.rmdir(os.path.dirname(run_storage))  # <output>.ray, when no other config's run is waiting there
    except OSError:
        pass
    return summary


def stage_config(section_cfg, seed: int) -> dict:
    """What a stage's manifest fingerprints: its section plus the seed (a new seed is a new run)."""
    return {**json.loads(section_cfg.model_dump_json()), "seed": seed}


def run_train(tc: TrainConfig, ctx: RunContext) -> dict:
    """The train stage: fit `tc` on its token data, export `<train.output>/model`, return a summary."""
    inputs = [tc.data, *([tc.init_from] if tc.init_from else [])]  # a retrained base is a new run
    with stage_output(tc.output, "train", stage_config(tc, ctx.seed), inputs, ctx.overwrite) as out:
        if out.done:
            return {**out.manifest.get("stats", {}), "output": out.path}
        run_storage = ray_storage(tc.output, out.manifest["fingerprint"])
        trainer = build_trainer(tc, run_name=ctx.name, storage_path=run_storage, seed=ctx.seed)
        m = tc.model
        title = f"{ctx.name}: preset {m.preset}, {tc.num_workers} workers, ZeRO {tc.zero_stage}, {tc.precision}"
        if tc.pipeline_stages > 1:
            title += f", {tc.pipeline_stages} pipeline stages x {tc.data_parallel_size} data-parallel"
        summary = fit_to_output(trainer, out, run_storage=run_storage, run_name=ctx.name, title=title)
        out.stats = summary
    return summary
