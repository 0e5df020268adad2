"""Tune search spaces: conversion to Tune/Optuna distributions, dotted params onto a train config, key errors."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray.tune.search.optuna import OptunaSearch

from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.tune.config import SearchDimension
from raylm.tune.search_space import (
    apply_params,
    check_search_space,
    eval_interval_steps,
    max_reports_per_trial,
    to_tune_space,
    trial_train_config,
)

SPACE_YAML = """\
prepare:
  input: x
tune:
  max_steps_per_trial: 20
  num_workers_per_trial: 1
  search_space:
    optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    optimizer.warmup_steps: {type: int, low: 0, high: 5}
    micro_batch_size: {type: choice, values: [4, 8]}
    model.dropout: {type: uniform, low: 0.0, high: 0.2}
"""


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.fixture
def cfg(tmp_path):
    return load_config(write(tmp_path, SPACE_YAML))


def test_search_space_converts_to_optuna_distributions_with_inclusive_int_bounds(cfg):
    optuna_space = OptunaSearch.convert_search_space(to_tune_space(cfg.tune.search_space))
    assert optuna_space == {
        "optimizer.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "optimizer.warmup_steps": IntDistribution(0, 5),
        "micro_batch_size": CategoricalDistribution([4, 8]),
        "model.dropout": FloatDistribution(0.0, 0.2),
    }


def test_tune_domains_sample_within_bounds(cfg):
    domains = to_tune_space(cfg.tune.search_space)
    warmups = {domains["optimizer.warmup_steps"].sample() for _ in range(200)}
    assert warmups == {0, 1, 2, 3, 4, 5}
    lrs = [domains["optimizer.lr"].sample() for _ in range(200)]
    assert 1e-4 <= min(lrs) and max(lrs) <= 1e-2


def test_trial_config_applies_dotted_params_and_tune_overrides(cfg):
    params = {"optimizer.lr": 3e-3, "optimizer.warmup_steps": np.int64(2), "micro_batch_size": 4, "model.dropout": 0.1}
    trial = trial_train_config(cfg.train, cfg.tune, params, output="/tmp/trial")
    assert trial.optimizer.lr == 3e-3
    assert trial.optimizer.warmup_steps == 2 and type(trial.optimizer.warmup_steps) is int
    assert trial.micro_batch_size == 4
    assert trial.model.dropout == 0.1
    assert (trial.max_steps, trial.num_workers, trial.output) == (20, 1, "/tmp/trial")
    assert trial.eval_interval_steps == eval_interval_steps(cfg.tune) == 5  # 4 evenly spaced reports
    assert max_reports_per_trial(cfg.tune) == 5
    # untouched keys come from the run's train config, which itself is unchanged
    assert trial.optimizer.weight_decay == cfg.train.optimizer.weight_decay
    assert cfg.train.optimizer.lr == 1e-3 and cfg.train.max_steps == 100


def test_apply_params_rejects_unknown_key_and_bad_value(cfg):
    with pytest.raises(ConfigError, match=r"optimizer\.lrr"):
        apply_params(cfg.train, {"optimizer.lrr": 1e-3})
    with pytest.raises(ConfigError, match=r"train\.model\.dropout=1\.5"):
        apply_params(cfg.train, {"model.dropout": 1.5})


def test_unknown_search_key_in_yaml_is_a_config_error_naming_the_key(tmp_path):
    text = SPACE_YAML.replace("optimizer.lr:", "optimizer.lrr:")
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:6: tune.search_space:") and "'optimizer.lrr'" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "key, why",
    [
        ("optimizer", "is a section"),
        ("max_steps", "tune.max_steps_per_trial"),
        ("num_workers", "tune.num_workers_per_trial"),
        ("lr", "no such train config key"),
        ("zero_stage.x", "not a section"),
    ],
)
def test_unsearchable_keys_are_rejected_on_load(tmp_path, key, why):
    p = write(tmp_path, f"prepare:\n  input: x\ntune:\n  search_space:\n    {key}: {{type: int, low: 1, high: 4}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert repr(key) in str(e.value) and why in str(e.value)


def test_float_distribution_over_an_int_key_is_rejected(cfg):
    space = {"micro_batch_size": SearchDimension(type="uniform", low=2, high=8)}
    tune = cfg.tune.model_copy(update={"search_space": space})
    with pytest.raises(ConfigError, match=r"tune\.search_space\.micro_batch_size: a uniform dimension"):
        check_search_space(tune, cfg.train)


def test_bound_outside_the_train_key_range_is_rejected(cfg):
    check_search_space(cfg.tune, cfg.train)  # the fixture's space is valid
    space = {"model.dropout": SearchDimension(type="uniform", low=0.0, high=1.0)}
    tune = cfg.tune.model_copy(update={"search_space": space})
    with pytest.raises(ConfigError, match=r"tune\.search_space\.model\.dropout: value 1\.0 is invalid"):
        check_search_space(tune, cfg.train)


def test_int_dimension_needs_whole_bounds():
    with pytest.raises(ValueError, match="whole-number"):
        SearchDimension(type="int", low=0.5, high=4)
