"""raylm.storage and stage outputs on both kinds of location: a local directory and a real S3-compatible server."""

from __future__ import annotations

import json

import pytest

from raylm import storage
from raylm.artifacts import MANIFEST, WRITING, read_manifest, require_stage_output, stage_output
from raylm.errors import InputError, RaylmError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """An empty location of each kind: a local directory, or a prefix in a fresh bucket on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    return f"{request.getfixturevalue('s3_bucket')}/root"


def test_files_round_trip_and_list_like_a_directory(root):
    assert not storage.exists(root) and storage.list_files(root) == []
    storage.write_text(storage.join(root, "a.txt"), "alpha")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"\x00\x01")
    with storage.open_output(storage.join(root, "sub", "c.txt")) as f:
        f.write(b"gamma")
    assert storage.exists(root) and storage.is_file(storage.join(root, "a.txt"))
    assert not storage.is_file(storage.join(root, "sub"))
    assert [(e.name, e.size) for e in storage.list_files(root)] == [("a.txt", 5), ("sub/b.bin", 2), ("sub/c.txt", 5)]
    assert storage.read_text(storage.join(root, "a.txt")) == "alpha"
    assert storage.read_bytes(storage.join(root, "sub", "b.bin")) == b"\x00\x01"
    assert storage.stat(storage.join(root, "sub", "c.txt")).size == 5 and storage.stat(root) is None
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(root, "missing.txt"))
    storage.remove(storage.join(root, "sub"))
    assert [e.name for e in storage.list_files(root)] == ["a.txt"]
    storage.remove(root)
    assert not storage.exists(root)
    storage.remove(root)  # nothing there is fine


def test_a_write_that_fails_midway_leaves_no_file(root):
    target = storage.join(root, "half.bin")
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.open_output(target) as f:
            f.write(b"first half")
            raise RuntimeError("disk full")
    assert not storage.exists(target) and storage.list_files(root) == []


def test_copy_tree_between_kinds(root, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "x.txt").write_text("x")
    (src / "d" / "y.txt").write_text("yy")
    storage.copy_tree(str(src), root)
    back = tmp_path / "back"
    storage.copy_tree(root, str(back))
    assert sorted(str(p.relative_to(back)) for p in back.rglob("*") if p.is_file()) == ["d/y.txt", "x.txt"]
    assert (back / "d" / "y.txt").read_text() == "yy"


def test_a_stage_output_appears_with_its_manifest_and_is_reused(root):
    out_path = storage.join(root, "tokens")
    with stage_output(out_path, "tokenize", {"k": 1}) as out:
        assert not out.done
        out.write_text("data.txt", "payload")
        assert read_manifest(out_path) is None  # not finished while it is being written
        out.stats = {"rows": 3}
    manifest = require_stage_output(out_path, "tokenize")
    assert manifest["stats"] == {"rows": 3}
    assert sorted(e.name for e in storage.list_files(out_path)) == ["data.txt", MANIFEST]
    with stage_output(out_path, "tokenize", {"k": 1}) as again:
        assert again.done and again.manifest["fingerprint"] == manifest["fingerprint"]
    with pytest.raises(RaylmError, match="output exists from a different config"):
        with stage_output(out_path, "tokenize", {"k": 2}):
            pass
    with stage_output(out_path, "tokenize", {"k": 2}, overwrite=True) as out:
        out.write_text("other.txt", "new")
    assert sorted(e.name for e in storage.list_files(out_path)) == [MANIFEST, "other.txt"]


def test_a_failed_stage_leaves_nothing_that_looks_finished(root):
    out_path = storage.join(root, "tokens")
    with pytest.raises(ValueError):
        with stage_output(out_path, "tokenize", {"k": 1}) as out:
            out.write_text("data.txt", "half")
            raise ValueError("bad input")
    with pytest.raises(InputError, match="not found"):
        require_stage_output(out_path, "tokenize")
    assert storage.list_files(root) == []


def test_a_killed_write_on_an_object_store_is_cleared_by_the_next_run(s3_bucket):
    """A stage killed while writing in place leaves its files and the writing marker, no manifest."""
    out_path = f"{s3_bucket}/run/tokens"
    storage.write_text(storage.join(out_path, WRITING), json.dumps({"stage": "tokenize"}))
    storage.write_text(storage.join(out_path, "train", "part-00000.npy"), "half")
    with pytest.raises(InputError, match="no manifest.json; not a finished `raylm tokenize` output"):
        require_stage_output(out_path, "tokenize")
    with stage_output(out_path, "tokenize", {"k": 1}) as out:  # no overwrite needed: the prefix is raylm's, unfinished
        out.write_text("data.txt", "whole")
    assert [e.name for e in storage.list_files(out_path)] == ["data.txt", MANIFEST]


def test_a_prefix_raylm_did_not_write_is_not_replaced(s3_bucket):
    out_path = f"{s3_bucket}/someone-elses"
    storage.write_text(storage.join(out_path, "keep.txt"), "theirs")
    with pytest.raises(RaylmError, match="output exists and is not a finished raylm output"):
        with stage_output(out_path, "tokenize", {"k": 1}):
            pass
    assert storage.read_text(storage.join(out_path, "keep.txt")) == "theirs"


def test_unreachable_endpoint_and_missing_bucket_name_the_uri(s3_bucket, monkeypatch, free_port):
    bucket = s3_bucket.removeprefix("s3://")
    with pytest.raises(InputError, match=r"s3://no-such-bucket-x/run: bucket `no-such-bucket-x` does not exist"):
        storage.check_writable("s3://no-such-bucket-x/run")
    storage.check_writable(f"s3://{bucket}/run")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(InputError, match=rf"s3://{bucket}/run: cannot reach"):
        storage.check_writable(f"s3://{bucket}/run")


def test_refused_credentials_are_one_line_naming_the_uri_before_ray_starts(s3_server_at, free_port, tmp_path, repo_root):
    """An S3 server that checks request signatures (moto with its authentication switched on) and a stage given a
    wrong secret key: exit 1 with one line naming the output URI and the refusal, no Ray started, nothing written."""
    import os
    import subprocess
    import sys
    import urllib.request

    import boto3

    with s3_server_at("127.0.0.1", free_port()) as aws:
        iam = boto3.client("iam")
        iam.create_user(UserName="raylm")
        key = iam.create_access_key(UserName="raylm")["AccessKey"]
        iam.put_user_policy(UserName="raylm", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))  # fmt: skip
        boto3.client("s3").create_bucket(Bucket="locked")
        # From here on the server checks every request's signature (moto's switch for it)
        urllib.request.urlopen(urllib.request.Request(f"{aws['AWS_ENDPOINT_URL']}/moto-api/reset-auth", data=b"0",
                                                      headers={"Content-Type": "text/plain"}, method="POST")).read()  # fmt: skip
        env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": "not-the-secret",
               "RAY_ADDRESS": "127.0.0.1:1"}  # a Ray it would fail to reach, were it to try  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "raylm.cli", "prepare", "--config", str(repo_root / "configs/smoke.yaml"),
                            "--run.workdir=s3://locked/run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        owner = boto3.client("s3", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        listed = owner.list_objects_v2(Bucket="locked")
    assert r.returncode == 1, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("raylm prepare: error: s3://locked/run/prepared: access refused; check the credentials")
    assert listed["KeyCount"] == 0 and list(tmp_path.iterdir()) == []
