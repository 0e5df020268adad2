"""Config of the tune stage: a Bayesian (TPE) search with ASHA early stopping."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raylm.configbase import ConfigSection


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
        from raylm.tune.search_space import check_search_keys

        check_search_keys(space)
        return space
