"""The hosts of a multihost cluster and the network between them: the head and one namespace per worker host.

The head runs in the root network namespace on a bridge; each worker host runs in its own network
namespace with its own IP address, joined to the bridge by a veth pair:

    root namespace                      namespace rlmXXXX-w0          namespace rlmXXXX-w1
    bridge rlmXXXXbr 10.213.K.1 (head)  rlmXXXXn0 10.213.K.2 (host)   rlmXXXXn1 10.213.K.3 (host)

The namespaces have no default route: traffic stays on this machine, between these addresses.
Every name derives from the cluster's (bridge <name>br, namespace <name>-w<i>, veth ends <name>h<i>
on the bridge and <name>n<i> in the namespace), so `remove_hosts` finds them from the name alone,
also after a crash. `_create_worker_host` makes a worker host what it is, and `command_on_host` is
how a process enters one. Needs root (namespaces, links) and iproute2's `ip`.

Machines of a real cluster share no disk either. With private disks (the default), a worker host's
`ray start` also runs in a mount namespace of its own (`private_disk_command`), where /tmp, /dev/shm
and the checkout are the host's own: a file one host writes there, another never sees.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from raylm.errors import RaylmError

# Private /24s tried in order; the first that overlaps no address or route on this machine is used.
CANDIDATE_SUPERNET = ipaddress.ip_network("10.213.0.0/16")
LOCK_PATH = "/tmp/raylm-multihost.lock"  # serializes subnet choice between clusters started at once


@dataclass
class Hosts:
    """One cluster's hosts as created: the head's address on the bridge, each worker host's namespace and address."""

    subnet: str
    bridge: str
    head_ip: str
    worker_ips: list[str]
    namespaces: list[str]


def check_prerequisites(private_disks: bool = False) -> None:
    """Fail with one line when this machine cannot host namespaced Ray nodes: not root, no `ip` (or `unshare`)."""
    if os.geteuid() != 0:
        raise RaylmError("multihost cluster: needs root (creating network namespaces and links); run as root")
    if ip_binary() is None:
        raise RaylmError("multihost cluster: iproute2's `ip` command not found (apt-get install iproute2)")
    if private_disks and shutil.which("unshare") is None:
        raise RaylmError("multihost cluster: util-linux's `unshare` not found (apt-get install util-linux); "
                         "or start it with shared disks")


def ip_binary() -> str | None:
    """The path of iproute2's `ip`, also where sbin is not on PATH; None when it is not installed."""
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [ip_binary() or "ip", *(["-n", netns] if netns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        what = "network namespaces are not permitted here" if "not permitted" in err.lower() else "failed"
        raise RaylmError(f"multihost cluster: `{' '.join(cmd)}` {what}: {err}")
    return r


def used_networks() -> list[ipaddress.IPv4Network]:
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


def pick_subnet(requested: str | None, num_workers: int) -> ipaddress.IPv4Network:
    """`requested` once checked (private IPv4, free here, room for every host), else the first free /24 we try."""
    used = used_networks()
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


def create_hosts(name: str, num_workers: int, requested_subnet: str | None) -> Hosts:
    """The bridge (head address) and `num_workers` worker hosts, each in its own namespace.

    A failure part way leaves what was made for `remove_hosts(name)` to delete.
    """
    bridge = f"{name}br"
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close; two clusters never pick the same /24
        net = pick_subnet(requested_subnet, num_workers)
        addresses = net.hosts()
        head_ip = str(next(addresses))
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{head_ip}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
    hosts = Hosts(subnet=str(net), bridge=bridge, head_ip=head_ip, worker_ips=[], namespaces=[])
    for i in range(num_workers):
        ip = str(next(addresses))
        hosts.namespaces.append(_create_worker_host(name, i, ip, net.prefixlen, bridge))
        hosts.worker_ips.append(ip)
    return hosts


def _create_worker_host(name: str, i: int, ip: str, prefixlen: int, bridge: str) -> str:
    """Worker host `i` of cluster `name`, its namespace returned: loopback up, a veth pair from the bridge to `ip`."""
    ns, host_end, ns_end = f"{name}-w{i}", f"{name}h{i}", worker_ifname(name, i)
    _ip("netns", "add", ns)
    _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
    _ip("link", "set", ns_end, "netns", ns)
    _ip("link", "set", host_end, "master", bridge)
    _ip("link", "set", host_end, "up")
    _ip("addr", "add", f"{ip}/{prefixlen}", "dev", ns_end, netns=ns)
    _ip("link", "set", ns_end, "up", netns=ns)
    _ip("link", "set", "lo", "up", netns=ns)
    return ns


def worker_ifname(name: str, i: int) -> str:
    """The interface of worker host `i` of cluster `name`: its end of the veth pair, holding its address."""
    return f"{name}n{i}"


def command_on_host(namespace: str | None, cmd: list[str]) -> list[str]:
    """`cmd` as run on the worker host in `namespace`, or unchanged for the head (None)."""
    if namespace is None:
        return cmd
    return [ip_binary() or "ip", "netns", "exec", namespace, *cmd]


def private_disk_command(disk_root: str, views: list[str], mkdirs: list[str], cmd: list[str]) -> list[str]:
    """`cmd` started in a mount namespace of its own whose /tmp, /dev/shm and `views` are private to it.

    /tmp is `disk_root`/tmp, bound over the machine's; /dev/shm a fresh tmpfs; each directory of `views` (the
    checkout, the working directory) a copy-on-write overlay on the machine's, its changes kept under
    `disk_root`, so the host reads what the machine has there and writes only to its own copy. `mkdirs` are
    made in the private /tmp before `cmd` runs. Every process `cmd` starts (a raylet, its workers) inherits
    the namespace; it ends with the last of them. `disk_root` is made here, from this namespace.
    """
    tmp = os.path.join(disk_root, "tmp")
    os.makedirs(tmp, exist_ok=True)
    os.chmod(tmp, 0o1777)  # as /tmp: every user may write, only the owner removes
    steps = []
    for k, view in enumerate(views):
        upper, work = os.path.join(disk_root, f"view{k}", "upper"), os.path.join(disk_root, f"view{k}", "work")
        os.makedirs(upper, exist_ok=True)
        os.makedirs(work, exist_ok=True)
        opts = f"lowerdir={view},upperdir={upper},workdir={work}"
        steps.append(f"mount -t overlay overlay -o {shlex.quote(opts)} {shlex.quote(view)}")
    # /tmp last: `disk_root` itself is under the machine's /tmp, hidden once the private one is bound over it.
    steps += [f"mount --bind {shlex.quote(tmp)} /tmp", "mount -t tmpfs -o mode=1777 tmpfs /dev/shm"]
    steps += [f"mkdir -p {shlex.quote(d)}" for d in mkdirs]
    script = " && ".join(steps) + ' && exec "$@"'
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", *cmd]


def private_views(cwd: str, checkout: str | None) -> list[str]:
    """The directories a host with a private disk gets its own copy of: the checkout raylm runs from and the
    working directory, the outermost ones only (an overlay over an overlay hides nothing more); never `/`."""
    dirs = sorted({os.path.realpath(d) for d in (cwd, checkout) if d} - {"/"})
    return [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]


def remove_hosts(name: str) -> bool:
    """Delete the namespaces and links of cluster `name`, found by their names; whether there were any.

    Needs root and `ip`; without them it does nothing.
    """
    if ip_binary() is None or os.geteuid() != 0:
        return False
    found = False
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
    return found
