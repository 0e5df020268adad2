"""A multihost cluster's saved state: how another process (`raylm cluster status/down`) finds it again.

Each cluster keeps a temp dir, /tmp/<name>, that holds its state file and each node's Ray temp dir
and `ray start` log. The state file holds the cluster's auth token, so only its owner reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

PREFIX = "rlm"  # every name a multihost cluster creates starts with it: rlm<4 hex>..., so `down` finds leftovers
STATE_FILE = "cluster.json"


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
    private_disks: bool = False  # each worker host in its own mount namespace (hosts.private_disk_command)

    @property
    def address(self) -> str:
        return f"{self.head_ip}:{self.gcs_port}"

    @property
    def jobs_address(self) -> str:
        return f"http://{self.head_ip}:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def cluster_dir(name: str) -> Path:
    """The temp dir of cluster `name`: its state file, its nodes' Ray temp dirs and `ray start` logs."""
    return Path(f"/tmp/{name}")


def write_state(state: ClusterState) -> None:
    """Save `state` to its cluster's temp dir, replacing what was there in one step."""
    path = Path(state.temp_root) / STATE_FILE
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.chmod(tmp, 0o600)  # it holds the cluster's auth token
    tmp.replace(path)


def read_state(name: str) -> ClusterState | None:
    """The saved state of cluster `name`, or None when it has none (never started, or already down)."""
    path = cluster_dir(name) / STATE_FILE
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
