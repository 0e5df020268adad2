"""Connect the current process to Ray: a given cluster, RAY_ADDRESS, or a local Ray started on demand."""

from __future__ import annotations

import logging
import os
import socket

from raylm.errors import RaylmError


LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000}
"""Ray settings for a local Ray this process starts (and for `ray start` clusters raylm starts itself;
cluster/local/start_head.sh spells the same JSON out, being a shell script).

Ray kills a pooled worker process after 1 s idle once the pool holds more than one per CPU. A
stage runs many short Ray Data executions (the prepare stage about thirty), each of which then
paid for fresh worker processes importing pyarrow and raylm: 63 processes and 164 s for a
408-document prepare on 2 cores, against 14 processes and 42 s with idle workers kept 5 minutes.
"""


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` (or RAY_ADDRESS); without either, start a local Ray in this process.

    A local Ray gets at least 4 logical CPUs so that Ray Data tasks can feed Ray Train workers
    on a 2-core machine; the OS shares the real cores between them.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RaylmError(f"cannot connect to Ray cluster at {address}: {first}") from None
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # address="local": always a new local instance, never a stray `ray start` cluster found in /tmp/ray.
    ray.init(address="local", num_cpus=cpus, logging_level=logging.WARNING, _system_config=LOCAL_SYSTEM_CONFIG)


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
