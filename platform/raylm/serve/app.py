"""The Ray Serve application: an OpenAI-compatible HTTP ingress in front of one deployment per model.

    HTTP ──▶ OpenAIIngress (FastAPI: auth, validation, SSE) ──handle──▶ model-<name>  (Engine, continuous batching)
                                                            ──handle──▶ model-<other> ...

Each model deployment autoscales on its own (`serve.autoscaling`), reserves
`num_cpus_per_replica` CPUs and decodes concurrent requests together: requests join a
replica's running batch between decoding steps (up to `max_batch_size`) and leave it when
they finish, each streaming one delta per step. Streaming and non-streaming requests take
that same path; the ingress either forwards the deltas as server-sent events or joins them.

    app = build_app(serve_cfg, name="demo")     # what raylm.serve.lifecycle runs and deploy.app_builder returns

The package, one job a module: ingress.py (the HTTP routes), replica.py (a model's decode loop),
engine.py (generation, no Ray), openai_api.py (request and response bodies, no Ray), this module
(the application), lifecycle.py (start, stop, `raylm serve`), deploy.py (config files for `serve deploy`).
"""

import math
import re
import sys

from ray import serve

from raylm import storage
from raylm.errors import InputError
from raylm.model.artifact import CONFIG, read_model_meta
from raylm.serve.config import ServeConfig
from raylm.serve.ingress import OpenAIIngress
from raylm.serve.openai_api import model_card
from raylm.serve.replica import ModelServer


def deployment_name(model: str) -> str:
    """The Serve deployment of a served model: "model-<name>", characters Serve does not take replaced by "_"."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model)


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


def available_models(serve_cfg: ServeConfig) -> dict[str, str]:
    """The configured models whose directories hold an exported model; the others are reported and skipped.

    The default model list names every model a full run exports (trained, student, int8);
    serving after a partial run serves what exists. None existing is an InputError.
    """
    found, missing = {}, []
    for name, path in serve_cfg.models.items():
        if storage.is_file(storage.join(path, CONFIG)):
            read_model_meta(path)  # a malformed config.json fails here, naming the file
            found[name] = str(path)
        else:
            missing.append(f"{name} ({path})")
    if not found:
        raise InputError(f"serve.models: no exported model found: {', '.join(missing)}")
    if missing:
        print(f"raylm serve: skipping models that do not exist: {', '.join(missing)}", file=sys.stderr)
    return found


def build_app(serve_cfg: ServeConfig, name: str = "raylm") -> serve.Application:
    """The Serve application for `serve_cfg`: the ingress bound to one autoscaled deployment per model."""
    handles, cards = {}, {}
    for model, path in available_models(serve_cfg).items():
        options = deployment_options(serve_cfg)  # fresh dicts for each deployment
        if settings := storage.settings_for(path):
            # A replica copies its model into its node's cache when it starts, as this process reaches the store.
            options["ray_actor_options"]["runtime_env"] = {"env_vars": settings}
        handles[model] = ModelServer.options(name=deployment_name(model), **options).bind(model, path, serve_cfg)
        cards[model] = model_card(model, storage.stat(storage.join(path, CONFIG)).mtime_ns // 10**9)
    return OpenAIIngress.options(
        name="openai",
        num_replicas=serve_cfg.ingress_replicas,
        # The ingress only parses, routes and streams: asynchronous and light, so it takes no CPU slot.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    ).bind(handles, cards, serve_cfg, name)
