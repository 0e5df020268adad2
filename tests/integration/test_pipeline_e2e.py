"""The whole pipeline, as a user runs it: `raylm demo` from raw shards to an HTTP completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raylm.demo import PIPELINE


@pytest.mark.slow
def test_demo_runs_every_stage_and_serves_a_completion(repo_root, tmp_path, free_port):
    workdir = tmp_path / "smoke"
    cmd = [sys.executable, "-m", "raylm.cli", "demo", "--config", "configs/smoke.yaml",
           f"--run.workdir={workdir}", f"--serve.port={free_port()}"]
    r = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    # Every stage left a finished output with its manifest and resolved config.
    for stage in PIPELINE:
        out = workdir / ("prepared" if stage == "prepare" else "tokens" if stage == "tokenize" else stage)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["config"]
    for model in ("train/model", "distill/model", "quantize/model"):
        assert (workdir / model / "model.safetensors").is_file()

    # The last lines a user sees: the evaluation table with all three models, then the HTTP completion.
    tail = r.stdout.strip().splitlines()[-12:]
    text = "\n".join(tail)
    for name in ("smoke ", "smoke-student", "smoke-int8"):
        assert name in text, text
    completion = next(line for line in tail if line.startswith("completion: "))
    assert len(completion) > len("completion: 'ROMEO. '")  # the model generated something
    assert tail[-1].startswith("demo finished in")

    # Written to a log (stdout is not a terminal): progress as lines, not bars redrawn in place.
    for stream in (r.stdout, r.stderr):
        assert "\x1b[A" not in stream and "\r" not in stream, "a progress bar was redrawn into the log"
    assert "[raylm] step 8/8 val_loss" in r.stderr  # the train stage's own progress lines

    results = json.loads((workdir / "evaluate" / "results.json").read_text())
    rows = results["models"] if isinstance(results, dict) and "models" in results else results
    assert len(rows) == 3

    # Running a stage again with the same config is a no-op.
    again = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "prepare", "--config", "configs/smoke.yaml", f"--run.workdir={workdir}"],
        cwd=repo_root, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["reused"] is True


@pytest.mark.slow
def test_demo_on_s3_writes_every_artifact_there_and_nothing_on_the_local_disk(repo_root, tmp_path, free_port, s3_bucket):
    """run.workdir on the S3 server: every stage's output there, committed by its manifest; a served completion; on
    the local disk only the node cache (the working directory and the run's paths stay empty)."""
    from raylm import storage

    workdir = f"{s3_bucket}/smoke"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, storage.CACHE_ENV: str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raylm.cli", "demo", "--config", str(repo_root / "configs/smoke.yaml"),
           f"--run.workdir={workdir}", f"--serve.port={free_port()}"]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for stage in PIPELINE:
        out = f"{workdir}/" + ("prepared" if stage == "prepare" else "tokens" if stage == "tokenize" else stage)
        manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
        assert manifest["stage"] == stage and manifest["config"]
        assert not storage.exists(f"{out}/_raylm_writing.json")
    for model in ("train/model", "distill/model", "quantize/model"):
        assert storage.is_file(f"{workdir}/{model}/model.safetensors")
    tail = r.stdout.strip().splitlines()[-12:]
    assert any(line.startswith("completion: ") for line in tail) and tail[-1].startswith("demo finished in")
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "cwd"]
