"""Send a stage to a running Ray cluster as a Ray job, through the Ray Jobs API.

The job runs `python jobs/<stage>.py --config <config> [overrides]` with this checkout as its
working directory and the raylm package itself shipped as a `py_module`: the cluster gets
this raylm, whatever version its image has. raylm's dependencies (torch, DeepSpeed,
tokenizers, ...) must reach the cluster's Python one of two ways:

- an image that has them (the usual way: a KubeRay or cluster-launcher image built from
  this project, `pip install raylm` in it); nothing more to do;
- `--pip`: the job's runtime_env installs the requirements of the raylm installed here,
  pinned to the versions installed here, on every node the job uses (once per node and set
  of requirements: Ray caches the environment; the first job waits for torch to install).

Where the artifacts go: a local run.workdir is made absolute (the job's working directory is
a temporary copy); on a cluster whose nodes are other machines it must be an object-store URI
(or a path every node mounts, run.shared_filesystem), which the stage checks before any task
runs. The cluster's processes reach the store with their own credentials (an instance role,
a pod's service account); `--forward-storage-credentials` sends the AWS_*/GOOGLE_*/AZURE_*
settings of this shell with the job instead (they are then visible in the job's runtime_env).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from ray.job_submission import JobSubmissionClient

import raylm
from raylm.config import load_config
from raylm.storage import worker_settings
from raylm.errors import ConfigError, RaylmError, first_line
from raylm.stages import STAGES
from raylm.storage import is_uri

# Never upload these with the working directory: environments, outputs, caches.
EXCLUDES = [".venv", "venv", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "*.tmp-*"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_script(stage: str) -> str:
    """The Ray job entrypoint of a stage, relative to the checkout (raylm.stages.STAGES)."""
    return STAGES[stage].job


def project_root() -> Path:
    """The checkout holding jobs/: the current directory if it has one, else the one raylm was installed from."""
    cwd = Path.cwd()
    if (cwd / "jobs").is_dir():
        return cwd
    source = Path(__file__).resolve().parents[3]  # platform/raylm/cluster/submit.py -> checkout
    if (source / "jobs").is_dir():
        return source
    raise RaylmError("no jobs/ directory here or next to the installed raylm; run from a raylm checkout")


def _job_overrides(config: str, overrides: list[str]) -> list[str]:
    """Make run.workdir absolute so outputs land where the user expects, not in the job's temporary working dir."""
    workdir = load_config(config, overrides).run.workdir
    if is_uri(workdir) or os.path.isabs(workdir):
        return list(overrides)
    return [*overrides, f"--run.workdir={os.path.abspath(workdir)}"]


def auth_headers() -> dict[str, str]:
    """Bearer header for clusters with Ray's token authentication: RAY_AUTH_TOKEN, else ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def jobs_client(address: str | None):
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address, headers=auth_headers()), address
    except Exception as e:  # the SDK raises ConnectionError, RuntimeError or ValueError by cause
        raise RaylmError(f"cannot reach the Ray Jobs API at {address}: {first_line(e)}") from None


def pinned_requirements() -> list[str]:
    """The requirements of the installed raylm (no extras), each pinned to the version installed here.

    Ray itself is left out (the cluster runs its own, which a job must not replace), and so are local
    version labels (torch's `+cpu`): the cluster's pip picks the build for its own machines.
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    pins = []
    for line in requires("raylm") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement (test, ...)
        if req.name.lower() == "ray":
            continue
        try:
            pins.append(f"{req.name}=={version(req.name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(str(req))
    return sorted(pins)


def job_runtime_env(root: Path, pip: bool = False, forward_storage_credentials: bool = False) -> dict:
    """The Ray job's runtime_env: this checkout as working directory, this raylm as a module; optionally the pinned
    requirements (`pip`) and this shell's object-store settings."""
    runtime_env = {"working_dir": str(root), "py_modules": [str(Path(raylm.__file__).parent)], "excludes": EXCLUDES}
    if pip:
        runtime_env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    if forward_storage_credentials and (settings := worker_settings()):
        runtime_env["env_vars"] = settings
    return runtime_env


def submit_stage(stage: str, config: str, overrides: list[str], address: str | None = None, wait: bool = True,
                 pip: bool = False, forward_storage_credentials: bool = False) -> int:  # fmt: skip
    """Submit one stage as a Ray job; print its id; follow its logs until it ends. Returns the exit code."""
    root = project_root()
    config_path = Path(config).resolve()
    try:
        config_rel = config_path.relative_to(root)
    except ValueError:
        raise ConfigError(f"{config}: the config must live inside the submitted directory {root}") from None
    client, address = jobs_client(address)
    args = " ".join(shlex.quote(a) for a in [job_script(stage), "--config", str(config_rel), *_job_overrides(config, overrides)])
    runtime_env = job_runtime_env(root, pip, forward_storage_credentials)
    job_id = submit_with_retry(client, f"python {args}", runtime_env, address)
    print(f"submitted raylm {stage} as Ray job {job_id} to {address}", flush=True)
    if not wait:
        return 0
    asyncio.run(_follow(client, job_id))
    status = _final_status(client, job_id)
    print(f"Ray job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def submit_with_retry(client, entrypoint: str, runtime_env: dict, address: str, timeout_s: float = 60.0) -> str:
    """Submit, retrying while a just-started cluster has no job agent yet (HTTP 500 "No available agent")."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "No available agent" in str(e) and time.time() < deadline:
                time.sleep(2)
                continue
            raise RaylmError(f"the Ray Jobs API at {address} refused the job: {first_line(e)}") from None


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def _final_status(client, job_id: str, timeout_s: float = 30.0) -> str:
    deadline = time.time() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(0.5)
