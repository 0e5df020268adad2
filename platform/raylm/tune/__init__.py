"""Tune: Ray Tune sweeps, each trial a distributed training run."""
