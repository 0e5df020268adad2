"""The prepare stage reading its corpus from object storage: a real S3-compatible server (moto) over HTTP."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.data.filters import FILTER_NAMES
from raylm.data.sources import list_input_files
from raylm.stages import run_stage

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto", reason="moto[server] provides the S3-compatible server")

DOCS = [{"id": f"doc{i:02d}", "text": f"Document number {i} says the quick brown fox jumps over the lazy dog {i} times."}
        for i in range(20)]  # fmt: skip
CFG = ["prepare.id_field=id", "prepare.filters.length.min_chars=20", "prepare.filters.word_count.min_words=5",
       "prepare.dedup.fuzzy.enabled=false", "prepare.validation_fraction=0.2",
       *(f"prepare.filters.{f}.enabled=false" for f in FILTER_NAMES if f not in ("length", "word_count"))]  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory, free_port):
    """An S3 endpoint with bucket `corpus` holding two shards under raw/, and the same shards on local disk."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                server.kill()
                pytest.fail("moto server did not start")
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    local = tmp_path_factory.mktemp("local") / "raw"
    (local / "more").mkdir(parents=True)
    shards = {"a.jsonl": "".join(json.dumps(d) + "\n" for d in DOCS[:12]).encode(),
              "more/b.jsonl.gz": gzip.compress("".join(json.dumps(d) + "\n" for d in DOCS[12:]).encode())}  # fmt: skip
    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    for name, data in shards.items():
        client.put_object(Bucket="corpus", Key=f"raw/{name}", Body=data)
        (local / name).write_bytes(data)
    yield local
    server.terminate()
    server.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_lists_the_bucket_like_a_directory(s3):
    remote = list_input_files("s3://corpus/raw/")
    assert [(f.name, f.format, f.size_bytes) for f in remote] == [
        (f.name, f.format, f.size_bytes) for f in list_input_files(str(s3))
    ]
    assert [f.name for f in list_input_files("s3://corpus/raw/**/*.gz")] == ["more/b.jsonl.gz"]


def test_prepare_from_s3_equals_prepare_from_disk(ray_local, s3, tmp_path):
    from_s3 = load_config(None, ["prepare.input=s3://corpus/raw/", f"run.workdir={tmp_path / 's3'}", *CFG])
    from_disk = load_config(None, [f"prepare.input={s3}", f"run.workdir={tmp_path / 'disk'}", *CFG])
    stats = run_stage("prepare", from_s3)["stats"]
    run_stage("prepare", from_disk)
    assert stats["read"]["documents"] == len(DOCS) and stats["quarantined"]["documents"] == 0
    for split in ("train", "validation"):
        assert (pq.read_table(f"{from_s3.prepare.output}/{split}").to_pylist()
                == pq.read_table(f"{from_disk.prepare.output}/{split}").to_pylist())  # fmt: skip
