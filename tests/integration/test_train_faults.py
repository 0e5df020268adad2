"""Checkpoints that survive failures: a Ray Train worker killed from outside, time-based checkpoints, exporting a
checkpoint without Ray, and checkpoints that are truncated or carry a pickle payload (refused, never unpickled)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raylm.errors import ConfigError, InputError
from raylm.model.artifact import load_model
from raylm.train.ingest import SequenceOrder, sample_checksum
from raylm.train.checkpoint import latest_run_checkpoint, verify_checkpoint
from raylm.train.export import export_checkpoint
from raylm.train.config import TrainConfig
from raylm.train.trainer import build_trainer


MAX_STEPS = 40
CHECKPOINT_STEPS = 8


def _config(tokens, **overrides) -> TrainConfig:
    base = dict(
        data=str(tokens.path), output=str(tokens.path.parent / "unused"), num_workers=2, zero_stage=1,
        micro_batch_size=4, max_steps=MAX_STEPS, log_interval_steps=1, eval_interval_steps=1000, eval_batches=1,
        checkpoint_interval_steps=CHECKPOINT_STEPS, checkpoints_to_keep=3, optimizer={"warmup_steps": 2},
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def _expected_checksum(tokens, steps: int) -> int:
    """Each rank trains on exactly its first `steps` micro-batches of the seeded order."""
    order = SequenceOrder(tokens.num_sequences["train"], micro_batch_size=4, dp_size=2, seed=0)
    total = 0
    for k in range(steps):
        epoch, b = divmod(k, order.batches_per_epoch)
        total += sum(sample_checksum(order.epoch_indices(epoch, rank)[b], epoch) for rank in range(2))
    return total % (2**61 - 1)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for the run (persisted, resumable)."""
    from ray.train import Result
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    for attempt in range(5):
        if not (run_dir / "checkpoint_manager_snapshot.json").exists():
            return []
        try:
            result = Result.from_path(str(run_dir))
            return sorted(json.loads((Path(c.path) / "state.json").read_text())["step"] for c, _ in result.best_checkpoints)
        # The controller rewrites the snapshot (and deletes old checkpoints) meanwhile; Ray Train wraps a
        # snapshot read half-written (an empty file) in CheckpointManagerInitializationError.
        except (ValueError, OSError, CheckpointManagerInitializationError):
            time.sleep(0.05)
    raise RuntimeError(f"{run_dir}: checkpoint snapshot unreadable")


def _complete_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints every rank has finished writing (complete.json), registered by Ray Train or not yet."""
    steps = []
    for marker in run_dir.glob("checkpoint_*/complete.json"):
        try:
            steps.append(json.loads(marker.read_text())["step"])
        except (ValueError, OSError):  # being written
            pass
    return sorted(steps)


def _last_logged_step(tensorboard_dir: Path) -> int:
    """The latest training step rank 0 has logged (it flushes TensorBoard at every log line)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard_dir))
    acc.Reload()
    return max((e.step for e in acc.Scalars("train/loss")), default=0) if "train/loss" in acc.Tags()["scalars"] else 0


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # this Ray's own address: other local Rays may be running on the machine
    address = ray.get_runtime_context().gcs_address
    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    return sorted(a.pid for a in actors)


@pytest.fixture(scope="module")
def tokens(ray_local, make_tokens, tmp_path_factory):
    return make_tokens(tmp_path_factory.mktemp("faults") / "tokens")


@pytest.fixture(scope="module")
def steady(tokens):
    """An uninterrupted run, checkpointed by time only (every 0.5 s): (config, result, storage dir)."""
    cfg = _config(tokens, checkpoint_interval_steps=1000, checkpoint_interval_s=0.5, checkpoints_to_keep=100)
    storage = tokens.path.parent / "steady"
    return cfg, build_trainer(cfg, run_name="steady", storage_path=str(storage)).fit(), storage


