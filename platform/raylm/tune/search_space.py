"""Search spaces: `tune.search_space` as Ray Tune domains, and a trial's dotted params applied to a TrainConfig.

A search space maps dotted train-config keys to distributions:

    search_space:
      optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
      micro_batch_size: {type: choice, values: [8, 16]}

Tune samples a flat dict such as `{"optimizer.lr": 3e-3, "micro_batch_size": 16}` per trial
(OptunaSearch turns the domains into Optuna distributions); `trial_train_config` validates it
onto a copy of the train config, with the per-trial length and worker count set by tune.
Everything here is pure: no Ray cluster is needed.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import ValidationError
from ray import tune

from raylm.errors import ConfigError
from raylm.train.config import TrainConfig
from raylm.tune.config import SearchDimension, TuneConfig, train_field

def _accepts_float(annotation: Any) -> bool:
    if annotation is float:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return float in typing.get_args(annotation)
    return False


def to_tune_space(space: dict[str, SearchDimension]) -> dict[str, Any]:
    """Ray Tune domains keyed by the dotted train keys; OptunaSearch converts them to Optuna distributions."""
    domains: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "loguniform":
            domains[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "uniform":
            domains[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "int":
            # Tune's randint excludes its upper bound; the config's `high` is inclusive.
            domains[key] = tune.randint(int(dim.low), int(dim.high) + 1)
        else:
            domains[key] = tune.choice(list(dim.values))
    return domains


def _plain(value: Any) -> Any:
    """numpy scalars (as samplers may return) -> Python scalars, so configs dump to clean YAML."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def apply_params(train: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """A validated copy of `train` with each dotted key in `params` set; a ConfigError names a bad key or value."""
    data = train.model_dump()
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"tune.search_space.{key}: no such train config key")
        node[leaf] = _plain(value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        dotted = ".".join(str(p) for p in err["loc"])
        given = params.get(dotted, err.get("input"))
        raise ConfigError(f"train.{dotted}={given!r} (from tune): {err['msg']}") from None


def eval_interval_steps(tune: TuneConfig) -> int:
    """Steps between validation passes in a trial: `evals_per_trial` evenly spaced reports for ASHA."""
    return max(1, tune.max_steps_per_trial // tune.evals_per_trial)


def max_reports_per_trial(tune: TuneConfig) -> int:
    """Most reports a full trial makes: one per eval interval plus a final one (ASHA's max_t)."""
    return tune.max_steps_per_trial // eval_interval_steps(tune) + 1


def trial_train_config(train: TrainConfig, tune: TuneConfig, params: dict[str, Any], output: str) -> TrainConfig:
    """The train config of one trial: `params` applied, then tune's length, workers and eval cadence."""
    interval = eval_interval_steps(tune)
    owned = {
        "output": output,
        "max_steps": tune.max_steps_per_trial,
        "num_workers": tune.num_workers_per_trial,
        "eval_interval_steps": interval,
        "log_interval_steps": interval,
        "checkpoint_interval_steps": tune.max_steps_per_trial,  # one checkpoint, at the end: trials are not resumed
    }
    if "train_batch_size" in TrainConfig.model_fields and "train_batch_size" not in params:
        # A global batch pinned for train.num_workers would not match the trial's worker count.
        owned["train_batch_size"] = None
    return apply_params(train, {**params, **owned})


def _probe_values(dim: SearchDimension) -> list[Any]:
    if dim.type == "choice":
        return list(dim.values)
    if dim.type == "int":
        return [int(dim.low), int(dim.high)]
    return [dim.low, dim.high]


def check_search_space(tune: TuneConfig, train: TrainConfig) -> None:
    """Fail before any trial starts if a dimension can sample a value the train config rejects.

    Raises ConfigError naming the key: a float distribution over an integer key, or a bound
    or choice that does not validate (e.g. model.dropout high=1.0 where dropout < 1).
    """
    for key, dim in tune.search_space.items():
        try:
            field = train_field(key)
        except ValueError as e:
            raise ConfigError(f"tune.search_space: {e}") from None
        if dim.type in ("loguniform", "uniform") and not _accepts_float(field.annotation):
            raise ConfigError(f"tune.search_space.{key}: a {dim.type} dimension samples floats; this key needs type int or choice")
        for value in _probe_values(dim):
            try:
                trial_train_config(train, tune, {key: value}, output=train.output)
            except ConfigError as e:
                raise ConfigError(f"tune.search_space.{key}: value {value!r} is invalid: {e}") from None
