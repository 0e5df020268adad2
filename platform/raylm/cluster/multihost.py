"""A real multi-host Ray cluster on one Linux machine, for tests, benchmarks and trying things out.

A head and worker hosts, each worker host in its own network namespace with its own IP address.
Every node is a separate `ray start` with its own raylet, object store and temp dir, and all traffic
between them (GCS, object transfers, gloo collectives) goes over TCP between distinct addresses, as
between machines. Nor do they share a disk: each worker host also has a mount namespace of its own,
with a private /tmp, /dev/shm and copy-on-write view of the checkout (`private_disks=False` shares
this machine's disk instead, as NFS would). The cluster uses Ray's token authentication with a fresh
token of its own (`.env` carries it); ~/.ray/auth_token is neither read nor written.

    with MultiHostCluster(num_workers=2, cpus_per_node=2) as cluster:
        subprocess.run([sys.executable, "client.py"], env={**os.environ, **cluster.env})

`raylm cluster up/status/down` (and cluster/multihost.sh) start one that outlives the command.
Needs root (namespaces, links) and iproute2's `ip`. Stopping never runs `ray stop`: that stops
every Ray on the machine (namespaces share the process table), so each cluster kills only the
processes that carry its name in their environment (RAYLM_MULTIHOST_CLUSTER).

This module is the cluster's life (start, wait, stop; up, down, status); its parts are

    hosts.py      the hosts and the network between them: namespaces, bridge, veth pairs, subnet
    ray_nodes.py  one `ray start` per node, and waiting until the nodes are alive
    processes.py  finding and killing a cluster's processes by the markers in their environment
    state.py      ClusterState and its file: how `status` and `down` find a cluster from another process
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import time

from raylm.cluster.hosts import check_prerequisites, create_hosts, remove_hosts
from raylm.cluster.processes import kill_cluster_processes, process_running, raylet_running
from raylm.cluster.ray_nodes import keep_logs, start_head, start_worker, wait_for_nodes
from raylm.cluster.state import PREFIX, ClusterState, cluster_dir, list_clusters, read_state, write_state
from raylm.errors import RaylmError

# What `raylm cluster`, tests and benchmarks use; some of it lives in the modules above.
__all__ = [
    "ClusterState",
    "MultiHostCluster",
    "check_prerequisites",
    "cluster_alive",
    "down",
    "list_clusters",
    "process_running",
    "read_state",
    "up",
]

log = logging.getLogger(__name__)


class MultiHostCluster:
    """A head plus `num_workers` worker hosts, each in its own network namespace; a context manager.

    Attributes once started: `name`, `address` (GCS, for `ray.init`), `jobs_address` (Jobs API and
    dashboard, for `raylm submit`), `head_ip`, `worker_ips`, `env` (RAY_ADDRESS and the auth token a
    client needs). Nodes carry the label `raylm-role=head|worker`. With `private_disks` (the default)
    each worker host has its own /tmp, /dev/shm and copy of the checkout and working directory, as
    separate machines have; the head is this machine. Leaving the `with` block (or `stop()`) kills every
    process of this cluster and deletes its namespaces, links and temp dir, also after errors.
    """

    def __init__(
        self,
        num_workers: int = 1,
        cpus_per_node: int = 2,
        subnet: str | None = None,
        head_cpus: int | None = None,
        object_store_mb: int = 256,
        name: str | None = None,
        start_timeout_s: float = 180.0,
        private_disks: bool = True,
    ):
        if not 1 <= num_workers <= 64:
            raise RaylmError(f"multihost cluster: num_workers must be between 1 and 64, got {num_workers}")
        if cpus_per_node < 0 or (head_cpus is not None and head_cpus < 0):
            raise RaylmError("multihost cluster: cpus_per_node and head_cpus must be >= 0")
        if object_store_mb < 80:
            raise RaylmError(f"multihost cluster: object_store_mb must be >= 80 (Ray's minimum), got {object_store_mb}")
        self.num_workers = num_workers
        self.cpus_per_node = cpus_per_node
        self.head_cpus = cpus_per_node if head_cpus is None else head_cpus
        self.object_store_mb = object_store_mb
        self.requested_subnet = subnet
        self.name = name or _unused_name()
        if not _is_cluster_name(self.name):
            raise RaylmError(f"multihost cluster: name {self.name!r} must be '{PREFIX}' + up to 5 letters/digits")
        self.start_timeout_s = start_timeout_s
        self.private_disks = private_disks
        self.state: ClusterState | None = None

    # The attributes users and benchmarks read.
    @property
    def address(self) -> str:
        return self._started().address

    @property
    def jobs_address(self) -> str:
        return self._started().jobs_address

    @property
    def head_ip(self) -> str:
        return self._started().head_ip

    @property
    def worker_ips(self) -> list[str]:
        return list(self._started().worker_ips)

    @property
    def env(self) -> dict[str, str]:
        return self._started().env

    def _started(self) -> ClusterState:
        if self.state is None:
            raise RaylmError(f"multihost cluster {self.name}: not started")
        return self.state

    def __enter__(self) -> "MultiHostCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "MultiHostCluster":
        """Create the hosts, start the head and every worker host, wait until all nodes are alive."""
        check_prerequisites(self.private_disks)
        t0 = time.time()
        try:
            self.state = self._create_hosts()
            write_state(self.state)
            for attempt in range(3):
                try:
                    start_head(self.state, self.head_cpus, self.object_store_mb)
                    break
                except RaylmError:  # most likely a picked port taken since: pick again
                    if attempt == 2:
                        raise
                    kill_cluster_processes(self.name)
            # One after another: started side by side on 2 cores, their agents start slower than the raylet waits.
            for i in range(self.num_workers):
                start_worker(self.state, i, self.cpus_per_node, self.object_store_mb)
            self._wait_restarting_lost_workers()
        except BaseException:
            if self.state is not None:
                try:
                    keep_logs(self.state)
                except OSError as e:
                    log.warning("multihost cluster %s: could not keep its logs: %s", self.name, e)
            self.stop()
            raise
        log.info("multihost cluster %s: head %s, workers %s, up in %.1f s",
                 self.name, self.state.address, ", ".join(self.state.worker_ips), time.time() - t0)
        return self

    def _create_hosts(self) -> ClusterState:
        """Make the temp dir and the hosts; return their state, with a fresh token and no ports yet."""
        temp_root = cluster_dir(self.name)
        temp_root.mkdir(mode=0o700, exist_ok=True)
        hosts = create_hosts(self.name, self.num_workers, self.requested_subnet)
        return ClusterState(name=self.name, subnet=hosts.subnet, head_ip=hosts.head_ip, worker_ips=hosts.worker_ips,
                            gcs_port=0, dashboard_port=0, token=secrets.token_hex(32), temp_root=str(temp_root),
                            bridge=hosts.bridge, namespaces=hosts.namespaces, private_disks=self.private_disks)

    def _wait_restarting_lost_workers(self, attempts: int = 3) -> None:
        """Wait for every node; start again a worker host whose raylet died while starting.

        A raylet waits 15 s (fixed in Ray) for its dashboard agent to report a port and aborts
        otherwise; on a busy 2-core machine the agent's imports can take longer. A second start
        finds them in the page cache.
        """
        state = self._started()
        for attempt in range(attempts):
            last = attempt == attempts - 1
            alive = wait_for_nodes(state, self.num_workers + 1, self.start_timeout_s / attempts, fail=last)
            lost = [i for i, ip in enumerate(state.worker_ips) if ip not in alive and not raylet_running(self.name, f"w{i}")]
            if len(alive) >= self.num_workers + 1 or last:
                return
            for i in lost:
                log.warning("multihost cluster %s: worker host w%d lost while starting; starting it again", self.name, i)
                kill_cluster_processes(self.name, node=f"w{i}")
                start_worker(state, i, self.cpus_per_node, self.object_store_mb, retry=attempt + 1)

    def stop(self) -> None:
        """Kill this cluster's processes, delete its namespaces, links and temp dir. Safe to call twice."""
        down(self.name)
        self.state = None


