"""Config of the tune stage: a Bayesian (TPE) search with ASHA early stopping, over dotted train config keys."""

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from raylm.configbase import ConfigSection
from raylm.train.config import TrainConfig


class SearchDimension(ConfigSection):
    type: Literal["loguniform", "uniform", "int", "choice"]
    """loguniform/uniform: a float in [low, high]; int: a whole number in [low, high]; choice: one of `values`."""
    low: float | None = None
    high: float | None = None
    values: tuple[float | int | str, ...] | None = None

    @model_validator(mode="after")
    def _bounds(self):
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice dimension needs `values`")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError(f"a {self.type} dimension needs low < high")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform dimension needs low > 0")
        elif self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int dimension needs whole-number low and high")
        return self


# Train keys the tune stage sets for every trial, and the tune key that controls each instead.
TUNE_OWNED_KEYS = {
    "data": "train.data",
    "output": "tune.output",
    "max_steps": "tune.max_steps_per_trial",
    "num_workers": "tune.num_workers_per_trial",
    "eval_interval_steps": "tune.evals_per_trial",
}


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def train_field(key: str) -> FieldInfo:
    """The TrainConfig field a dotted search key names, or a ValueError saying why it names none."""
    model: type[BaseModel] = TrainConfig
    *parents, leaf = key.split(".")
    for i, part in enumerate(parents):
        field = model.model_fields.get(part)
        section = _section_type(field.annotation) if field else None
        if section is None:
            where = ".".join(parents[: i + 1])
            raise ValueError(f"search key {key!r}: train.{where} is not a section of the train config")
        model = section
    field = model.model_fields.get(leaf)
    if field is None:
        known = ", ".join(sorted(model.model_fields))
        raise ValueError(f"search key {key!r}: no such train config key (keys here: {known})")
    section = _section_type(field.annotation)
    if section is not None:
        raise ValueError(f"search key {key!r} is a section; search one of its keys, e.g. {key}.{next(iter(section.model_fields))}")
    if not parents and leaf in TUNE_OWNED_KEYS:
        raise ValueError(f"search key {key!r} is set by the tune stage for every trial (see {TUNE_OWNED_KEYS[leaf]})")
    return field


def check_search_keys(space: dict[str, SearchDimension]) -> None:
    """Raise a ValueError naming the first key of `space` that is not a searchable train config key."""
    for key in space:
        train_field(key)


class TuneConfig(ConfigSection):
    output: str
    """Directory for the leaderboard, the best config (YAML usable by `raylm train`) and Ray Tune's results."""
    search_space: dict[str, SearchDimension] = {
        "optimizer.lr": SearchDimension(type="loguniform", low=1e-4, high=1e-2),
        "optimizer.warmup_steps": SearchDimension(type="int", low=0, high=20),
    }
    """Dotted keys of the train config to search (e.g. optimizer.lr, micro_batch_size, model.dropout), each with its distribution."""
    num_samples: int = Field(4, ge=1)
    """Trials to run."""
    max_concurrent_trials: int = Field(2, ge=1)
    """Trials running at once; each holds num_workers_per_trial * train.cpus_per_worker CPUs while it runs.
    Two overlap one trial's start-up (worker processes, imports, data) with the other's training."""
    max_steps_per_trial: int = Field(30, ge=1)
    """Each trial trains for this many steps (overrides train.max_steps)."""
    num_workers_per_trial: int = Field(1, ge=1)
    """Ray Train workers per trial (overrides train.num_workers)."""
    evals_per_trial: int = Field(4, ge=1)
    """Validation passes per trial, evenly spaced (overrides train.eval_interval_steps); each is a report ASHA can act on."""
    tpe_startup_trials: int = Field(2, ge=1)
    """Random trials before TPE models the results (Optuna's default, 10, is more than a short sweep runs)."""
    metric: Literal["val_loss", "val_ppl"] = "val_loss"
    """Reported metric that ranks trials: the searcher and ASHA compare it, the leaderboard sorts by its final value."""
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1)
    """ASHA: reports (validation passes) a trial gets before it can be stopped."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA: keep 1/reduction_factor of trials at each rung."""

    @field_validator("search_space")
    @classmethod
    def _known_train_keys(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        check_search_keys(space)
        return space


class TuneJob(ConfigSection):
    """What the tune stage runs: the sweep's settings and the train config whose keys it searches."""

    tune: TuneConfig
    train: TrainConfig
