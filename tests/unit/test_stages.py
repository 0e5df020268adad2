"""The stage registry: every stage is one `run(section, ctx)` of its typed config section and the run context."""

from __future__ import annotations

import inspect
import subprocess
import typing

import pytest

from raylm.config import STAGES as CONFIG_SECTIONS
from raylm.config import load_config
from raylm.context import RunContext
from raylm.stages import STAGES


def test_the_registry_lists_every_config_section_in_data_flow_order():
    assert list(STAGES) == list(CONFIG_SECTIONS)


@pytest.mark.parametrize("name", list(STAGES))
def test_each_stage_is_a_function_of_its_typed_section_and_the_run_context(name, repo_root):
    stage = STAGES[name]
    function = stage.function()
    params = list(inspect.signature(function).parameters.values())
    assert len(params) == 2, f"{stage.entry} takes {[p.name for p in params]}"
    hints = typing.get_type_hints(function)
    section_type, context_type = hints[params[0].name], hints[params[1].name]
    assert context_type is RunContext
    cfg = load_config(repo_root / "configs" / "demo.yaml")
    assert isinstance(cfg.stage_input(name), section_type)
    assert (repo_root / stage.job).is_file()


def test_the_run_context_carries_the_run_and_ray_sections(repo_root):
    cfg = load_config(repo_root / "configs" / "demo.yaml", ["--run.seed=7", "--run.overwrite=true", "--ray.num_cpus=6"])
    ctx = cfg.context()
    assert (ctx.name, ctx.seed, ctx.workdir, ctx.overwrite) == ("demo", 7, "runs/demo", True)
    assert (ctx.ray_address, ctx.ray_num_cpus) == (None, 6)
    assert cfg.context(address="10.0.0.1:6379").ray_address == "10.0.0.1:6379"  # --address wins over ray.address
    assert "train:" in ctx.config_yaml and "seed: 7" in ctx.config_yaml
    assert ctx.path("s3://bucket/run") == "s3://bucket/run"
    assert ctx.path("runs/demo").startswith("/")


def test_stage_modules_load_neither_the_run_config_nor_the_cli(python):
    """Stages meet the run config only through their section and the context: no import of raylm.config or raylm.cli."""
    modules = sorted({stage.entry.split(":")[0] for stage in STAGES.values()})
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in ('raylm.config', 'raylm.cli', 'raylm.demo', 'raylm.stages') if m in sys.modules))"
    )
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
