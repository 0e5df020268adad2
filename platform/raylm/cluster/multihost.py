"""A real multi-host Ray cluster on one Linux machine, for tests, benchmarks and trying things out.

The head runs in the root network namespace on a bridge; each worker host runs in its own network
namespace with its own IP address, joined to the bridge by a veth pair. Every node is a separate
`ray start` with its own raylet, object store and temp dir, and all traffic between them (GCS,
object transfers, gloo collectives) goes over TCP between distinct addresses, as between machines:

    root namespace                      namespace rlmXXXX-w0          namespace rlmXXXX-w1
    bridge rlmXXXXbr 10.213.K.1 (head)  rlmXXXXn0 10.213.K.2 (host)   rlmXXXXn1 10.213.K.3 (host)

The namespaces have no default route: traffic stays on this machine, between these addresses.
The cluster uses Ray's token authentication with a fresh token of its own (`.env` carries it);
~/.ray/auth_token is neither read nor written.

    with MultiHostCluster(num_workers=2, cpus_per_node=2) as cluster:
        subprocess.run([sys.executable, "client.py"], env={**os.environ, **cluster.env})

`raylm cluster up/status/down` (and cluster/multihost.sh) start one that outlives the command.
Needs root (namespaces, links) and iproute2's `ip`. Stopping never runs `ray stop`: that stops
every Ray on the machine (namespaces share the process table), so each cluster kills only the
processes that carry its name in their environment (RAYLM_MULTIHOST_CLUSTER).
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raylm.errors import RaylmError
from raylm.runtime import local_system_config

log = logging.getLogger(__name__)

PREFIX = "rlm"  # every name this module creates starts with it: rlm<4 hex>..., so `down` finds leftovers
STATE_FILE = "cluster.json"
# Private /24s tried in order; the first that overlaps no address or route on this machine is used.
CANDIDATE_SUPERNET = ipaddress.ip_network("10.213.0.0/16")
LOCK_PATH = "/tmp/raylm-multihost.lock"  # serializes subnet choice between clusters started at once
MARKER_ENV = "RAYLM_MULTIHOST_CLUSTER"  # in the environment of every process of a cluster: its name
NODE_MARKER_ENV = "RAYLM_MULTIHOST_NODE"  # and its node: head, w0, w1, ...
WORKER_AGENT_PORT = 52365  # Ray's default dashboard agent port; the next three serve the other agent ports
SLOW_RAYLET = "The current node timed out during startup"  # Ray's message when a raylet registers late
WORKER_LABEL = "raylm-role"  # node label: "head" or "worker", for label_selector / scheduling


@dataclass
class ClusterState:
    """What `down` and `status` need to find a cluster again from another process."""

    name: str
    subnet: str
    head_ip: str
    worker_ips: list[str]
    gcs_port: int
    dashboard_port: int
    token: str
    temp_root: str
    bridge: str
    namespaces: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def jobs_address(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


class MultiHostCluster:
    """A head plus `num_workers` worker hosts, each in its own network namespace; a context manager.

    Attributes once started: `name`, `address` (GCS, for `ray.init`), `jobs_address` (Jobs API and
    dashboard, for `raylm submit`), `head_ip`, `worker_ips`, `env` (RAY_ADDRESS and the auth token a
    client needs). Nodes carry the label `raylm-role=head|worker`. Leaving the `with` block (or
    `stop()`) kills every process of this cluster and deletes its namespaces, links and temp dir,
    also after errors.
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
        if not (self.name.startswith(PREFIX) and len(self.name) <= 8 and self.name.isalnum()):
            raise RaylmError(f"multihost cluster: name {self.name!r} must be '{PREFIX}' + up to 5 letters/digits")
        self.start_timeout_s = start_timeout_s
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
        """Create the network, start the head and every worker host, wait until all nodes are alive."""
        check_prerequisites()
        t0 = time.time()
        try:
            self.state = _create_network(self.name, self.num_workers, self.requested_subnet)
            _write_state(self.state)
            for attempt in range(3):
                try:
                    _start_head(self.state, self.head_cpus, self.object_store_mb)
                    break
                except RaylmError:  # most likely a picked port taken since: pick again
                    if attempt == 2:
                        raise
                    _kill_cluster_processes(self.name)
            # One after another: started side by side on 2 cores, their agents start slower than the raylet waits.
            for i in range(self.num_workers):
                _start_worker(self.state, i, self.cpus_per_node, self.object_store_mb)
            self._wait_restarting_lost_workers()
        except BaseException:
            if self.state is not None:
                try:
                    _keep_logs(self.state)
                except OSError as e:
                    log.warning("multihost cluster %s: could not keep its logs: %s", self.name, e)
            self.stop()
            raise
        log.info("multihost cluster %s: head %s, workers %s, up in %.1f s",
                 self.name, self.state.address, ", ".join(self.state.worker_ips), time.time() - t0)
        return self

    def _wait_restarting_lost_workers(self, attempts: int = 3) -> None:
        """Wait for every node; start again a worker host whose raylet died while starting.

        A raylet waits 15 s (fixed in Ray) for its dashboard agent to report a port and aborts
        otherwise; on a busy 2-core machine the agent's imports can take longer. A second start
        finds them in the page cache.
        """
        state = self._started()
        for attempt in range(attempts):
            last = attempt == attempts - 1
            alive = _wait_for_nodes(state, self.num_workers + 1, self.start_timeout_s / attempts, fail=last)
            lost = [i for i, ip in enumerate(state.worker_ips) if ip not in alive and not _raylet_running(self.name, f"w{i}")]
            if len(alive) >= self.num_workers + 1 or last:
                return
            for i in lost:
                log.warning("multihost cluster %s: worker host w%d lost while starting; starting it again", self.name, i)
                _kill_cluster_processes(self.name, node=f"w{i}")
                _start_worker(state, i, self.cpus_per_node, self.object_store_mb, retry=attempt + 1)

    def stop(self) -> None:
        """Kill this cluster's processes, delete its namespaces, links and temp dir. Safe to call twice."""
        down(self.name)
        self.state = None


