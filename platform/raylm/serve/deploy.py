"""Ray Serve config files for `serve deploy`: the same app `raylm serve` runs, deployed by Ray's own CLI.

    raylm serve-config --config configs/demo.yaml --output serve_config.yaml
    serve deploy serve_config.yaml -a http://127.0.0.1:8265      # onto a running cluster
    serve status -a http://127.0.0.1:8265
    serve shutdown -y -a http://127.0.0.1:8265

The file names `raylm.serve.deploy:app_builder` as its import path and carries the serve
section (model paths made absolute) as the builder's args, so Serve builds the app on the
cluster from the same typed config. Its `deployments` list repeats each deployment's
replica resources and autoscaling_config: Serve lets a config file override what the code
sets, so an operator can retune those in the file without touching raylm's config. The
cluster's Python needs raylm installed and the model directories at the same paths.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from raylm.serve.config import ServeConfig

IMPORT_PATH = "raylm.serve.deploy:app_builder"


def app_builder(args: dict):
    """Serve's application builder: `args` = {"name": app name, "serve": the serve section} -> the raylm app."""
    from raylm.serve.app import available_models, build_app

    serve_cfg = ServeConfig.model_validate(args["serve"])
    return build_app(serve_cfg.model_copy(update={"models": available_models(serve_cfg)}), args.get("name", "raylm"))


def deployment_options(serve_cfg: ServeConfig) -> dict:
    """Replica resources and limits of every model deployment (build_app and the config file both use these)."""
    actor = {"num_cpus": serve_cfg.num_cpus_per_replica}
    if serve_cfg.num_gpus_per_replica > 0:
        actor["num_gpus"] = serve_cfg.num_gpus_per_replica
    auto = serve_cfg.autoscaling
    return {
        "ray_actor_options": actor,
        "autoscaling_config": auto.model_dump(),
        # Room for a full batch being decoded and the next one gathering.
        "max_ongoing_requests": max(2 * serve_cfg.max_batch_size, math.ceil(auto.target_ongoing_requests)),
        # Let a replica that is scaled down finish the requests it is decoding.
        "graceful_shutdown_timeout_s": 30.0,
    }


def serve_config_file(cfg) -> dict:
    """The Ray Serve config (the `serve deploy` schema) of the run config's serve section."""
    from raylm.serve.app import available_models, deployment_name

    serve_cfg: ServeConfig = cfg.serve
    models = {name: str(Path(path).resolve()) for name, path in serve_cfg.models.items()}
    present = available_models(serve_cfg.model_copy(update={"models": models}))
    options = deployment_options(serve_cfg)
    deployments = [{"name": deployment_name(m), **options} for m in sorted(present)]
    deployments.append({"name": "openai", "num_replicas": serve_cfg.ingress_replicas})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": serve_cfg.host, "port": serve_cfg.port},
        "applications": [
            {
                "name": cfg.run.name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"name": cfg.run.name, "serve": serve_cfg.model_copy(update={"models": present}).model_dump()},
                "deployments": deployments,
            }
        ],
    }


def write_serve_config(cfg, path: str | os.PathLike) -> Path:
    """Write serve_config_file(cfg) as YAML to `path` (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    header = "# Ray Serve config written by `raylm serve-config`; deploy with: serve deploy " + str(path) + "\n"
    tmp.write_text(header + yaml.safe_dump(serve_config_file(cfg), sort_keys=False))
    tmp.replace(path)
    return path
