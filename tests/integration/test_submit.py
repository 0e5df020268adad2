"""`raylm submit` sends a stage to a separately started Ray cluster (`ray start --head`) as a Ray job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raylm.runtime import local_system_config


@pytest.fixture(scope="module")
def ray_head(free_port):
    """A real Ray head started with `ray start --head --block` in its own temp dir; killed by that dir afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rlm", dir="/tmp")  # short: Ray's socket paths live under it
    port, dash = free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The cluster's `python` is this environment's, as on a node where the user activated it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         # Fixed default ports would collide with the session's other local Ray (its job agent on 52365).
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}", f"--system-config={json.dumps(local_system_config())}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answers (401 where Ray's token authentication is on): up
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("ray start --head did not bring up the Jobs API within 120 s")
    yield address
    os.killpg(proc.pid, signal.SIGKILL)  # its own session: `ray start` and the processes it started
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)  # any that left the session


def test_submit_prepare_runs_on_the_cluster(ray_head, repo_root, tmp_path):
    workdir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "submit", "prepare", "--config", "configs/demo.yaml",
         "--address", ray_head, f"--run.workdir={workdir}"],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted raylm prepare as Ray job raysubmit_" in r.stdout
    assert "SUCCEEDED" in r.stdout
    manifest = json.loads((workdir / "prepared" / "manifest.json").read_text())
    assert manifest["stage"] == "prepare"
    assert list((workdir / "prepared" / "train").glob("*.parquet"))

    # The job shows in the cluster's own job list, as a user would check with `ray job list`.
    from ray.job_submission import JobSubmissionClient

    from raylm.cluster.submit import auth_headers

    jobs = JobSubmissionClient(ray_head, headers=auth_headers()).list_jobs()
    assert any(str(j.status.value) == "SUCCEEDED" and "jobs/prepare.py" in j.entrypoint for j in jobs)


def test_submit_prepare_with_the_workdir_on_s3(ray_head, repo_root, tmp_path, s3_bucket):
    """The job writes its output to the object store, with this shell's storage settings sent along."""
    from raylm import storage

    r = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "submit", "prepare", "--config", "configs/demo.yaml",
         "--address", ray_head, f"--run.workdir={s3_bucket}/run", "--forward-storage-credentials"],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(storage.read_text(f"{s3_bucket}/run/prepared/manifest.json"))["stage"] == "prepare"
    assert [f.name for f in storage.list_files(f"{s3_bucket}/run/prepared/train")] == ["part-00000.parquet"]


def test_the_job_runtime_env_ships_pinned_requirements_only_when_asked(repo_root, monkeypatch):
    from importlib.metadata import version

    from raylm.cluster.submit import job_runtime_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    plain = job_runtime_env(repo_root)
    assert set(plain) == {"working_dir", "py_modules", "excludes"}  # the image has the requirements; no secrets
    full = job_runtime_env(repo_root, pip=True, forward_storage_credentials=True)
    pins = full["pip"]["packages"]
    assert f"torch=={version('torch').split('+')[0]}" in pins and f"deepspeed=={version('deepspeed')}" in pins
    assert not any(p.lower().startswith("ray==") for p in pins)  # the cluster's own Ray stays
    assert full["env_vars"]["AWS_ACCESS_KEY_ID"] == "key-id"


def test_submit_failing_stage_exits_nonzero(ray_head, repo_root, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "submit", "prepare", "--config", "configs/demo.yaml",
         "--address", ray_head, f"--run.workdir={tmp_path}", f"--prepare.input={tmp_path}/missing"],
        cwd=repo_root, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 1
    assert "FAILED" in r.stdout
    assert f"{tmp_path}/missing" in r.stdout  # the stage's one-line error reaches the user through the job logs


@pytest.mark.slow  # ~80 s: a fresh cluster starts Serve's controller, proxy and replicas
def test_serve_deploy_runs_the_generated_serve_config(ray_head, repo_root, tmp_path, tiny_gpt, free_port):
    """`raylm serve-config` writes a file Ray's own `serve deploy` puts on the cluster; the API then answers."""
    import httpx

    model = tiny_gpt("tiny", block_size=64, seed=0)
    port, config = free_port(), tmp_path / "serve_config.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "raylm.cli", "serve-config", "--config", "configs/demo.yaml", f"--run.workdir={tmp_path}",
         "--run.name=deployed", f"--serve.models={json.dumps({'tiny': str(model)})}", f"--serve.port={port}",
         "--serve.num_cpus_per_replica=0.5", "--output", str(config)],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"serve deploy {config}" in r.stdout
    serve_bin = str(Path(sys.executable).with_name("serve"))
    # Ray's CLI sends the cluster's token (~/.ray/auth_token) only when told the cluster uses token authentication.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    r = subprocess.run([serve_bin, "deploy", str(config), "-a", ray_head], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, ready = time.time() + 180, None
        while time.time() < deadline:
            try:
                ready = httpx.get(f"{base}/ready", timeout=10)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert ready is not None and ready.status_code == 200, "the deployed app did not become ready within 180 s"
        body = {"model": "tiny", "prompt": "To be", "max_tokens": 5, "temperature": 0}
        done = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
        status = subprocess.run([serve_bin, "status", "-a", ray_head], capture_output=True, text=True, timeout=60, env=env)
        assert "deployed" in status.stdout and "RUNNING" in status.stdout, status.stdout[-2000:]
    finally:
        subprocess.run([serve_bin, "shutdown", "-y", "-a", ray_head], capture_output=True, timeout=120, env=env)
