"""Serve autoscaling under load: a model deployment goes from min to more replicas under load, and back after."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from raylm.config import load_config
from raylm.serve.lifecycle import start_serve, stop_serve

pytestmark = pytest.mark.slow


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout_s: float, what: str) -> float:
    """Seconds until predicate() held; fails the test after timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


def test_replicas_scale_up_under_load_and_back_down(ray_local, tmp_path, tiny_gpt, free_port):
    model = tiny_gpt("tiny", block_size=64, seed=0)
    cfg = load_config(None, [
        f"--run.workdir={tmp_path}", f"--prepare.input={tmp_path}", "--run.name=autoscale",
        f"--serve.models={json.dumps({'tiny': str(model)})}", f"--serve.port={free_port()}",
        "--serve.num_cpus_per_replica=0.5", "--serve.max_batch_size=2", "--serve.max_tokens_limit=48",
        "--serve.autoscaling.min_replicas=1", "--serve.autoscaling.max_replicas=2",
        "--serve.autoscaling.target_ongoing_requests=1", "--serve.autoscaling.upscale_delay_s=1",
        "--serve.autoscaling.downscale_delay_s=3", "--serve.autoscaling.look_back_period_s=3",
        "--serve.autoscaling.metrics_interval_s=0.5",
    ])  # fmt: skip
    base_url = start_serve(cfg.serve, cfg.context())
    stop = threading.Event()
    answered, failed = [], []

    def client():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                body = {"model": "tiny", "prompt": "To be, or not", "max_tokens": 48, "temperature": 0}
                r = http.post(f"{base_url}/v1/completions", json=body)
                (answered if r.status_code == 200 else failed).append(r.status_code)

    try:
        assert running_replicas("autoscale", "model-tiny") == 1
        threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        up = wait_for(lambda: running_replicas("autoscale", "model-tiny") == 2, 90, "a second replica under load")
        served_before = len(answered)
        wait_for(lambda: len(answered) > served_before + 6, 60, "requests answered after scaling up")
        stop.set()
        for t in threads:
            t.join(timeout=60)
        down = wait_for(lambda: running_replicas("autoscale", "model-tiny") == 1, 120, "back to min_replicas after the load")
        print(f"scaled up after {up:.1f} s of load, down {down:.1f} s after it stopped; {len(answered)} requests answered")
        assert not failed, failed
        ok = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": "Now", "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
    finally:
        stop.set()
        stop_serve()
