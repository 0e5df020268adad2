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
cluster's Python needs raylm installed, and the models where every node reaches them: on an
object store (URIs, the usual case: each replica copies its model into its node's cache when it
starts, with the credentials the cluster's processes have) or at the same paths on every node.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from raylm.serve.app import available_models, build_app, deployment_name, deployment_options
from raylm.serve.config import ServeConfig
from raylm.storage import absolute, write_text

IMPORT_PATH = "raylm.serve.deploy:app_builder"


def app_builder(args: dict):
    """Serve's application builder: `args` = {"name": app name, "serve": the serve section} -> the raylm app."""
    serve_cfg = ServeConfig.model_validate(args["serve"])
    return build_app(serve_cfg.model_copy(update={"models": available_models(serve_cfg)}), args.get("name", "raylm"))


def serve_config_file(serve_cfg: ServeConfig, app_name: str) -> dict:
    """The Ray Serve config (the `serve deploy` schema) of a serve section, its app named `app_name` (the run's name)."""
    models = {name: absolute(path) for name, path in serve_cfg.models.items()}
    present = available_models(serve_cfg.model_copy(update={"models": models}))
    # each deployment its own copy: YAML would write shared dicts as anchors, which an operator editing one
    # deployment's resources in the file would change for all of them
    deployments = [{"name": deployment_name(m), **deployment_options(serve_cfg)} for m in sorted(present)]
    deployments.append({"name": "openai", "num_replicas": serve_cfg.ingress_replicas})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": serve_cfg.host, "port": serve_cfg.port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"name": app_name, "serve": serve_cfg.model_copy(update={"models": present}).model_dump()},
                "deployments": deployments,
            }
        ],
    }


def write_serve_config(serve_cfg: ServeConfig, app_name: str, path: str | os.PathLike) -> Path:
    """Write serve_config_file(serve_cfg, app_name) as YAML to `path` (atomically: a reader never sees half a file)."""
    path = Path(path)
    header = "# Ray Serve config written by `raylm serve-config`; deploy with: serve deploy " + str(path) + "\n"
    write_text(path, header + yaml.safe_dump(serve_config_file(serve_cfg, app_name), sort_keys=False))
    return path
