"""The tune stage: a Ray Tune sweep over train hyperparameters, each trial a short Ray Train + DeepSpeed run.

OptunaSearch (TPE) proposes the next trial's params from the finished ones; ASHA stops trials
whose validation loss trails the others at the same number of reports. Each Tune trial is a
small driver function that fits one `TorchTrainer` (built by `raylm.train.trainer.build_trainer`)
and relays the workers' reports to Tune with `TuneReportCallback` (Ray Train V2's way to
tune: `Tuner(trainer)` is deprecated).

    <tune.output>/leaderboard.json     every trial: params, final/best val_loss, val_ppl, steps, stopped early
    <tune.output>/leaderboard.csv      the same, one row per trial, best first
    <tune.output>/best_config.yaml     the run config with the best params in `train:`;
                                       `raylm train --config best_config.yaml` trains with them
    <tune.output>/sweep.png            validation loss against step, one line per trial
    <tune.output>/ray/                 Ray Tune's experiment (results, searcher and scheduler state)
    <tune.output>/trials/trial-<id>/   each trial's Ray Train storage (checkpoints, TensorBoard)
    <tune.output>/manifest.json
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console
from rich.table import Table

from raylm import storage
from raylm.artifacts import stage_output
from raylm.context import RunContext
from raylm.errors import ConfigError, RaylmError
from raylm.tokenize.shards import read_token_meta
from raylm.train.config import TrainConfig
from raylm.train.trainer import build_trainer
from raylm.tune.config import TuneConfig, TuneJob
from raylm.tune.search_space import (
    apply_params,
    check_search_space,
    max_reports_per_trial,
    to_tune_space,
    trial_train_config,
)

TUNE_DIR = "ray"
TRIALS_DIR = "trials"
EXPERIMENT = "sweep"
# A Tune trial only drives its Ray Train run (the workers hold the real CPUs). Tune needs a non-zero
# request to place it: it asks for the memory of a Python process, not a sliver of a CPU, which would
# leave a host whose CPUs fit its share of trial workers exactly one CPU short for them (a sweep of
# 1-CPU workers on 1-CPU hosts waited forever that way).
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}


@dataclass
class TrialRecord:
    """One trial as the leaderboard shows it; `curve` is its (step, val_loss) reports."""

    trial_id: str
    params: dict[str, Any]
    status: str  # "ok" (ran to the end or stopped by ASHA) or "error"
    steps: int = 0
    stopped_early: bool = False
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    final_val_ppl: float | None = None
    seconds: float | None = None
    checkpoint: str | None = None  # the final checkpoint (with the exported model), relative to tune.output
    error: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None


# ---------------------------------------------------------------- the trial: runs inside a Tune trial actor


def _fit_trial(train_cfg: TrainConfig, run_name: str, storage_path: str, seed: int, callback) -> None:
    """Build and fit one trial's TorchTrainer (a Ray task started by the trial driver)."""
    build_trainer(train_cfg, run_name=run_name, storage_path=storage_path, seed=seed, callbacks=[callback]).fit()


def _trial_driver(params: dict, *, train: TrainConfig, tune_cfg: TuneConfig, seed: int, storage_path: str,
                  settings: dict[str, str]) -> None:
    """A Tune trial: the trial's train config, fitted by Ray Train, its reports relayed to Tune.

    `settings`: the object-store settings of the sweep's driver (storage.settings_for), taken there: on another
    node this actor's own environment need not have them.
    """
    run_name = f"trial-{tune.get_context().get_trial_id()}"
    train_cfg = trial_train_config(train, tune_cfg, params, output=storage.join(storage_path, run_name))
    # The fit runs in a task that carries this cluster's address in RAY_ADDRESS, inherited by the
    # Train controller and its placement-group cleaner: when ASHA stops this trial, its actor dies,
    # and the cleaner (a detached actor using the state API) must reach *this* cluster to release
    # the workers' CPUs. Without the address it may pick another Ray on the machine and leak them.
    # It also carries the storage settings when the data or the trials' storage is on an object store.
    fit = ray.remote(num_cpus=0, max_retries=0)(_fit_trial).options(
        runtime_env={"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, **settings}}
    )
    ray.get(fit.remote(train_cfg, run_name, storage_path, seed, TuneReportCallback()))


# ---------------------------------------------------------------- the sweep


def _searcher(tune_cfg: TuneConfig, seed: int):
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune_cfg.tpe_startup_trials)
    return OptunaSearch(sampler=sampler)  # metric and mode come from the TuneConfig


def _scheduler(tune_cfg: TuneConfig):
    # Time is counted in reports (one per validation pass), so grace_period is "reports before a stop".
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_reports_per_trial(tune_cfg),
        grace_period=tune_cfg.grace_period,
        reduction_factor=tune_cfg.reduction_factor,
    )


