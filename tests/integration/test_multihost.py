"""A real multi-host Ray cluster on one machine: a head and two worker hosts, each in its own network namespace.

One cluster serves every check. Clients run in subprocesses with the cluster's env: this pytest process
may hold the session's shared local Ray, and a process connects to one Ray only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylm.cluster import multihost
from raylm.cluster.hosts import ip_binary, pick_subnet, used_networks
from raylm.cluster.multihost import MultiHostCluster
from raylm.cluster.processes import cluster_pids, process_running
from raylm.errors import RaylmError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(ip_binary() is None, reason="iproute2's `ip` is not installed"),
]

CLIENT = r'''
import json, os, sys, tempfile
import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
import ray.train
from ray.train import RunConfig, ScalingConfig, Checkpoint
from ray.train.torch import TorchConfig, TorchTrainer

ray.init(logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()

task_ips = ray.get([
    where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
    for n in nodes
])

def train_loop(config):
    rank = ray.train.get_context().get_world_rank()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)  # gloo over TCP between the two worker hosts
    ips = [None] * dist.get_world_size()
    dist.all_gather_object(ips, ray.util.get_node_ip_address())
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "result.json"), "w") as f:
                json.dump({"sum": value.item(), "ips": ips, "master_addr": os.environ["MASTER_ADDR"]}, f)
            ray.train.report({"sum": value.item()}, checkpoint=Checkpoint.from_directory(d))
    else:
        ray.train.report({"sum": value.item()})

trainer = TorchTrainer(
    train_loop,
    torch_config=TorchConfig(backend="gloo"),
    scaling_config=ScalingConfig(num_workers=2, use_gpu=False, placement_strategy="STRICT_SPREAD",
                                 label_selector={"raylm-role": "worker"}, resources_per_worker={"CPU": 1}),
    run_config=RunConfig(storage_path=sys.argv[1], name="allreduce"),
)
result = trainer.fit()
with result.checkpoint.as_directory() as d:
    train = json.load(open(os.path.join(d, "result.json")))

# A Ray job through the Jobs API on the head, with the token raylm submit sends.
import time
from raylm.cluster.submit import jobs_client, submit_with_retry
client, address = jobs_client(sys.argv[2])
job = submit_with_retry(client, "python -c \"import ray; ray.init(); print('JOB', len([n for n in ray.nodes() if n['Alive']]))\"",
                         {}, address)
while str(client.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
    time.sleep(1)
print("RESULT " + json.dumps({
    "nodes": [{"ip": n["NodeManagerAddress"], "labels": n.get("Labels", {})} for n in nodes],
    "task_ips": task_ips,
    "train": train,
    "job": {"status": str(client.get_job_status(job).value), "logs": client.get_job_logs(job)},
}))
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Start the cluster, run the client against it, stop it; the figures every test checks."""
    storage = tmp_path_factory.mktemp("multihost")
    t0 = time.time()
    cluster = MultiHostCluster(num_workers=2, cpus_per_node=1)
    with cluster:
        up_s = time.time() - t0
        live = {
            "name": cluster.name, "address": cluster.address, "head_ip": cluster.head_ip,
            "worker_ips": cluster.worker_ips, "env": cluster.env, "temp_root": cluster.state.temp_root,
            "namespaces": list(cluster.state.namespaces), "bridge": cluster.state.bridge,
            "pids": cluster_pids(cluster.name),
        }
        env = {**os.environ, **cluster.env}
        client = subprocess.run([sys.executable, "-c", CLIENT, str(storage), cluster.jobs_address], env=env,
                                capture_output=True, text=True, timeout=600)
        # A stage with a local workdir on this cluster, whose nodes are other hosts: refused before any task runs.
        local_workdir = subprocess.run([sys.executable, "-m", "raylm.cli", "prepare", f"--run.workdir={storage / 'run'}"],
                                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        t1 = time.time()
    down_s = time.time() - t1
    print(f"multihost cluster: up {up_s:.1f} s, down {down_s:.1f} s")
    lines = [line for line in client.stdout.splitlines() if line.startswith("RESULT ")]
    assert client.returncode == 0 and lines, client.stdout[-3000:] + client.stderr[-5000:]
    refused = {"rc": local_workdir.returncode, "lines": [l for l in local_workdir.stderr.splitlines() if l.startswith("raylm ")],
               "written": (storage / "run").exists()}  # fmt: skip
    return {**live, "result": json.loads(lines[-1][len("RESULT "):]), "local_workdir": refused}


@pytest.mark.slow
def test_three_alive_nodes_with_distinct_addresses(run):
    nodes = run["result"]["nodes"]
    ips = sorted(n["ip"] for n in nodes)
    assert len(nodes) == 3
    assert ips == sorted([run["head_ip"], *run["worker_ips"]])
    assert len(set(ips)) == 3
    assert all(ip.startswith(run["head_ip"].rsplit(".", 1)[0] + ".") for ip in ips)  # one private /24
    assert sorted(n["labels"].get("raylm-role") for n in nodes) == ["head", "worker", "worker"]
    assert run["address"] == f"{run['head_ip']}:{run['address'].rsplit(':', 1)[1]}"
    assert run["env"]["RAY_ADDRESS"] == run["address"] and len(run["env"]["RAY_AUTH_TOKEN"]) == 64


@pytest.mark.slow
def test_a_task_runs_on_each_host(run):
    assert run["result"]["task_ips"] == [n["ip"] for n in run["result"]["nodes"]]


@pytest.mark.slow
def test_gloo_all_reduce_across_the_two_worker_hosts(run):
    train = run["result"]["train"]
    assert train["sum"] == 3.0  # ranks contribute 1 + 2
    assert sorted(train["ips"]) == sorted(run["worker_ips"])  # one Train worker per worker host, none on the head
    assert train["master_addr"] in run["worker_ips"]


@pytest.mark.slow
def test_a_ray_job_through_the_jobs_api_sees_all_hosts(run):
    job = run["result"]["job"]
    assert job["status"] == "SUCCEEDED", job["logs"][-2000:]
    assert "JOB 3" in job["logs"]


@pytest.mark.slow
def test_a_local_workdir_on_hosts_of_other_machines_is_one_line(run):
    refused = run["local_workdir"]
    assert refused["rc"] == 2 and not refused["written"]  # a config error
    assert len(refused["lines"]) == 1, refused["lines"]
    line = refused["lines"][0]
    assert line.startswith("raylm prepare: error: run.workdir: ") and "nodes on other machines" in line
    listed = line.split("nodes on other machines (")[1].split(")")[0].split(", ")
    assert sorted(listed) == sorted(run["worker_ips"])  # the worker hosts; the head is this machine
    assert "run.workdir=s3://" in line and "run.shared_filesystem=true" in line


@pytest.mark.slow
def test_everything_is_cleaned_up(run):
    assert len(run["pids"]) >= 6  # a raylet and GCS or agents per node, all found by their marker while up
    assert cluster_pids(run["name"]) == []
    alive = [pid for pid in run["pids"] if process_running(pid)]
    assert alive == []
    ip = ip_binary()
    namespaces = subprocess.run([ip, "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in namespaces for ns in run["namespaces"])
    links = subprocess.run([ip, "-o", "link", "show"], capture_output=True, text=True).stdout
    assert run["name"] not in links
    addrs = subprocess.run([ip, "-4", "addr"], capture_output=True, text=True).stdout
    assert run["head_ip"] + "/" not in addrs
    assert not Path(run["temp_root"]).exists()


def test_cli_refuses_a_non_root_user_with_one_line():
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    if shutil.which("setpriv") is None or subprocess.run([*nobody, "-c", "pass"]).returncode != 0:
        pytest.skip("cannot run this Python as user nobody (no setpriv, or the environment is not readable)")
    r = subprocess.run([*nobody, "-m", "raylm.cli", "cluster", "up", "--workers", "1"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": "/tmp"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "raylm cluster: error: multihost cluster: needs root (creating network namespaces and links); run as root"
    ]


def test_down_of_an_unknown_cluster_is_a_clear_no_op():
    assert multihost.down("rlmzzzz") is False
    with pytest.raises(RaylmError, match="not a multihost cluster name"):
        multihost.down("eth0")


def test_the_subnet_overlaps_nothing_on_this_machine():
    net = pick_subnet(None, num_workers=2)
    assert net.is_private and net.prefixlen == 24
    assert not any(used.overlaps(net) for used in used_networks())


@pytest.mark.parametrize("subnet, message", [
    ("127.0.0.0/24", "overlaps 127.0.0.0/8, already on this machine"),
    ("8.8.8.0/24", "must be a private IPv4 network"),
    ("10.213.0.0/30", "has no room for 3 hosts"),
    ("10.213.0.300/24", "is not a network"),
])
def test_a_bad_subnet_is_one_clear_line(subnet, message):
    with pytest.raises(RaylmError, match=message):
        pick_subnet(subnet, num_workers=2)
