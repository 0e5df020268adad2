"""The prepare stage reading its corpus from object storage: a real S3-compatible server (moto) over HTTP."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.cli import main as cli_main
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
def s3(s3_server, tmp_path_factory):
    """Bucket `corpus` on the S3 server, holding two shards under raw/, and the same shards on local disk."""
    local = tmp_path_factory.mktemp("local") / "raw"
    (local / "more").mkdir(parents=True)
    shards = {"a.jsonl": "".join(json.dumps(d) + "\n" for d in DOCS[:12]).encode(),
              "more/b.jsonl.gz": gzip.compress("".join(json.dumps(d) + "\n" for d in DOCS[12:]).encode())}  # fmt: skip
    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    for name, data in shards.items():
        client.put_object(Bucket="corpus", Key=f"raw/{name}", Body=data)
        (local / name).write_bytes(data)
    return local


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


def test_prepare_writes_to_s3_what_it_writes_to_disk(ray_local, s3, s3_bucket, tmp_path):
    """run.workdir on the S3 server: the same files with the same rows as on disk, committed by the manifest."""
    to_s3 = load_config(None, [f"prepare.input={s3}", f"run.workdir={s3_bucket}/run", *CFG])
    to_disk = load_config(None, [f"prepare.input={s3}", f"run.workdir={tmp_path / 'disk'}", *CFG])
    summary = run_stage("prepare", to_s3)
    run_stage("prepare", to_disk)
    output = f"{s3_bucket}/run/prepared"
    assert summary["output"] == output and not summary["reused"]
    assert [f.name for f in storage.list_files(output)] == [f.name for f in storage.list_files(to_disk.prepare.output)]
    assert "manifest.json" in {f.name for f in storage.list_files(output)}
    for split in ("train", "validation", "duplicates/exact"):
        fs, inner = storage.filesystem(f"{output}/{split}")
        assert (pq.read_table(inner, filesystem=fs).to_pylist()
                == pq.read_table(f"{to_disk.prepare.output}/{split}").to_pylist())  # fmt: skip
    assert not storage.exists(f"{output}.work")  # the checkpoints go once the output is committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk"]  # the S3 run wrote nothing here
    assert run_stage("prepare", to_s3)["reused"]


def test_a_missing_bucket_is_one_line_before_any_work(ray_local, s3, capsys):
    cfg = ["prepare", f"--prepare.input={s3}", "--run.workdir=s3://no-such-bucket-here/run", *(f"--{o}" for o in CFG)]
    assert cli_main(cfg) != 0
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raylm ")]
    assert ours == ["raylm prepare: error: s3://no-such-bucket-here/run/prepared: bucket `no-such-bucket-here` does not "
                    "exist (create it, or set run.workdir to another)"]  # fmt: skip
