"""Tune leaderboard: ranking trials, the CSV/JSON rows, the sweep plot, the best config (no Ray)."""

from __future__ import annotations

import csv
import json

import pytest

from raylm.config import load_config
from raylm.tune.sweep import TrialRecord, plot_sweep, rank_trials, write_best_config, write_leaderboard


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(f"run: {{workdir: {tmp_path}}}\nprepare: {{input: x}}\ntune: {{max_steps_per_trial: 20}}\n")
    return load_config(p)


def records() -> list[TrialRecord]:
    def rec(trial_id, lr, curve, status="ok", error=None):
        final = curve[-1][1] if curve else None
        return TrialRecord(
            trial_id=trial_id,
            params={"optimizer.lr": lr, "optimizer.warmup_steps": 3},
            status=status,
            steps=curve[-1][0] if curve else 0,
            stopped_early=status == "ok" and (curve[-1][0] if curve else 0) < 20,
            final_val_loss=final,
            best_val_loss=min(v for _, v in curve) if curve else None,
            final_val_ppl=None,
            curve=curve,
            error=error,
        )

    return [
        rec("slow", 1e-4, [(5, 7.9), (10, 7.7)]),
        rec("broken", 5e-3, [], status="error", error="RuntimeError: worker died"),
        rec("best", 3e-3, [(5, 7.5), (10, 7.0), (15, 6.6), (20, 6.5)]),
        rec("good", 1e-3, [(5, 7.6), (10, 7.2), (15, 6.9), (20, 6.8)]),
    ]


def test_trials_rank_by_final_metric_with_errors_last(cfg):
    ranked = rank_trials(records(), cfg.tune)
    assert [r.trial_id for r in ranked] == ["best", "good", "slow", "broken"]
    assert [r.rank for r in ranked] == [1, 2, 3, 4]


def test_leaderboard_files_hold_params_as_columns_and_curves(cfg, tmp_path):
    ranked = rank_trials(records(), cfg.tune)
    write_leaderboard(ranked, cfg.tune, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [r["trial_id"] for r in rows] == ["best", "good", "slow", "broken"]
    assert rows[0]["optimizer.lr"] == "0.003" and rows[0]["optimizer.warmup_steps"] == "3"
    assert rows[2]["stopped_early"] == "True" and rows[2]["steps"] == "10"
    assert rows[3]["status"] == "error" and rows[3]["error"] == "RuntimeError: worker died"
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert board["metric"] == "val_loss" and board["trials"][0]["curve"][-1] == [20, 6.5]


def test_sweep_plot_is_a_png_even_with_failed_trials(cfg, tmp_path):
    plot_sweep(rank_trials(records(), cfg.tune), tmp_path / "sweep.png", "test sweep")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_best_config_is_a_loadable_run_config_with_the_best_params(cfg, tmp_path):
    best = rank_trials(records(), cfg.tune)[0]
    write_best_config(cfg.resolved_yaml(), cfg.train, best, tmp_path / "best_config.yaml")
    loaded = load_config(tmp_path / "best_config.yaml")
    assert loaded.train.optimizer.lr == 3e-3 and loaded.train.optimizer.warmup_steps == 3
    assert loaded.train.max_steps == cfg.train.max_steps and loaded.tune == cfg.tune