def _run_trials(train: TrainConfig, tune_cfg: TuneConfig, seed: int, root: str, name: str):
    """Run the sweep with Ray Tune; returns its ResultGrid."""
    driver = tune.with_parameters(
        _trial_driver, train=train, tune_cfg=tune_cfg, seed=seed, storage_path=storage.join(root, TRIALS_DIR),
        settings=storage.settings_for(train.data, root),
    )
    tuner = tune.Tuner(
        tune.with_resources(driver, TRIAL_DRIVER_RESOURCES),
        param_space=to_tune_space(tune_cfg.search_space),
        tune_config=tune.TuneConfig(
            metric=tune_cfg.metric,
            mode=tune_cfg.mode,
            search_alg=_searcher(tune_cfg, seed),
            scheduler=_scheduler(tune_cfg),
            num_samples=tune_cfg.num_samples,
            # The Train workers, not the trial drivers, hold the CPUs: cap the runs in flight.
            max_concurrent_trials=tune_cfg.max_concurrent_trials,
            trial_name_creator=lambda trial: f"{name}-{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            **storage.run_config_storage(storage.join(root, TUNE_DIR)),
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    return tuner.fit()


def _wait_for_released_placement_groups(before: set[str], timeout_s: float = 30.0) -> None:
    """Wait until placement groups made during the sweep are gone, so the next stage finds its CPUs free.

    A trial stopped by ASHA dies with its Train controller; Ray Train's cleaner removes the
    workers' placement group a moment later.
    """
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        table = ray.util.placement_group_table()
        if all(pg["state"] == "REMOVED" for pg_id, pg in table.items() if pg_id not in before):
            return
        time.sleep(0.5)


# ---------------------------------------------------------------- results


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _record(result, tune_cfg: TuneConfig, root: str) -> TrialRecord:
    """A leaderboard record from one Tune Result of a sweep written under `root`."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name.removeprefix("trial-")
    params = {k: result.config[k] for k in tune_cfg.search_space if k in (result.config or {})}
    record = TrialRecord(trial_id=trial_id, params=params, status="error" if result.error else "ok")
    if result.error:
        record.error = _first_line(result.error)
    df = result.metrics_dataframe
    if df is not None and "val_loss" in df and "step" in df:
        reports = df.dropna(subset=["val_loss", "step"])
        record.curve = [(int(s), float(v)) for s, v in zip(reports["step"], reports["val_loss"])]
    if record.curve:
        record.steps = record.curve[-1][0]
        record.final_val_loss = _finite(record.curve[-1][1])
        losses = [v for _, v in record.curve if math.isfinite(v)]
        record.best_val_loss = min(losses) if losses else None
        record.final_val_ppl = _finite(metrics.get("val_ppl"))
        record.seconds = _finite(metrics.get("time_total_s"))
        checkpoint = metrics.get("checkpoint_path")
        if checkpoint and record.steps >= tune_cfg.max_steps_per_trial:
            inside = storage.filesystem(root)[1]  # Ray Train names checkpoints by their path in the store
            record.checkpoint = os.path.relpath(checkpoint, inside) if checkpoint.startswith(inside) else checkpoint
    record.stopped_early = record.status == "ok" and record.steps < tune_cfg.max_steps_per_trial
    return record


def _score(record: TrialRecord, tune_cfg: TuneConfig) -> float | None:
    """The final value of the ranking metric (lower is better after the sign flip for mode=max)."""
    value = record.final_val_loss if tune_cfg.metric == "val_loss" else record.final_val_ppl
    if value is None or record.status != "ok":
        return None
    return value if tune_cfg.mode == "min" else -value


def rank_trials(records: list[TrialRecord], tune_cfg: TuneConfig) -> list[TrialRecord]:
    """Best first by the final metric; trials without one (errors, no report) last. Sets `rank`."""
    ranked = sorted(records, key=lambda r: (_score(r, tune_cfg) is None, _score(r, tune_cfg) or 0.0, r.trial_id))
    for i, r in enumerate(ranked, start=1):
        r.rank = i
    return ranked


def _row(record: TrialRecord, keys: list[str]) -> dict:
    row = {k: v for k, v in asdict(record).items() if k not in ("params", "curve")}
    return {**row, **{k: record.params.get(k) for k in keys}}


def write_leaderboard(records: list[TrialRecord], tune_cfg: TuneConfig, directory: Path) -> None:
    """leaderboard.json (records with their curves) and leaderboard.csv (one row per trial, params as columns)."""
    keys = list(tune_cfg.search_space)
    doc = {
        "metric": tune_cfg.metric,
        "mode": tune_cfg.mode,
        "max_steps_per_trial": tune_cfg.max_steps_per_trial,
        "trials": [asdict(r) for r in records],
    }
    (directory / "leaderboard.json").write_text(json.dumps(doc, indent=2))
    columns = ["rank", "trial_id", "status", "stopped_early", "steps", "final_val_loss", "best_val_loss",
               "final_val_ppl", "seconds", *keys, "checkpoint", "error"]  # fmt: skip
    with open(directory / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow(_row(r, keys))


def _short_params(params: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k, v in params.items())  # fmt: skip


def plot_sweep(records: list[TrialRecord], path: Path, title: str) -> None:
    """Validation loss against step, one line per trial; dashed with an x where ASHA stopped it."""
    import matplotlib  # a second of imports, for the one picture: not at module import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in records:
        if not r.curve:
            continue
        steps, losses = zip(*r.curve)
        style = "--" if r.stopped_early else "-"
        (line,) = ax.plot(steps, losses, style, marker="o", markersize=3, label=f"#{r.rank} {r.trial_id}: {_short_params(r.params)}")
        if r.stopped_early:
            ax.plot(steps[-1], losses[-1], "x", color=line.get_color(), markersize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_best_config(config_yaml: str, train: TrainConfig, best: TrialRecord, path: Path) -> None:
    """The run config `config_yaml` (resolved YAML; "": none) with the best trial's params applied to `train:`
    (full length, all workers): a config `raylm train` runs as it is."""
    best_train = apply_params(train, best.params)
    run_config = yaml.safe_load(config_yaml) if config_yaml else {}
    run_config["train"] = json.loads(best_train.model_dump_json())
    header = (
        f"# raylm run config: the sweep's best trial ({best.trial_id}, val_loss {best.final_val_loss:.4f}"
        f" after {best.steps} steps) applied to train:\n"
        f"#   {_short_params(best.params)}\n"
        f"# Train with it: raylm train --config {path.name} (add --train.output=... to keep an earlier run)\n"
    )
    path.write_text(header + yaml.safe_dump(run_config, sort_keys=False))


def _print_leaderboard(records: list[TrialRecord], tune_cfg: TuneConfig) -> None:
    table = Table(title=f"tune: {len(records)} trials, ranked by final {tune_cfg.metric}")
    for col in ("#", "trial", *(k.rsplit(".", 1)[-1] for k in tune_cfg.search_space), "steps", "val_loss", "val_ppl", "status"):
        table.add_column(col)
    for r in records:
        status = r.error or ("stopped by ASHA" if r.stopped_early else "completed")
        fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
        table.add_row(str(r.rank), r.trial_id, *(fmt(r.params.get(k)) for k in tune_cfg.search_space),
                      str(r.steps), fmt(r.final_val_loss), fmt(r.final_val_ppl), status)  # fmt: skip
    Console().print(table)


# ---------------------------------------------------------------- the stage


def stage_config(job: TuneJob, seed: int) -> dict:
    """What the tune manifest fingerprints: the tune and train sections and the seed."""
    return {
        "tune": json.loads(job.tune.model_dump_json()),
        "train": json.loads(job.train.model_dump_json()),
        "seed": seed,
    }


def run_tune(job: TuneJob, ctx: RunContext) -> dict:
    """The tune stage: sweep `job.tune.search_space` over `job.train`, write the leaderboard and best config.

    Returns a summary: output, best trial, its params and val_loss, trial counts, paths of the files.
    """
    tune_cfg, train = job.tune, job.train
    check_search_space(tune_cfg, train)
    if tune_cfg.grace_period >= max_reports_per_trial(tune_cfg):
        raise ConfigError(
            f"tune.grace_period: {tune_cfg.grace_period} reports leaves ASHA nothing to stop"
            f" (a trial makes at most {max_reports_per_trial(tune_cfg)}); lower it or raise tune.evals_per_trial"
        )
    read_token_meta(train.data)  # a missing or unfinished tokenize output fails here, before any trial

    with stage_output(tune_cfg.output, "tune", stage_config(job, ctx.seed), [train.data], ctx.overwrite) as out:
        if out.done:
            return {**out.manifest.get("stats", {}), "output": out.path}
        root = out.tmp
        started = time.time()
        pgs_before = set(ray.util.placement_group_table())
        grid = _run_trials(train, tune_cfg, ctx.seed, root, ctx.name)
        _wait_for_released_placement_groups(pgs_before)
        records = rank_trials([_record(result, tune_cfg, root) for result in grid], tune_cfg)
        best = records[0] if records and _score(records[0], tune_cfg) is not None else None
        if best is None:
            first = next((r.error for r in records if r.error), "no trial reported a validation loss")
            raise RaylmError(f"tune: none of {len(records)} trials finished a validation pass; first error: {first}")

        stopped = sum(r.stopped_early for r in records)
        title = f"{ctx.name}: {len(records)} trials, {stopped} stopped early by ASHA"
        with storage.local_dir(root) as local:  # on an object store: written locally, then uploaded
            write_leaderboard(records, tune_cfg, local)
            plot_sweep(records, local / "sweep.png", title)
            write_best_config(ctx.config_yaml, train, best, local / "best_config.yaml")
        _print_leaderboard(records, tune_cfg)
        summary = {
            "output": out.path,
            "best_trial": best.trial_id,
            "best_params": best.params,
            "best_val_loss": best.final_val_loss,
            "best_val_ppl": best.final_val_ppl,
            "best_checkpoint": best.checkpoint and storage.join(out.path, best.checkpoint),
            "num_trials": len(records),
            "num_stopped_early": stopped,
            "num_errors": sum(r.status == "error" for r in records),
            "seconds": round(time.time() - started, 1),
            "leaderboard": storage.join(out.path, "leaderboard.csv"),
            "best_config": storage.join(out.path, "best_config.yaml"),
            "sweep_plot": storage.join(out.path, "sweep.png"),
        }
        out.stats = summary
    return summary
