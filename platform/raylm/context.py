"""The run context: what every stage gets besides its own section of the run config.

    summary = run_train(cfg.train, cfg.context())       # what raylm.stages.run_stage does

A stage is one function of its typed section and this context. The section says what the stage
does; the context says which run it belongs to: its name and seed, its storage root, whether a
finished output from another config may be replaced, and the Ray cluster to use.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.storage import absolute


@dataclass(frozen=True)
class RunContext:
    name: str = "demo"
    """Name of the run: Ray Train/Tune experiment name, the served app's name."""
    seed: int = 0
    workdir: str = "runs/demo"
    """The run's storage root (run.workdir): a local or NFS path, or an object-store URI."""
    overwrite: bool = False
    """Replace a stage output written from a different config instead of failing."""
    shared_filesystem: bool = False
    """A local workdir that every node mounts (NFS): allowed on a cluster with nodes on other machines."""
    ray_address: str | None = None
    """Ray cluster to connect to; None: RAY_ADDRESS if set, else a local Ray started for the run."""
    ray_num_cpus: int | None = None
    """Logical CPUs of a local Ray (None: at least 4)."""
    config_yaml: str = ""
    """The whole run config, resolved, as YAML (written where a user re-runs from a stage's output)."""

    def path(self, location: str) -> str:
        """A location as every process of the run names it: URIs as they are, local paths made absolute.

        For paths a stage hands to processes that run elsewhere (a teacher model, the models replicas load).
        """
        return absolute(location)
