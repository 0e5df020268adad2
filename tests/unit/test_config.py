"""Config loading: validation errors name file, line and key; overrides; derived paths; frozen sections."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raylm.config import load_config, parse_override
from raylm.errors import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_demo_config_loads_and_derives_stage_paths(repo_root):
    cfg = load_config(repo_root / "configs/demo.yaml")
    assert cfg.prepare.input == "package:demo_corpus"
    assert cfg.tokenize.input == cfg.prepare.output == "runs/demo/prepared"
    assert cfg.train.data == cfg.tokenize.output
    assert cfg.distill.teacher == "runs/demo/train/model"
    assert cfg.serve.models["demo"] == cfg.evaluate.models["demo"] == "runs/demo/train/model"
    assert set(cfg.serve.models) == {"demo", "demo-student", "demo-int8"}


def test_workdir_override_moves_every_stage(repo_root, tmp_path):
    cfg = load_config(repo_root / "configs/demo.yaml", [f"--run.workdir={tmp_path}"])
    for path in (cfg.prepare.output, cfg.tokenize.output, cfg.train.output, cfg.tune.output, cfg.evaluate.output):
        assert path.startswith(str(tmp_path))


def test_dotted_override_sets_nested_typed_value(repo_root):
    cfg = load_config(repo_root / "configs/demo.yaml", ["--train.optimizer.lr=3e-4", "--train.zero_stage=2"])
    assert cfg.train.optimizer.lr == pytest.approx(3e-4)
    assert cfg.train.zero_stage == 2


def test_unknown_key_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "prepare:\n  input: x\ntrain:\n  optimizer:\n    lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:5: train.optimizer.lrr: unknown key"


def test_bad_value_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "prepare:\n  input: x\ntrain:\n  zero_stage: 7\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:4: train.zero_stage:") and "\n" not in msg


def test_bad_override_names_the_override(repo_root):
    with pytest.raises(ConfigError) as e:
        load_config(repo_root / "configs/demo.yaml", ["--train.optimizer.lr=-1"])
    assert str(e.value).startswith("override --train.optimizer.lr=-1: train.optimizer.lr:")


def test_missing_required_input(tmp_path):
    with pytest.raises(ConfigError, match=r"prepare.input: required key is missing"):
        load_config(write(tmp_path, "run:\n  name: x\n"))


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "prepare:\n  input: a: b\n"))


def test_sections_are_frozen(repo_root):
    cfg = load_config(repo_root / "configs/demo.yaml")
    with pytest.raises(ValidationError):
        cfg.train.max_steps = 5
    assert cfg.train.model_copy(update={"max_steps": 5}).max_steps == 5


@pytest.mark.parametrize("bad", ["--", "--=3", "--a..b=1", "--train.lr"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_resolved_yaml_round_trips(repo_root, tmp_path):
    cfg = load_config(repo_root / "configs/demo.yaml", ["--train.max_steps=7"])
    again = load_config(write(tmp_path, cfg.resolved_yaml()))
    assert again == cfg