def _unused_name() -> str:
    """rlm + 4 random hex digits, not taken by a cluster on this machine (two may run at once)."""
    while True:
        name = f"{PREFIX}{secrets.token_hex(2)}"
        if not Path(f"/tmp/{name}").exists():
            return name


def check_prerequisites() -> None:
    """Fail with one line when this machine cannot host namespaced Ray nodes: not root, or no `ip`."""
    if os.geteuid() != 0:
        raise RaylmError("multihost cluster: needs root (creating network namespaces and links); run as root")
    if _ip_binary() is None:
        raise RaylmError("multihost cluster: iproute2's `ip` command not found (apt-get install iproute2)")


def _ip_binary() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [_ip_binary() or "ip", *(["-n", netns] if netns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        what = "network namespaces are not permitted here" if "not permitted" in err.lower() else "failed"
        raise RaylmError(f"multihost cluster: `{' '.join(cmd)}` {what}: {err}")
    return r


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network on this machine's interfaces and routes, which a new subnet must not overlap."""
    nets = []
    for entry in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for a in entry.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    for route in json.loads(_ip("-j", "-4", "route").stdout or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def _pick_subnet(requested: str | None, num_workers: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    if requested is not None:
        try:
            net = ipaddress.ip_network(requested)
        except ValueError as e:
            raise RaylmError(f"multihost cluster: subnet {requested!r} is not a network: {e}") from None
        if not net.is_private or net.version != 4:
            raise RaylmError(f"multihost cluster: subnet {requested} must be a private IPv4 network")
        clash = next((u for u in used if u.overlaps(net)), None)
        if clash is not None:
            raise RaylmError(f"multihost cluster: subnet {requested} overlaps {clash}, already on this machine")
        if net.num_addresses - 2 < num_workers + 1:
            raise RaylmError(f"multihost cluster: subnet {requested} has no room for {num_workers + 1} hosts")
        return net
    for net in CANDIDATE_SUPERNET.subnets(new_prefix=24):
        if not any(u.overlaps(net) for u in used):
            return net
    raise RaylmError(f"multihost cluster: no free /24 left in {CANDIDATE_SUPERNET}; pass subnet=")


def _create_network(name: str, num_workers: int, requested_subnet: str | None) -> ClusterState:
    """The bridge (head address) and one namespace per worker host, linked by veth pairs; loopback up."""
    bridge = f"{name}br"
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close; two clusters never pick the same /24
        net = _pick_subnet(requested_subnet, num_workers)
        hosts = net.hosts()
        head_ip = str(next(hosts))
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{head_ip}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
    state = ClusterState(name=name, subnet=str(net), head_ip=head_ip, worker_ips=[], gcs_port=0,
                         dashboard_port=0, token=secrets.token_hex(32), temp_root=f"/tmp/{name}", bridge=bridge)
    Path(state.temp_root).mkdir(mode=0o700, exist_ok=True)
    for i in range(num_workers):
        ns, host_end, ns_end, ip = f"{name}-w{i}", f"{name}h{i}", f"{name}n{i}", str(next(hosts))
        _ip("netns", "add", ns)
        state.namespaces.append(ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", ns)
        _ip("link", "set", host_end, "master", bridge)
        _ip("link", "set", host_end, "up")
        _ip("addr", "add", f"{ip}/{net.prefixlen}", "dev", ns_end, netns=ns)
        _ip("link", "set", ns_end, "up", netns=ns)
        _ip("link", "set", "lo", "up", netns=ns)
        state.worker_ips.append(ip)
    return state


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


def _ray_start(state: ClusterState, args: list[str], env: dict[str, str], log_name: str, netns: str | None) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [*([_ip_binary() or "ip", "netns", "exec", netns] if netns else []), ray_bin, "start", *args]
    log_path = Path(state.temp_root) / f"{log_name}.log"
    with open(log_path, "w") as out:
        # A new session: the nodes must not die with the terminal of `raylm cluster up`.
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                           stdin=subprocess.DEVNULL)
    text = log_path.read_text(errors="replace")
    if r.returncode != 0 and SLOW_RAYLET in text:
        # `ray start` gives a raylet 30 s (hard-coded) to register and then exits, leaving it running;
        # on a loaded machine it registers later, which _wait_for_nodes sees.
        log.warning("multihost cluster %s: %s slow to register with the GCS; still waiting", state.name, log_name)
    elif r.returncode != 0:
        tail = [line for line in text.splitlines() if line.strip()][-1:]
        raise RaylmError(f"multihost cluster {state.name}: `ray start` for {log_name} failed "
                         f"(exit {r.returncode}): {tail[0] if tail else ''}")


def _start_head(state: ClusterState, cpus: int, object_store_mb: int) -> None:
    # The head shares the root namespace's ports with any other Ray here: every listening port is a free one,
    # and named (see _start_worker for why the agents' ports must be).
    state.gcs_port, state.dashboard_port, *agents = _free_ports(7)
    _write_state(state)
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


def _start_worker(state: ClusterState, i: int, cpus: int, object_store_mb: int, retry: int = 0) -> None:
    # Inside its own namespace a worker host has the whole port space to itself, so fixed ports are free.
    # Naming the agents' ports spares the raylet waiting for the agents to report them, except the
    # dashboard agent's HTTP port, which `ray start` does not pass on (see _wait_restarting_lost_workers).
    agent_ports = [f"--dashboard-agent-listen-port={WORKER_AGENT_PORT}",
                   f"--dashboard-agent-grpc-port={WORKER_AGENT_PORT + 1}",
                   f"--metrics-export-port={WORKER_AGENT_PORT + 2}",
                   f"--runtime-env-agent-port={WORKER_AGENT_PORT + 3}"]
    args = [
        f"--address={state.address}", f"--node-ip-address={state.worker_ips[i]}", *agent_ports,
        f"--num-cpus={cpus}", f"--object-store-memory={object_store_mb * 2**20}",
        # A retry gets a fresh temp dir: nothing of the lost raylet (sockets, port files) in its way.
        f"--temp-dir={state.temp_root}/w{i}{f'-retry{retry}' if retry else ''}", f"--labels={WORKER_LABEL}=worker",
        "--disable-usage-stats",
    ]
    _ray_start(state, args, _node_env(state, f"w{i}", f"{state.name}n{i}"), f"w{i}-{retry}", netns=state.namespaces[i])


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


def _wait_for_nodes(state: ClusterState, want: int, timeout_s: float, fail: bool = True) -> list[str]:
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


def _keep_logs(state: ClusterState) -> None:
    """Copy a failed cluster's logs (`ray start` output, each node's Ray logs) to a path `down` leaves alone."""
    kept = Path(f"/tmp/raylm-multihost-failed/{state.name}")
    files = [p for p in Path(state.temp_root).rglob("*") if p.is_file() and not p.is_symlink()
             and p.suffix in (".log", ".out", ".err") and "runtime_resources" not in p.parts]
    for path in files:
        dest = kept / path.relative_to(state.temp_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    log.warning("multihost cluster %s failed to start; its logs are in %s", state.name, kept)


def _write_state(state: ClusterState) -> None:
    path = Path(state.temp_root) / STATE_FILE
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.chmod(tmp, 0o600)  # it holds the cluster's auth token
    tmp.replace(path)


def read_state(name: str) -> ClusterState | None:
    """The saved state of cluster `name`, or None when it has none (never started, or already down)."""
    path = Path(f"/tmp/{name}") / STATE_FILE
    if not path.is_file():
        return None
    return ClusterState(**json.loads(path.read_text()))


def list_clusters() -> list[ClusterState]:
    """Every multihost cluster on this machine with saved state."""
    found = []
    for path in sorted(Path("/tmp").glob(f"{PREFIX}*/{STATE_FILE}")):
        state = read_state(path.parent.name)
        if state is not None:
            found.append(state)
    return found


def _cluster_pids(name: str, node: str | None = None) -> list[int]:
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


def _raylet_running(name: str, node: str) -> bool:
    """Whether a node's raylet process is alive (registering late, say) rather than gone."""
    for pid in _cluster_pids(name, node):
        try:
            if b"/raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes() and process_running(pid):
                return True
        except OSError:
            pass
    return False


def _kill_cluster_processes(name: str, node: str | None = None, grace_s: float = 3.0) -> None:
    """SIGTERM this cluster's processes, then SIGKILL what is left after `grace_s`.

    Raylets, agents and workers exit within a second of SIGTERM; the GCS and the autoscaler monitor
    linger for more than 10 s, and a cluster that is being thrown away has no state worth that wait.
    """
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _cluster_pids(name, node)
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


def down(name: str) -> bool:
    """Tear down cluster `name` and any leftovers of it: processes, namespaces, links, temp dir.

    Works from any process and after a crash: every name derives from `name`. Returns whether
    anything was found.
    """
    if not (name.startswith(PREFIX) and name.isalnum() and len(name) <= 8):
        raise RaylmError(f"multihost cluster: {name!r} is not a multihost cluster name ({PREFIX} + up to 5 chars)")
    temp_root = f"/tmp/{name}"
    found = Path(temp_root).exists()
    _kill_cluster_processes(name)
    if _ip_binary() is not None and os.geteuid() == 0:
        for ns in _ip("netns", "list", check=False).stdout.split("\n"):
            ns = ns.split(" ", 1)[0].strip()
            if ns.startswith(f"{name}-w"):
                _ip("netns", "delete", ns, check=False)  # takes its veth end, and so the pair, with it
                found = True
        for link in json.loads(_ip("-j", "link", "show", check=False).stdout or "[]"):
            ifname = link.get("ifname", "")
            if ifname.startswith(name) and ifname[len(name):][:1] in ("b", "h"):
                _ip("link", "delete", ifname, check=False)
                found = True
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
