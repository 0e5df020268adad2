"""The stages of a run, in data-flow order: what `raylm <stage>`, `raylm demo` and `raylm submit` run.

    from raylm.config import load_config
    from raylm.stages import run_stage

    cfg = load_config("configs/demo.yaml", ["--train.max_steps=50"])
    summary = run_stage("train", cfg)        # connects to Ray, then run_train(cfg.train, cfg.context())

Each stage is one function `run_<stage>(section, ctx) -> summary dict` of its typed config section
and the run context (raylm.context.RunContext). A stage expects Ray to be connected when it
needs Ray: `run_stage` connects first (raylm.runtime.init_ray, the one place Ray is started).
The stage modules are imported when a stage runs, not when this module is, so that `raylm --help`
does not load torch, DeepSpeed and Ray.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from raylm.errors import ConfigError
from raylm.runtime import init_ray, nodes_elsewhere
from raylm.storage import check_writable, is_uri

if TYPE_CHECKING:  # for annotations only: this module is imported by `raylm --help`, which loads no config
    from raylm.config import RaylmConfig
    from raylm.configbase import ConfigSection
    from raylm.context import RunContext


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str
    """`module:function` of the stage's `run(section, ctx)`."""
    help: str
    job: str
    """Its Ray job entrypoint, relative to the checkout (`raylm submit`)."""
    uses_ray: bool = True
    """False for a stage that runs in this process alone (no Ray is started for it)."""

    def function(self) -> Callable[[ConfigSection, RunContext], dict]:
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("prepare", "raylm.data.prepare:run_prepare",
              "clean, filter, deduplicate and split raw text shards (Ray Data)", "jobs/prepare.py"),
        # not jobs/tokenize.py: a script's own directory comes first on sys.path, and that name would
        # shadow Python's standard `tokenize` module, which `logging` imports
        Stage("tokenize", "raylm.tokenize.stage:run_tokenize",
              "train a BPE tokenizer, encode and pack token shards", "jobs/tokenize_job.py"),
        Stage("train", "raylm.train.trainer:run_train",
              "train the GPT with Ray Train workers running DeepSpeed", "jobs/train.py"),
        Stage("tune", "raylm.tune.sweep:run_tune",
              "search hyperparameters with Ray Tune (TPE + ASHA)", "jobs/tune.py"),
        Stage("distill", "raylm.compress.distill:run_distill",
              "distill the trained model into a smaller student", "jobs/distill.py"),
        Stage("quantize", "raylm.compress.quantize:run_quantize",
              "quantize the trained model's Linear layers to int8", "jobs/quantize.py", uses_ray=False),
        Stage("evaluate", "raylm.evaluate.report:run_evaluate",
              "perplexity, size and speed of every model, as a table", "jobs/evaluate.py"),
        Stage("serve", "raylm.serve.lifecycle:run_serve",
              "serve the models behind an OpenAI-compatible API (Ray Serve)", "jobs/serve.py"),
    )
}  # fmt: skip
"""Every stage by name, in data-flow order."""


def connect(ctx: RunContext) -> None:
    """Connect this process to the run's Ray cluster (ctx.ray_address, RAY_ADDRESS, or a new local Ray).

    A local run.workdir on a cluster with nodes on other machines is refused here, before any task runs: those
    nodes cannot read or write it (unless every node mounts it, run.shared_filesystem).
    """
    init_ray(ctx.ray_address, ctx.ray_num_cpus)
    if is_uri(ctx.workdir) or ctx.shared_filesystem:
        return
    elsewhere = nodes_elsewhere()
    if elsewhere:
        shown = ", ".join(elsewhere[:3]) + (f" and {len(elsewhere) - 3} more" if len(elsewhere) > 3 else "")
        raise ConfigError(
            f"run.workdir: {ctx.workdir} is on this machine's disk, but the Ray cluster has nodes on other machines "
            f"({shown}); use an object store (run.workdir=s3://<bucket>/<run>) or, for a path every node mounts "
            "(NFS), set run.shared_filesystem=true"
        )


def run_stage(name: str, cfg: RaylmConfig, ctx: RunContext | None = None) -> dict:
    """Run one stage of `cfg` with the run context `ctx` (default: cfg.context()); returns its summary."""
    stage = STAGES[name]
    ctx = ctx or cfg.context()
    section = cfg.stage_input(name)
    output = getattr(getattr(section, name, section), "output", None)  # tune's job carries its section inside
    if output is not None:
        # Every stage's one check of its output (a no-op on a disk): an unreachable store, a missing bucket or
        # refused credentials is one line naming the URI, before Ray starts.
        check_writable(output)
    if stage.uses_ray:
        connect(ctx)
    return stage.function()(section, ctx)
