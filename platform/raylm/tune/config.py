"""Config of the tune stage: a Bayesian (TPE) search with ASHA early stopping."""

from typing import Literal

from pydantic import Field, model_validator

from raylm.configbase import ConfigSection


class SearchDimension(ConfigSection):
    type: Literal["loguniform", "uniform", "int", "choice"]
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
        return self


class TuneConfig(ConfigSection):
    output: str
    """Directory for the leaderboard, the best config (YAML usable by `raylm train`) and Ray Tune's results."""
    search_space: dict[str, SearchDimension] = {
        "optimizer.lr": SearchDimension(type="loguniform", low=1e-4, high=1e-2),
        "optimizer.warmup_steps": SearchDimension(type="int", low=0, high=20),
    }
    """Dotted keys of the train config to search, each with its distribution."""
    num_samples: int = Field(4, ge=1)
    """Trials to run."""
    max_concurrent_trials: int = Field(1, ge=1)
    max_steps_per_trial: int = Field(30, ge=1)
    """Each trial trains for this many steps (overrides train.max_steps)."""
    num_workers_per_trial: int = Field(1, ge=1)
    """Ray Train workers per trial (overrides train.num_workers)."""
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1)
    """ASHA: reports a trial gets before it can be stopped."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA: keep 1/reduction_factor of trials at each rung."""
