"""The raylm command line: help on every subcommand, one-line errors without tracebacks."""

from __future__ import annotations

import subprocess

import pytest

from raylm.stages import STAGES


def raylm(python, repo_root, *args, env=None):
    return subprocess.run(
        [python, "-m", "raylm.cli", *args], cwd=repo_root, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.parametrize("command", [*STAGES, "demo", "submit"])
def test_help_on_every_subcommand(python, repo_root, command):
    r = raylm(python, repo_root, command, "--help")
    assert r.returncode == 0, r.stderr
    assert "--config" in r.stdout


def test_unknown_subcommand_is_one_clear_error(python, repo_root):
    r = raylm(python, repo_root, "pretrain")
    assert r.returncode == 2
    assert "invalid choice: 'pretrain'" in r.stderr
    assert "Traceback" not in r.stderr


def test_invalid_config_key_is_one_line(python, repo_root):
    r = raylm(python, repo_root, "prepare", "--config", "configs/demo.yaml", "--prepare.min_charz=3")
    assert r.returncode == 2
    assert r.stderr.strip() == "raylm prepare: error: override --prepare.min_charz=3: prepare.min_charz: unknown key"


def test_missing_config_file(python, repo_root):
    r = raylm(python, repo_root, "train", "--config", "configs/nope.yaml")
    assert r.returncode == 2
    assert r.stderr.strip() == "raylm train: error: configs/nope.yaml: config file not found"


def test_positional_junk_is_rejected(python, repo_root):
    r = raylm(python, repo_root, "train", "extra")
    assert r.returncode == 2 and "unrecognized arguments: extra" in r.stderr


def test_submit_to_unreachable_cluster(python, repo_root):
    r = raylm(python, repo_root, "submit", "prepare", "--config", "configs/demo.yaml", "--address", "http://127.0.0.1:1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raylm submit: error: cannot reach the Ray Jobs API at http://127.0.0.1:1")


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_has_a_runnable_job_entrypoint(python, repo_root, stage):
    r = subprocess.run([python, STAGES[stage].job, "--help"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"usage: raylm {stage}" in r.stdout


def test_stage_with_unreachable_cluster_address(python, repo_root):
    r = raylm(python, repo_root, "prepare", "--config", "configs/demo.yaml", "--address", "127.0.0.1:1")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "raylm prepare: error: cannot connect to Ray cluster at 127.0.0.1:1: Connection refused"
    ]
