"""The Ray nodes of a multihost cluster: one `ray start` per host, and waiting until they are alive.

The head listens on free ports of the root namespace; a worker host, alone in its namespace, on
fixed ones. Each node's environment carries the cluster's auth token, the markers `processes`
finds it by, and the host's own interface for gloo; every process of the node inherits it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from raylm.cluster.hosts import command_on_host, private_disk_command, private_views, worker_ifname
from raylm.cluster.processes import MARKER_ENV, NODE_MARKER_ENV
from raylm.cluster.state import ClusterState, write_state
from raylm.errors import RaylmError
from raylm.runtime import local_system_config

log = logging.getLogger(__name__)

WORKER_AGENT_PORT = 52365  # Ray's default dashboard agent port; the next three serve the other agent ports
SLOW_RAYLET = "The current node timed out during startup"  # Ray's message when a raylet registers late
WORKER_LABEL = "raylm-role"  # node label: "head" or "worker", for label_selector / scheduling


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free right now: all held open together, since a closed one can come back next."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_env(state: ClusterState, node: str, gloo_ifname: str) -> dict[str, str]:
    """Environment of one node's `ray start`, inherited by its raylet and so by every worker process."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(state.env)
    env.pop("RAY_ADDRESS")
    # Jobs and workers run this environment's `python`, as on a node where the user activated it.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # gloo binds to the address the hostname resolves to (127.0.0.1 here), which peers on other
    # hosts cannot reach; pin it to the node's own interface instead.
    env["GLOO_SOCKET_IFNAME"] = gloo_ifname
    # How `down` finds every process of this cluster (or of one node), renamed or orphaned.
    env[MARKER_ENV] = state.name
    env[NODE_MARKER_ENV] = node
    return env


def _ray_start(state: ClusterState, args: list[str], env: dict[str, str], log_name: str, netns: str | None,
               disk: tuple[str, list[str]] | None = None) -> None:
    """`ray start args` on the host of `netns` (the head's when None); with `disk` (its root, the dirs to make
    there), in that host's private mount namespace."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", *args]
    if disk is not None:
        cmd = private_disk_command(disk[0], private_views(os.getcwd(), checkout_root()), disk[1], cmd)
    cmd = command_on_host(netns, cmd)
    log_path = Path(state.temp_root) / f"{log_name}.log"
    with open(log_path, "w") as out:
        # A new session: the nodes must not die with the terminal of `raylm cluster up`.
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                           stdin=subprocess.DEVNULL)
    text = log_path.read_text(errors="replace")
    if r.returncode != 0 and SLOW_RAYLET in text:
        # `ray start` gives a raylet 30 s (hard-coded) to register and then exits, leaving it running;
        # on a loaded machine it registers later, which wait_for_nodes sees.
        log.warning("multihost cluster %s: %s slow to register with the GCS; still waiting", state.name, log_name)
    elif r.returncode != 0:
        tail = [line for line in text.splitlines() if line.strip()][-1:]
        raise RaylmError(f"multihost cluster {state.name}: `ray start` for {log_name} failed "
                         f"(exit {r.returncode}): {tail[0] if tail else ''}")


def start_head(state: ClusterState, cpus: int, object_store_mb: int) -> None:
    """Start the head node on the bridge's address, its ports picked now and saved in `state` (and its file)."""
    # The head shares the root namespace's ports with any other Ray here: every listening port is a free one,
    # and named (see start_worker for why the agents' ports must be).
    state.gcs_port, state.dashboard_port, *agents = _free_ports(7)
    write_state(state)
    args = [
        "--head", f"--node-ip-address={state.head_ip}", f"--port={state.gcs_port}",
        "--include-dashboard=true", f"--dashboard-host={state.head_ip}", f"--dashboard-port={state.dashboard_port}",
        f"--dashboard-agent-listen-port={agents[0]}", f"--dashboard-agent-grpc-port={agents[1]}",
        f"--runtime-env-agent-port={agents[2]}", f"--metrics-export-port={agents[3]}",
        f"--ray-client-server-port={agents[4]}",
        f"--num-cpus={cpus}", f"--object-store-memory={object_store_mb * 2**20}",
        f"--temp-dir={state.temp_root}/head", f"--labels={WORKER_LABEL}=head",
        "--disable-usage-stats", f"--system-config={json.dumps(local_system_config())}",
    ]
    _ray_start(state, args, _node_env(state, "head", state.bridge), "head", netns=None)


