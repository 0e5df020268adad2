"""Starting and stopping the served app on the connected Ray cluster, and the `raylm serve` stage.

    base_url = start_serve(cfg.serve, ctx)   # non-blocking; "http://127.0.0.1:8000"
    stop_serve()
    run_serve(cfg.serve, ctx)                # `raylm serve`: start, print, block until Ctrl-C, shut down

The caller connects Ray first (raylm.stages.run_stage does); the app is named after the run (ctx.name).
"""

import errno
import logging
import signal
import socket
import threading
import time

import ray
from ray import serve

from raylm.context import RunContext
from raylm.errors import RaylmError
from raylm.serve.app import available_models, build_app
from raylm.serve.config import ServeConfig

log = logging.getLogger(__name__)


def start_serve(serve_cfg: ServeConfig, ctx: RunContext) -> str:
    """Start Serve (HTTP on serve.host:serve.port) with the app named ctx.name; return its base URL.

    Returns once every model deployment is running. If Serve already runs on this cluster
    its HTTP settings stay as they are (Ray Serve's rule).
    """
    return _start(serve_cfg, ctx)[0]


def stop_serve() -> None:
    """Shut Serve down on the cluster: every application, replica and proxy."""
    serve.shutdown()


def run_serve(serve_cfg: ServeConfig, ctx: RunContext) -> dict:
    """`raylm serve`: start serving, print the URL and the models, block until Ctrl-C, shut down."""
    base_url, models = _start(serve_cfg, ctx)
    auth = " (Authorization: Bearer <serve.api_key>)" if serve_cfg.api_key else ""
    print(f"raylm serve: {', '.join(models)} at {base_url}/v1{auth}; Ctrl-C to stop", flush=True)
    # `ray job stop` and process managers send SIGTERM: shut down as on Ctrl-C.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_serve()
        if main:
            signal.signal(signal.SIGTERM, previous)
    return {"output": base_url, "models": models}


def _start(serve_cfg: ServeConfig, ctx: RunContext) -> tuple[str, list[str]]:
    """Run the app named after the run; its base URL and the names of the models it serves.

    The replicas load the models wherever Ray places them: they get the paths as every process names them.
    """
    located = {name: ctx.path(path) for name, path in serve_cfg.models.items()}
    models = available_models(serve_cfg.model_copy(update={"models": located}))
    app_name = ctx.name
    app = build_app(serve_cfg.model_copy(update={"models": models}), app_name)
    if not serve.status().proxies:  # Serve not running yet: our HTTP options will apply
        _check_port_free(serve_cfg.host, serve_cfg.port)
    _warn_if_short_of_cpus(serve_cfg, len(models))
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    serve.run(app, name=app_name, route_prefix="/")
    return _base_url(serve_cfg), sorted(models)


def _warn_if_short_of_cpus(serve_cfg: ServeConfig, num_models: int) -> None:
    """Say so when the replicas Serve starts with need more CPUs than the cluster has now: they wait (for an
    autoscaler to add nodes, or forever), and the start blocks with them."""
    need = num_models * serve_cfg.autoscaling.min_replicas * serve_cfg.num_cpus_per_replica
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        log.warning("serve: %d model(s) x serve.autoscaling.min_replicas=%d x serve.num_cpus_per_replica=%g need %g "
                    "CPUs, the cluster has %g now; their replicas wait for more (lower serve.num_cpus_per_replica on a "
                    "small cluster)", num_models, serve_cfg.autoscaling.min_replicas, serve_cfg.num_cpus_per_replica,
                    need, have)


def _check_port_free(host: str, port: int) -> None:
    """Fail early on a port in use: Serve's proxy would otherwise retry the bind forever."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise RaylmError(f"serve.port: {host}:{port} is already in use; choose another with --serve.port=N")
            # Another errno (an address of another node, say): the proxy will report it itself.


def _base_url(serve_cfg: ServeConfig) -> str:
    """The URL a client on this machine reaches the proxy at (a wildcard bind answers on loopback)."""
    host = serve_cfg.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{serve_cfg.port}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt
