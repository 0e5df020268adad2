"""What object storage costs: the stages with run.workdir on an S3 server against the local disk.

    python benchmarks/bench_storage.py                 # smoke config; train: debug preset, 40 steps
    python benchmarks/bench_storage.py --steps 100 --preset demo

The S3 server is moto's (a real S3 HTTP API) on loopback, started here, so the figures measure
raylm's own overhead on an object store (listing, uploads, the commit protocol, the node cache)
rather than a network. Everything runs on one local Ray started once, in this order:

1. Every stage of the demo pipeline (configs/smoke.yaml: prepare, tokenize, train, tune, distill,
   quantize, evaluate) with the workdir on the local disk, then the same with the workdir on
   S3: seconds per stage and the ratio S3 / disk.
2. Training, the same run four times (2 CPU workers, ZeRO 1, the same seed and data), in the
   order disk, S3, S3, disk: on the local tokens, or on the S3 tokens once this node's cache holds them (warmed by reading the
   metadata first, as the driver does before a run). Printed: the steady-state tokens/s of each
   (the mean over the logged windows after the first, which holds start-up), the ratio S3 / disk
   (issue 19's target: at least 0.95), and the seconds the cache took to fill.
3. Serve: a replica of the trained model started from the local disk or from S3 with an
   empty cache (disk, S3, S3, disk) (the replica downloads the model as it starts): seconds from `start_serve` to
   the first completion answered, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def start_s3() -> subprocess.Popen:
    """moto's S3 server on a free loopback port; this process's AWS_* settings point at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})  # fmt: skip
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server


def steady_tokens_per_s(train_output: str) -> float:
    """Mean tokens/s of the logged windows after the first (which holds compilation and start-up)."""
    history = json.loads((Path(train_output) / "metrics.json").read_text())["history"]
    rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    steady = rates[1:] or rates
    return sum(steady) / len(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="training steps of each train run of part 2")
    ap.add_argument("--preset", default="debug", help="model preset of the train runs")
    args = ap.parse_args()

    from raylm import storage
    from raylm.config import load_config
    from raylm.demo import PIPELINE, fetch_completion
    from raylm.runtime import init_ray
    from raylm.serve.lifecycle import start_serve, stop_serve
    from raylm.stages import run_stage
    from raylm.tokenize.shards import read_token_meta

    server = start_s3()
    local_root = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    os.environ[storage.CACHE_ENV] = str(local_root / "cache")
    init_ray()
    config = str(ROOT / "configs/smoke.yaml")
    workdirs = {"disk": str(local_root / "run"), "s3": "s3://bench/run"}
    seconds: dict[str, dict[str, float]] = {}
    try:
        for where, workdir in workdirs.items():
            cfg = load_config(config, [f"run.workdir={workdir}", f"run.name=bench-{where}"])
            seconds[where] = {}
            for stage in PIPELINE:
                started = time.perf_counter()
                run_stage(stage, cfg)
                seconds[where][stage] = time.perf_counter() - started

        shutil.rmtree(local_root / "cache", ignore_errors=True)  # the pipeline's train stage filled it
        started = time.perf_counter()
        read_token_meta(f"{workdirs['s3']}/tokens")  # fills this node's cache, as the driver does before a run
        cache_s = time.perf_counter() - started
        rates: dict[str, list[float]] = {"disk": [], "s3": []}
        for i, where in enumerate(("disk", "s3", "s3", "disk")):  # ABBA: an order effect cancels out
            data = f"{workdirs[where]}/tokens"
            out = str(local_root / f"train-{where}-{i}")
            cfg = load_config(config, [f"run.workdir={local_root / 'unused'}", f"train.data={data}", f"train.output={out}",
                                       f"train.model.preset={args.preset}", f"train.max_steps={args.steps}",
                                       "train.eval_interval_steps=1000", "train.checkpoint_interval_steps=1000",
                                       "train.log_interval_steps=5", f"run.name=bench-{where}"])  # fmt: skip
            run_stage("train", cfg)
            rates[where].append(steady_tokens_per_s(out))

        serve_s: dict[str, list[float]] = {"disk": [], "s3": []}
        for where in ("disk", "s3", "s3", "disk"):
            workdir = workdirs[where]
            shutil.rmtree(local_root / "cache", ignore_errors=True)  # the replica downloads the S3 model itself
            cfg = load_config(config, [f"run.workdir={workdir}", f"serve.models={{\"m\": \"{workdir}/train/model\"}}",
                                       "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1"])  # fmt: skip
            started = time.perf_counter()
            base_url = start_serve(cfg.serve, cfg.context())
            fetch_completion(base_url, "m", "ROMEO. ", max_tokens=4)
            serve_s[where].append(time.perf_counter() - started)
            stop_serve()

        time.sleep(2)  # the workers' last log lines reach this process's output first
        print("\nStages of the smoke pipeline, workdir on the local disk against the S3 server (seconds):")
        print(f"{'stage':<10}{'disk':>10}{'s3':>10}{'s3 / disk':>12}")
        for stage in PIPELINE:
            d, s3 = seconds["disk"][stage], seconds["s3"][stage]
            print(f"{stage:<10}{d:>10.1f}{s3:>10.1f}{s3 / d:>12.2f}")
        d, s3 = sum(seconds["disk"].values()), sum(seconds["s3"].values())
        print(f"{'total':<10}{d:>10.1f}{s3:>10.1f}{s3 / d:>12.2f}")
        print(f"\nTraining, preset {args.preset}, {args.steps} steps, 2 CPU workers; token data from the disk and from S3")
        print(f"  node cache filled from S3 in {cache_s:.2f} s")
        disk, s3 = sum(rates["disk"]) / 2, sum(rates["s3"]) / 2
        print(f"  steady-state tokens/s (two runs each, in the order disk, s3, s3, disk): disk {rates['disk'][0]:.0f} "
              f"{rates['disk'][1]:.0f}, s3 {rates['s3'][0]:.0f} {rates['s3'][1]:.0f}; "
              f"mean ratio s3 / disk {s3 / disk:.3f} (target >= 0.95)")  # fmt: skip
        disk, s3 = sum(serve_s["disk"]) / 2, sum(serve_s["s3"]) / 2
        print("\nServe: start_serve to the first completion, one replica of the trained model (disk, s3, s3, disk)")
        print(f"  disk {serve_s['disk'][0]:.1f} {serve_s['disk'][1]:.1f} s, s3 (cold node cache) {serve_s['s3'][0]:.1f} "
              f"{serve_s['s3'][1]:.1f} s; mean ratio s3 / disk {s3 / disk:.2f}")  # fmt: skip
    finally:
        server.terminate()
        shutil.rmtree(local_root, ignore_errors=True)


if __name__ == "__main__":
    main()
