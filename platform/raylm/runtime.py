"""Connect the current process to Ray: a given cluster, RAY_ADDRESS, or a local Ray started on demand."""

from __future__ import annotations

import logging
import os
import socket

from raylm.errors import RaylmError, first_line


IDLE_WORKERS_KEPT = 2
"""Idle Ray workers a local Ray keeps alive: the read tasks of one train worker's token stream
(raylm.train.ingest.TokenStream runs this many at a time)."""

_LOCAL_SYSTEM_CONFIG = {
    "idle_worker_killing_time_threshold_ms": 10_000,
    "num_workers_soft_limit": IDLE_WORKERS_KEPT,
    "prestart_worker_first_driver": False,
}
"""Ray settings for a local Ray this process starts (and for `ray start` clusters raylm starts itself;
cluster/local/start_head.sh spells the same JSON out, being a shell script).

Every Ray worker process wakes 100 times a second, busy or idle (the core worker's 10 ms signal
check), and costs about 0.7% of a core here. On a machine whose cores all run training threads,
each idle process takes that from training. Measured on 2 cores (a 1-worker `raylm train` against a
bare PyTorch loop, alternating runs): 0.846 / 0.889 / 0.888 with Ray's defaults (one worker prestarted
per logical CPU, as many kept idle forever), 0.936 / 0.905 / 0.978 with these settings.

- No worker is prestarted when the driver connects; tasks and actors start the ones they need.
- Idle workers beyond IDLE_WORKERS_KEPT (the read tasks that feed a train worker) are
  killed after 10 s idle. Ray's default kills them after 1 s once more than one per CPU are idle:
  the prepare stage runs many short Ray Data executions back to back, and paid for fresh worker
  processes importing pyarrow and raylm in each (63 processes and 164 s for a 408-document prepare
  on 2 cores, against 14 and 42 s when idle workers stay warm). 10 s covers the gaps between them.
"""


def local_system_config() -> dict:
    """A fresh copy of the settings above, for `ray.init(_system_config=...)` or `ray start --system-config`.

    A copy each time: ray.init adds its object spilling settings (this session's directory) to the
    dict it is given, which a cluster started later from the same process must not inherit.
    """
    return dict(_LOCAL_SYSTEM_CONFIG)


LOCAL_ENV_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}
"""Environment defaults for a local Ray this process starts (its processes inherit the driver's environment).

- A single machine has no node that can be preempted, so Ray Train's preemption watcher (one more
  actor polling every 5 s) is left out.
- Ray's log monitor, which forwards the workers' output to the driver, lists the log directory every
  0.1 s while it holds under this many files, every 0.5 s above. With 0, always every 0.5 s: a new
  worker's first lines may show 0.4 s later, and the monitor uses 0.7% of a core here instead of 1.5%.
"""


def nodes_elsewhere() -> list[str]:
    """The addresses of the connected cluster's alive nodes that are not on this machine, sorted."""
    import psutil  # a dependency of Ray's
    import ray

    here = {a.address for addresses in psutil.net_if_addrs().values() for a in addresses}
    return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - here)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` (or RAY_ADDRESS); without either, start a local Ray in this process.

    A local Ray gets at least 4 logical CPUs so that Ray Data tasks can feed Ray Train workers
    on a 2-core machine; the OS shares the real cores between them.
    """
    import ray  # seconds of imports: raylm.stages imports this module for `raylm --help` too

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RaylmError(f"cannot connect to Ray cluster at {address}: {first_line(e)}") from None
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    for key, value in LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)  # the driver's env: Ray Train hands it to its controller
    # address="local": always a new local instance, never a stray `ray start` cluster found in /tmp/ray.
    ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING, _system_config=local_system_config())


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on a host:port where nothing listens; ray.init would retry for minutes."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form only Ray understands
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RaylmError(f"cannot connect to Ray cluster at {address}: {e.strerror or e}") from None
