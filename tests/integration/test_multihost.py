"""A real multi-host Ray cluster on one machine: a head and two worker hosts, each in its own network namespace
and with a disk of its own (a mount namespace: private /tmp, /dev/shm and copy of the checkout), as separate
machines have. Storage that every host shares is an S3 server on the head's address.

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
from raylm.cluster.hosts import ip_binary, pick_subnet, private_views, used_networks
from raylm.cluster.multihost import MultiHostCluster
from raylm.cluster.processes import cluster_pids, process_running
from raylm.cluster.ray_nodes import host_disk
from raylm.demo import PIPELINE
from raylm.errors import RaylmError

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network and mount namespaces need root"),
    pytest.mark.skipif(ip_binary() is None, reason="iproute2's `ip` is not installed"),
]

CLIENT = r'''
import json, os, sys, tempfile, uuid
import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
import ray.train
from ray.train import RunConfig, ScalingConfig, Checkpoint
from ray.train.torch import TorchConfig, TorchTrainer
from raylm.storage import run_config_storage

# The bucket's settings travel with the job, as `raylm submit --forward-storage-credentials` sends them.
ray.init(logging_level="ERROR", runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
nodes = [n for n in ray.nodes() if n["Alive"]]
on = lambda node: NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)

@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()

task_ips = ray.get([where.options(scheduling_strategy=on(n)).remote() for n in nodes])

# A file written on the first worker host (in /tmp, /dev/shm and the working directory, the checkout), looked
# for on every host, then removed.
PROBE = f"raylm-probe-{uuid.uuid4().hex[:8]}"
probe_dirs = lambda: ("/tmp", "/dev/shm", os.getcwd())

@ray.remote(num_cpus=0)
def write_probe():
    for d in probe_dirs():
        with open(os.path.join(d, PROBE), "w") as f:
            f.write("written on " + ray.util.get_node_ip_address())
    return ray.util.get_node_ip_address()

@ray.remote(num_cpus=0)
def look_for_probe(remove=False):
    found = {d: os.path.exists(os.path.join(d, PROBE)) for d in probe_dirs()}
    if remove:
        for d in probe_dirs():
            os.remove(os.path.join(d, PROBE))
    return ray.util.get_node_ip_address(), found

first_worker = next(n for n in nodes if n["NodeManagerAddress"] == sys.argv[3])
written_on = ray.get(write_probe.options(scheduling_strategy=on(first_worker)).remote())
seen = dict(ray.get([look_for_probe.options(scheduling_strategy=on(n)).remote() for n in nodes]))
ray.get(look_for_probe.options(scheduling_strategy=on(first_worker)).remote(remove=True))

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
    run_config=RunConfig(name="allreduce", **run_config_storage(sys.argv[1])),  # checkpoints on the S3 server
)
result = trainer.fit()
with result.checkpoint.as_directory() as d:
    train = json.load(open(os.path.join(d, "result.json")))
train["checkpoint"] = result.checkpoint.path

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
    "disk": {"written_on": written_on, "seen": seen},
    "train": train,
    "job": {"status": str(client.get_job_status(job).value), "logs": client.get_job_logs(job)},
}))
'''


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def run(tmp_path_factory, s3_server_at, free_port):
    """Start the cluster and an S3 server every host reaches, run the clients against them (the checks above,
    `raylm demo` on the smoke config with its workdir on the bucket, a stage with a local workdir), look at
    each worker host's own disk, stop it all; the figures every test checks."""
    import boto3

    from raylm import storage

    local = tmp_path_factory.mktemp("multihost")
    t0 = time.time()
    # No CPUs on the head (as KubeRay's examples set it): every task and Train worker runs on a worker host,
    # one CPU each, so the smoke run's 2 training ranks run on different hosts.
    cluster = MultiHostCluster(num_workers=2, cpus_per_node=1, head_cpus=0)
    with cluster, s3_server_at(cluster.head_ip, free_port()) as aws:
        up_s = time.time() - t0
        live = {
            "name": cluster.name, "address": cluster.address, "head_ip": cluster.head_ip,
            "worker_ips": cluster.worker_ips, "env": cluster.env, "temp_root": cluster.state.temp_root,
            "namespaces": list(cluster.state.namespaces), "bridge": cluster.state.bridge,
            "pids": cluster_pids(cluster.name),
        }
        boto3.client("s3").create_bucket(Bucket="multihost")
        env = {**os.environ, **cluster.env, **aws}
        client = subprocess.run([sys.executable, "-c", CLIENT, "s3://multihost/ray", cluster.jobs_address,
                                 cluster.worker_ips[0]], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        # The whole smoke pipeline, its workdir on the bucket, driven from this machine (the head).
        t1 = time.time()
        cwd = local / "cwd"
        cwd.mkdir()
        demo = subprocess.run([sys.executable, "-m", "raylm.cli", "demo", "--config", str(ROOT / "configs/smoke.yaml"),
                               "--run.workdir=s3://multihost/smoke", f"--serve.port={free_port()}",
                               "--serve.num_cpus_per_replica=0.5"],  # its 3 models' replicas on the 2 CPUs
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)  # fmt: skip
        demo_s = time.time() - t1
        outputs = {}
        if demo.returncode == 0:
            for stage in PIPELINE:
                out = "s3://multihost/smoke/" + {"prepare": "prepared", "tokenize": "tokens"}.get(stage, stage)
                outputs[stage] = {"manifest": json.loads(storage.read_text(f"{out}/manifest.json")),
                                  "writing": storage.exists(f"{out}/_raylm_writing.json")}
            outputs["train_summary"] = json.loads(storage.read_text("s3://multihost/smoke/train/metrics.json"))["summary"]
            # Two pipeline stages, one per worker host, fed from the smoke run's token data on the bucket.
            pipeline = subprocess.run([sys.executable, "-m", "raylm.cli", "train", "--config", str(ROOT / "configs/smoke.yaml"),
                                       "--run.workdir=s3://multihost/smoke", "--train.output=s3://multihost/smoke/train-pipeline",
                                       "--train.pipeline_stages=2", "--train.pipeline_placement=spread", "--train.zero_stage=1",
                                       "--train.max_steps=4", "--train.eval_interval_steps=4", "--train.checkpoint_interval_steps=4"],
                                      cwd=cwd, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
            outputs["pipeline"] = {"rc": pipeline.returncode, "log": pipeline.stdout[-3000:] + pipeline.stderr[-5000:]}
            if pipeline.returncode == 0:
                metrics = json.loads(storage.read_text("s3://multihost/smoke/train-pipeline/metrics.json"))
                outputs["pipeline"]["summary"] = metrics["summary"]
        # Each worker host's disk, seen from the machine: what it wrote to its copies of the checkout and working
        # directory, and whether its node cache holds copies.
        disks = {}
        for i, ip in enumerate(cluster.worker_ips):
            root = Path(host_disk(cluster.state, i))
            disks[ip] = {
                "views": {str(k): _files_under(root / f"view{k}" / "upper") for k in range(len(private_views(os.getcwd(), str(ROOT))))},
                "tmp": sorted(p.name for p in (root / "tmp").iterdir()),
                "cache": _files_under(root / "tmp" / "raylm-cache"),
            }
        # A stage with a local workdir on this cluster, whose nodes are other hosts: refused before any task runs.
        local_workdir = subprocess.run([sys.executable, "-m", "raylm.cli", "prepare", f"--run.workdir={local / 'run'}"],
                                       env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        t2 = time.time()
    down_s = time.time() - t2
    print(f"multihost cluster: up {up_s:.1f} s, smoke pipeline {demo_s:.1f} s, down {down_s:.1f} s")
    lines = [line for line in client.stdout.splitlines() if line.startswith("RESULT ")]
    assert client.returncode == 0 and lines, client.stdout[-3000:] + client.stderr[-5000:]
    refused = {"rc": local_workdir.returncode, "lines": [l for l in local_workdir.stderr.splitlines() if l.startswith("raylm ")],
               "written": (local / "run").exists()}  # fmt: skip
    return {**live, "result": json.loads(lines[-1][len("RESULT "):]), "local_workdir": refused, "disks": disks,
            "demo": {"rc": demo.returncode, "stdout": demo.stdout, "stderr": demo.stderr, "outputs": outputs,
                     "cwd": sorted(p.name for p in cwd.iterdir())}}


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
def test_each_worker_host_has_a_disk_of_its_own(run):
    """A file one worker host writes to /tmp, /dev/shm or its working directory (the checkout) is there for
    that host only: neither the other worker host nor the head (this machine) sees it."""
    disk, first = run["result"]["disk"], run["worker_ips"][0]
    assert disk["written_on"] == first
    assert sorted(disk["seen"]) == sorted([run["head_ip"], *run["worker_ips"]])
    for ip, found in disk["seen"].items():
        assert sorted(found) == sorted(["/tmp", "/dev/shm", os.getcwd()])  # a Ray worker's, as the cluster's starter
        assert all(found.values()) if ip == first else not any(found.values()), (ip, found)


@pytest.mark.slow
def test_gloo_all_reduce_across_the_two_worker_hosts(run):
    train = run["result"]["train"]
    assert train["sum"] == 3.0  # ranks contribute 1 + 2
    assert sorted(train["ips"]) == sorted(run["worker_ips"])  # one Train worker per worker host, none on the head
    assert train["master_addr"] in run["worker_ips"]
    assert train["checkpoint"].startswith("multihost/ray/allreduce/checkpoint_")  # on the bucket (the S3 filesystem)


@pytest.mark.slow
def test_the_smoke_pipeline_runs_on_hosts_that_share_no_disk(run):
    """`raylm demo` with its workdir on the bucket, every task and training rank on a worker host with a disk
    of its own: each stage commits its output there, the training ranks run on the two different hosts, a
    served completion comes back, and no host wrote to its copy of the checkout or this machine's cwd."""
    demo = run["demo"]
    assert demo["rc"] == 0, demo["stdout"][-4000:] + demo["stderr"][-6000:]
    tail = demo["stdout"].strip().splitlines()[-12:]
    assert any(line.startswith("completion: ") for line in tail) and tail[-1].startswith("demo finished in")
    for stage in PIPELINE:
        out = demo["outputs"][stage]
        assert out["manifest"]["stage"] == stage and not out["writing"], stage
    summary = demo["outputs"]["train_summary"]
    assert sorted(summary["worker_nodes"]) == sorted(run["worker_ips"])  # rank 0 and rank 1 on different hosts
    assert demo["cwd"] == []
    for ip, disk in run["disks"].items():
        assert all(files == [] for files in disk["views"].values()), (ip, disk["views"])
        assert disk["cache"], ip  # the token data (and models) copied into this host's own cache
        # raylm left nothing else in the host's /tmp (no staging of TensorBoard events or uploads); beside the
        # cache, Ray's temp dir and library caches (torch's) are there
        assert [name for name in disk["tmp"] if "raylm" in name] == ["raylm-cache"], (ip, disk["tmp"])


@pytest.mark.slow
def test_a_ray_job_through_the_jobs_api_sees_all_hosts(run):
    job = run["result"]["job"]
    assert job["status"] == "SUCCEEDED", job["logs"][-2000:]
    assert "JOB 3" in job["logs"]


@pytest.mark.slow
def test_pipeline_stages_on_two_hosts_read_their_data_from_the_bucket(run):
    """A 2-stage pipeline run (pipeline_placement=spread) on the hosts without a shared disk: each stage on a host of
    its own, the first stage's rank reading the token shards through its node's cache."""
    pipeline = run["demo"]["outputs"]["pipeline"]
    assert pipeline["rc"] == 0, pipeline["log"]
    summary = pipeline["summary"]
    assert summary["steps"] == 4 and summary["loss"] > 0
    assert sorted(summary["worker_nodes"]) == sorted(run["worker_ips"])
    stage_nodes = summary["pipeline_stage_nodes"]
    assert len(stage_nodes) == 2 and not set(stage_nodes[0]) & set(stage_nodes[1])


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