@pytest.fixture(scope="module")
def faulted(tokens):
    """The same run with a worker SIGKILLed after its first checkpoint: (config, result, facts at the kill, storage)."""
    cfg = _config(tokens, max_failures=1)
    storage = tokens.path.parent / "faulted"
    run_dir = storage / "faulted"
    trainer = build_trainer(cfg, run_name="faulted", storage_path=str(storage))
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not _checkpoint_steps(run_dir) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    first = _checkpoint_steps(run_dir)
    assert first, "no checkpoint was persisted before the run ended"
    pids = _train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)  # a real worker process, killed from outside
    kill = {
        "first_checkpoint": first[-1],
        "checkpoint_at_kill": _checkpoint_steps(run_dir)[-1],  # registered by Ray Train
        "complete_at_kill": max(_complete_steps(run_dir), default=0),  # every rank's files written; maybe not registered yet
        "logged_step_at_kill": _last_logged_step(run_dir / "tensorboard"),
        "pid": pids[-1],
    }
    thread.join(timeout=600)
    assert "result" in outcome, "the run did not finish after the restart"
    return cfg, outcome["result"], kill, storage


def test_a_killed_worker_restarts_and_the_run_continues_from_the_latest_checkpoint(faulted, steady, tokens):
    cfg, result, kill, _ = faulted
    metrics = result.metrics
    assert metrics["step"] == MAX_STEPS
    resumed = metrics["start_step"]
    assert resumed >= kill["first_checkpoint"] > 0  # resumed, from a checkpoint persisted before the kill
    # the latest complete one, even when Ray Train had not registered it yet (it polls its workers every 2 s)
    assert resumed >= max(kill["complete_at_kill"], kill["checkpoint_at_kill"])
    assert resumed % CHECKPOINT_STEPS == 0
    assert kill["logged_step_at_kill"] >= resumed  # the kill came after that checkpoint's step
    assert kill["logged_step_at_kill"] - resumed <= CHECKPOINT_STEPS  # steps lost: at most one interval
    assert kill["pid"] not in _train_worker_pids()
    # every sample trained exactly once over both attempts, as in the uninterrupted run
    assert metrics["sample_checksum"] == steady[1].metrics["sample_checksum"] == _expected_checksum(tokens, MAX_STEPS)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["val_loss"])
    assert metrics["loss"] == pytest.approx(steady[1].metrics["loss"], rel=1e-3)
    assert metrics["val_loss"] == pytest.approx(steady[1].metrics["val_loss"], rel=1e-3)


def test_a_killed_worker_resumes_from_its_checkpoint_on_s3(tokens, steady, s3_bucket):
    """Ray Train's storage on the S3 server: the restarted workers resume from the checkpoint there, and the run
    ends where the uninterrupted one does."""
    from raylm import storage

    cfg = _config(tokens, max_failures=1)
    run_dir = f"{s3_bucket}/faults/faulted-s3"
    trainer = build_trainer(cfg, run_name="faulted-s3", storage_path=f"{s3_bucket}/faults")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()

    def complete_steps() -> list[int]:
        markers = [f.name for f in storage.list_files(run_dir) if f.name.endswith("/complete.json")]
        return sorted(json.loads(storage.read_text(f"{run_dir}/{m}"))["step"] for m in markers)

    deadline = time.monotonic() + 300
    while not complete_steps() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    first = complete_steps()
    assert first, "no checkpoint reached S3 before the run ended"
    pids = _train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert "result" in outcome, "the run did not finish after the restart"
    metrics = outcome["result"].metrics
    assert metrics["step"] == MAX_STEPS and metrics["start_step"] >= first[0] > 0
    assert metrics["sample_checksum"] == steady[1].metrics["sample_checksum"]
    assert metrics["loss"] == pytest.approx(steady[1].metrics["loss"], rel=1e-3)
    assert metrics["val_loss"] == pytest.approx(steady[1].metrics["val_loss"], rel=1e-3)


def test_time_based_checkpoints_are_taken_between_step_intervals(steady):
    cfg, result, storage = steady
    steps = _checkpoint_steps(storage / "steady")
    assert steps[-1] == MAX_STEPS
    intermediate = [s for s in steps if s < MAX_STEPS]
    assert intermediate  # checkpoint_interval_steps=1000: only the clock can have asked for these
    elapsed = sorted(m["elapsed_s"] for _, m in result.best_checkpoints if m["step"] < MAX_STEPS)
    assert all(b - a >= cfg.checkpoint_interval_s for a, b in zip(elapsed, elapsed[1:]))


