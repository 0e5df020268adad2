"""Finding and killing a multihost cluster's processes, by the markers in their environment.

Every node's `ray start` gets the cluster's name and the node's (head, w0, w1, ...) in its
environment, and its raylet, GCS, agents and workers inherit them. Stopping a cluster never runs
`ray stop`: that stops every Ray on the machine (the hosts' namespaces share the process table),
so each cluster kills only the processes that carry its name.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARKER_ENV = "RAYLM_MULTIHOST_CLUSTER"  # in the environment of every process of a cluster: its name
NODE_MARKER_ENV = "RAYLM_MULTIHOST_NODE"  # and its node: head, w0, w1, ...


def cluster_pids(name: str, node: str | None = None) -> list[int]:
    """Processes of one cluster (or one of its nodes), by the markers they inherit from their node's `ray start`.

    Not by command line: Ray renames many of its processes (ray::DashboardAgent, ray::IDLE).
    """
    marker = f"\0{MARKER_ENV}={name}\0".encode()
    node_marker = f"\0{NODE_MARKER_ENV}={node}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = b"\0" + (entry / "environ").read_bytes()
        except OSError:
            continue  # gone already, or not ours to read
        if marker in environ and (node is None or node_marker in environ):
            pids.append(int(entry.name))
    return pids


def raylet_running(name: str, node: str) -> bool:
    """Whether a node's raylet process is alive (registering late, say) rather than gone."""
    for pid in cluster_pids(name, node):
        try:
            if b"/raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes() and process_running(pid):
                return True
        except OSError:
            pass
    return False


def kill_cluster_processes(name: str, node: str | None = None, grace_s: float = 3.0) -> None:
    """SIGTERM this cluster's processes, then SIGKILL what is left after `grace_s`.

    Raylets, agents and workers exit within a second of SIGTERM; the GCS and the autoscaler monitor
    linger for more than 10 s, and a cluster that is being thrown away has no state worth that wait.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = cluster_pids(name, node)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while time.time() < deadline and any(process_running(pid) for pid in pids):
            time.sleep(0.2)


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process: neither gone nor a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")  # the state field follows "(comm)"
