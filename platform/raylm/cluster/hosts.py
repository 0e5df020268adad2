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
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
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


def check_prerequisites() -> None:
    """Fail with one line when this machine cannot host namespaced Ray nodes: not root, or no `ip`."""
    if os.geteuid() != 0:
        raise RaylmError("multihost cluster: needs root (creating network namespaces and links); run as root")
    if ip_binary() is None:
        raise RaylmError("multihost cluster: iproute2's `ip` command not found (apt-get install iproute2)")


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