def test_export_of_a_checkpoint_without_ray_matches_the_trained_engines_export(faulted, tmp_path):
    """`raylm export` on the final checkpoint writes the weights the workers exported from the live engine."""
    from raylm.cli import main

    _, result, _, _ = faulted
    final = Path(result.checkpoint.path)
    model = export_checkpoint(final, tmp_path / "fp32")
    engine_export = load_file(str(final / "model" / "model.safetensors"))
    exported = load_file(str(model / "model.safetensors"))
    assert set(exported) == set(engine_export)
    for name, value in engine_export.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0)
    assert load_model(model).meta["trained_steps"] == MAX_STEPS

    assert main(["export", "--checkpoint", str(final), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    half = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.6 * (model / "model.safetensors").stat().st_size
    probe = load_file(str(final / "export_probe.safetensors"))
    with torch.no_grad():
        logits, _ = load_model(tmp_path / "bf16").model(probe["input_ids"])
    assert (logits - probe["logits"]).abs().max() < 0.1  # bf16 weights: close to the trained engine, not equal


@pytest.mark.parametrize("zero_stage,precision", [(0, "bf16")])  # ZeRO 3 fp32: tests/integration/test_train.py
def test_export_consolidates_every_zero_stage(tokens, tmp_path, zero_stage, precision):
    """ZeRO 0 keeps whole weights (bf16: an fp32 master in the optimizer state)."""
    cfg = _config(tokens, zero_stage=zero_stage, precision=precision, max_steps=3)
    result = build_trainer(cfg, run_name=f"z{zero_stage}", storage_path=str(tmp_path / "runs")).fit()
    final = Path(result.checkpoint.path)
    exported = load_file(str(export_checkpoint(final, tmp_path / "model") / "model.safetensors"))
    engine_export = load_file(str(final / "model" / "model.safetensors"))
    for name, value in engine_export.items():
        if precision == "bf16":  # the engine's export takes its bf16 weights; the checkpoint's fp32 masters round to them
            torch.testing.assert_close(exported[name].to(torch.bfloat16).float(), value.to(torch.bfloat16).float(),
                                       rtol=0, atol=0)  # fmt: skip
        else:
            torch.testing.assert_close(exported[name], value, rtol=0, atol=0)


def _copy_run(steady, dest: Path) -> tuple[TrainConfig, Path, Path]:
    """A copy of the steady run's storage, and its latest checkpoint's DeepSpeed tag directory."""
    cfg, _, storage = steady
    shutil.copytree(storage, dest)
    checkpoint = latest_run_checkpoint(dest / "steady")
    tag = (checkpoint / "deepspeed" / "latest").read_text().strip()
    return cfg, dest, checkpoint / "deepspeed" / tag


class _Payload:
    """Unpickling this object creates a directory: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_nothing_runs(steady, tmp_path):
    cfg, storage, tag_dir = _copy_run(steady, tmp_path / "runs")
    target = tag_dir / "mp_rank_00_model_states.pt"
    marker = tmp_path / "payload-ran"
    torch.save({"module": {}, "step": _Payload(marker)}, target)
    # the payload is live: a plain torch.load, as DeepSpeed's weights_only=False does, runs it
    shutil.copyfile(target, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()
    marker.rmdir()

    with pytest.raises(InputError) as e:
        build_trainer(cfg, run_name="steady", storage_path=str(storage))  # resuming reads the latest checkpoint
    assert str(target) in str(e.value) and "refused to load" in str(e.value) and "mkdir" in str(e.value)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_refused_naming_its_file(steady, tmp_path):
    cfg, storage, tag_dir = _copy_run(steady, tmp_path / "runs")
    target = sorted(tag_dir.glob("*optim_states.pt"))[-1]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"unreadable checkpoint file, truncated or corrupt") as e:
        build_trainer(cfg, run_name="steady", storage_path=str(storage))
    assert str(target) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match=str(target)):
        verify_checkpoint(target.parent.parent.parent)


def test_a_model_too_large_for_the_memory_limit_is_refused_before_any_worker_starts(tokens, tmp_path):
    cfg = _config(tokens, model={"preset": "1b"}, zero_stage=1, memory_per_worker_gb=12.0)
    with pytest.raises(ConfigError) as e:
        build_trainer(cfg, run_name="big", storage_path=str(tmp_path / "big"))
    assert "estimated memory per worker" in str(e.value) and "exceeds 12.00 GiB (train.memory_per_worker_gb=12.0)" in str(e.value)
    assert "would fit: zero_stage=3" in str(e.value)
    assert not (tmp_path / "big").exists()