def _is_cluster_name(name: str) -> bool:
    return name.startswith(PREFIX) and name.isalnum() and len(name) <= 8


def _unused_name() -> str:
    """rlm + 4 random hex digits, not taken by a cluster on this machine (two may run at once)."""
    while True:
        name = f"{PREFIX}{secrets.token_hex(2)}"
        if not cluster_dir(name).exists():
            return name


def down(name: str) -> bool:
    """Tear down cluster `name` and any leftovers of it: processes, namespaces, links, temp dir.

    Works from any process and after a crash: every name derives from `name`. Returns whether
    anything was found.
    """
    if not _is_cluster_name(name):
        raise RaylmError(f"multihost cluster: {name!r} is not a multihost cluster name ({PREFIX} + up to 5 chars)")
    temp_root = cluster_dir(name)
    found = temp_root.exists()
    kill_cluster_processes(name)
    found = remove_hosts(name) or found
    shutil.rmtree(temp_root, ignore_errors=True)
    return found


def up(num_workers: int = 1, cpus_per_node: int = 2, **kwargs) -> MultiHostCluster:
    """Start a cluster that outlives this process (for `raylm cluster up`); `down(name)` ends it."""
    return MultiHostCluster(num_workers=num_workers, cpus_per_node=cpus_per_node, **kwargs).start()


def cluster_alive(state: ClusterState, timeout_s: float = 2.0) -> bool:
    """Whether the head's GCS port answers."""
    try:
        socket.create_connection((state.head_ip, state.gcs_port), timeout=timeout_s).close()
        return True
    except OSError:
        return False
