"""The run config: one YAML file composing a frozen, validated section per stage.

Precedence is CLI override > YAML file > defaults. Stage paths left unset are
derived from `run.workdir` so that each stage reads the one before it:

    prepare.output  = <workdir>/prepared      tokenize.input = prepare.output
    tokenize.output = <workdir>/tokens        train.data     = tokenize.output
    train.output    = <workdir>/train         (exported model in train/model)
    ...

Errors name the file, the line where the YAML has one, and the dotted key:
`configs/demo.yaml:12: train.optimizer.lr: Input should be greater than 0`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from raylm.compress.config import DistillConfig, QuantizeConfig
from raylm.configbase import ConfigSection
from raylm.context import RunContext
from raylm.data.config import PrepareConfig
from raylm.errors import ConfigError
from raylm.evaluate.config import EvaluateConfig
from raylm.serve.config import ServeConfig
from raylm.tokenize.config import TokenizeConfig
from raylm.train.config import TrainConfig
from raylm.tune.config import TuneConfig, TuneJob

STAGES = ("prepare", "tokenize", "train", "tune", "distill", "quantize", "evaluate", "serve")


class RunSection(ConfigSection):
    name: str = "demo"
    """Name of the run: Ray Train/Tune experiment name and the served model's name."""
    workdir: str = "runs/demo"
    """Root under which stage outputs go unless a stage names its own paths."""
    seed: int = 0
    overwrite: bool = False
    """Replace a stage output written from a different config instead of failing."""
    shared_filesystem: bool = False
    """A local workdir is on a filesystem every node of the cluster mounts (NFS): use it on a multi-machine cluster."""


class RaySection(ConfigSection):
    address: str | None = None
    """Ray cluster to connect to; unset: RAY_ADDRESS if set, else start a local Ray inside the process."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local Ray (more than the cores lets Ray Data feed Ray Train workers)."""


class RaylmConfig(ConfigSection):
    run: RunSection = RunSection()
    ray: RaySection = RaySection()
    prepare: PrepareConfig
    tokenize: TokenizeConfig
    train: TrainConfig
    tune: TuneConfig
    distill: DistillConfig
    quantize: QuantizeConfig
    evaluate: EvaluateConfig
    serve: ServeConfig

    def stage_input(self, stage: str) -> ConfigSection:
        """The typed input of a stage's `run(section, ctx)`: its own section; tune's also carries the train config."""
        if stage == "tune":
            return TuneJob(tune=self.tune, train=self.train)
        return getattr(self, stage)

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)

    def context(self, address: str | None = None) -> RunContext:
        """The run context every stage gets: `run:` and `ray:`, with `address` (e.g. --address) over ray.address."""
        return RunContext(
            name=self.run.name,
            seed=self.run.seed,
            workdir=self.run.workdir,
            overwrite=self.run.overwrite,
            shared_filesystem=self.run.shared_filesystem,
            ray_address=address or self.ray.address,
            ray_num_cpus=self.ray.num_cpus,
            config_yaml=self.resolved_yaml(),
        )


def _derive_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill stage paths the YAML left unset from run.workdir, so each stage reads the one before it."""
    run = raw.get("run") or {}
    name = run.get("name", RunSection.model_fields["name"].default)
    workdir = str(run.get("workdir", RunSection.model_fields["workdir"].default))
    w = lambda sub: os.path.join(workdir, sub)  # noqa: E731

    def section(key: str) -> dict:
        value = raw.get(key)
        if value is None:
            value = raw[key] = {}
        return value if isinstance(value, dict) else {}  # a non-mapping fails validation later, with its key

    prep, tok, train, tune, dist, quant, ev, serve = (section(s) for s in STAGES)
    prep.setdefault("output", w("prepared"))
    tok.setdefault("input", prep["output"])
    tok.setdefault("output", w("tokens"))
    train.setdefault("data", tok["output"])
    train.setdefault("output", w("train"))
    tune.setdefault("output", w("tune"))
    teacher = os.path.join(str(train["output"]), "model")
    dist.setdefault("teacher", teacher)
    dist.setdefault("data", tok["output"])
    dist.setdefault("output", w("distill"))
    quant.setdefault("input", teacher)
    quant.setdefault("output", w("quantize"))
    models = {
        str(name): teacher,
        f"{name}-student": os.path.join(str(dist["output"]), "model"),
        f"{name}-int8": os.path.join(str(quant["output"]), "model"),
    }
    ev.setdefault("models", models)
    ev.setdefault("data", tok["output"])
    ev.setdefault("output", w("evaluate"))
    serve.setdefault("models", models)
    return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`--train.optimizer.lr=3e-4` or `train.optimizer.lr=3e-4` -> (["train", "optimizer", "lr"], 3e-4)."""
    body = text[2:] if text.startswith("--") else text
    key, sep, value = body.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected --section.key=value")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = node[k] = {}
            node = child
        node[keys[-1]] = value
    return raw


def _yaml_line(text: str, loc: tuple) -> int | None:
    """1-based line of the YAML node at a validation error's location, if the file has it."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _format_error(err: dict, source: str, text: str, overrides: list[str]) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-after")))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    elif err["type"] == "missing":
        message = "required key is missing"
    origin = next((o for o in reversed(overrides) if o.lstrip("-").split("=")[0] == dotted), None)
    if origin is not None:
        where = f"override {origin}"
    else:
        line = _yaml_line(text, loc)
        where = f"{source}:{line}" if line else source
    return f"{where}: {dotted}: {message}"


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RaylmConfig:
    """Load, override, derive paths and validate. Raises ConfigError with one line naming file, line and key."""
    overrides = list(overrides)
    text, source = "", "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    raw = _derive_paths(apply_overrides(raw, overrides))
    try:
        return RaylmConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(_format_error(first, source, text, overrides) + more) from None
