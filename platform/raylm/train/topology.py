"""Where a worker sits in the grid of pipeline stages x data-parallel ranks.

DeepSpeed's pipeline topology orders ranks with the data-parallel axis fastest:
world rank = stage * dp_size + dp_rank. Workers with the same dp_rank form one pipeline
and must read the same micro-batches (stage 0 its inputs, the last stage its labels), so
data is sharded by dp_rank, never by world rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.errors import ConfigError


@dataclass(frozen=True)
class RankCoords:
    stage: int
    """Pipeline stage of this worker (0 without pipeline parallelism)."""
    dp_rank: int
    """Data-parallel rank: which share of the data this worker's pipeline reads."""
    dp_size: int
    pipeline_stages: int

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.pipeline_stages - 1


def rank_coords(world_rank: int, world_size: int, pipeline_stages: int = 1) -> RankCoords:
    """The (stage, dp_rank) of `world_rank`; a ConfigError when the stages do not divide the workers."""
    if pipeline_stages < 1 or world_size % pipeline_stages:
        raise ConfigError(
            f"{world_size} workers cannot form pipelines of {pipeline_stages} stages: "
            "num_workers must be a multiple of the pipeline stage count"
        )
    if not 0 <= world_rank < world_size:
        raise ValueError(f"world_rank {world_rank} outside [0, {world_size})")
    dp_size = world_size // pipeline_stages
    stage, dp_rank = divmod(world_rank, dp_size)
    return RankCoords(stage=stage, dp_rank=dp_rank, dp_size=dp_size, pipeline_stages=pipeline_stages)