def start_worker(state: ClusterState, i: int, cpus: int, object_store_mb: int, retry: int = 0) -> None:
    """Start the node of worker host `i`, joined to the head; `retry` counts the starts after a lost one."""
    # Inside its own namespace a worker host has the whole port space to itself, so fixed ports are free.
    # Naming the agents' ports spares the raylet waiting for the agents to report them, except the
    # dashboard agent's HTTP port, which `ray start` does not pass on (see
    # MultiHostCluster._wait_restarting_lost_workers in multihost.py).
    # A retry gets a fresh temp dir: nothing of the lost raylet (sockets, port files) in its way.
    temp_dir = f"{state.temp_root}/w{i}{f'-retry{retry}' if retry else ''}"
    agent_ports = [f"--dashboard-agent-listen-port={WORKER_AGENT_PORT}",
                   f"--dashboard-agent-grpc-port={WORKER_AGENT_PORT + 1}",
                   f"--metrics-export-port={WORKER_AGENT_PORT + 2}",
                   f"--runtime-env-agent-port={WORKER_AGENT_PORT + 3}"]
    args = [
        f"--address={state.address}", f"--node-ip-address={state.worker_ips[i]}", *agent_ports,
        f"--num-cpus={cpus}", f"--object-store-memory={object_store_mb * 2**20}",
        f"--temp-dir={temp_dir}", f"--labels={WORKER_LABEL}=worker",
        "--disable-usage-stats",
    ]
    env = _node_env(state, f"w{i}", worker_ifname(state.name, i))
    disk = (host_disk(state, i), [temp_dir]) if state.private_disks else None
    _ray_start(state, args, env, f"w{i}-{retry}", netns=state.namespaces[i], disk=disk)


def host_disk(state: ClusterState, i: int) -> str:
    """Where worker host `i`'s private disk lives on the machine (its /tmp, its copies of the checkout)."""
    return os.path.join(state.temp_root, f"disk-w{i}")


def checkout_root() -> str | None:
    """The source checkout raylm runs from (an editable install), whose files a host reads; None if installed."""
    root = Path(__file__).resolve().parents[3]
    return str(root) if (root / "pyproject.toml").is_file() else None


_COUNT_ALIVE = """
import json, time, ray
ray.init(logging_level="ERROR")
deadline = time.time() + {timeout_s}
while True:
    alive = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
    if len(alive) >= {want} or time.time() > deadline:
        break
    time.sleep(0.5)
print(json.dumps(alive))
"""


def wait_for_nodes(state: ClusterState, want: int, timeout_s: float, fail: bool = True) -> list[str]:
    """The IPs of the alive nodes, once `want` are alive or after `timeout_s` (an error then, if `fail`).

    Seen by a real client in a subprocess: this process may be connected to another Ray.
    """
    code = _COUNT_ALIVE.format(timeout_s=timeout_s, want=want)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **state.env},
                       capture_output=True, text=True, timeout=timeout_s + 120)
    alive = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else []
    if len(alive) < want and fail:
        err = (r.stderr.strip().splitlines() or [""])[-1]
        raise RaylmError(f"multihost cluster {state.name}: {len(alive)} of {want} nodes alive after "
                         f"{timeout_s:.0f} s {err}".rstrip())
    return alive


def keep_logs(state: ClusterState) -> None:
    """Copy a failed cluster's logs (`ray start` output, each node's Ray logs) to a path `down` leaves alone."""
    kept = Path(f"/tmp/raylm-multihost-failed/{state.name}")
    files = [p for p in Path(state.temp_root).rglob("*") if p.is_file() and not p.is_symlink()
             and p.suffix in (".log", ".out", ".err") and "runtime_resources" not in p.parts]
    for path in files:
        dest = kept / path.relative_to(state.temp_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    log.warning("multihost cluster %s failed to start; its logs are in %s", state.name, kept)
