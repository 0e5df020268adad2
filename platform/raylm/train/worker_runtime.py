"""The process settings of training workers: their environment, threads and torch-extensions folder.

`worker_runtime_env` is what the driver gives Ray for the workers' processes (read when a process
starts); `prepare_worker_process` is what each worker sets itself first, before DeepSpeed is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import warnings
from typing import Sequence

import torch
from torch.utils.cpp_extension import get_default_build_root

from raylm.storage import settings_for
from raylm.train.config import TrainConfig

KEEP_FREED_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_ARENA_MAX": "1",
}
"""glibc malloc settings of CPU workers with train.keep_freed_memory (read when the process starts, so given to
Ray as the workers' environment).

By default glibc serves an allocation above a threshold that it raises up to 32 MiB with a fresh mmap,
and unmaps it on free; it also trims the top of its heap back to the OS. A training step allocates the
same activations and gradients every time, so every step pays a page fault and a zeroed page for each
4 KiB of them. Here: no mmap and no trimming under 4 GiB, and one arena, because Ray Train runs the loop
in a thread of its own and a thread's arena cannot hold a block over 64 MiB (glibc then maps it anyway).
Measured on the demo model (2 cores, 2 torch threads): the bare loop of benchmarks/train_common.py had
3.8 million minor page faults and 15 s of system time in 100 steps, against 0.2 million and 1.9 s with
these settings, and ran at 7,700-10,000 tokens/s against 5,800-6,500 in the same hour; peak resident
memory 620 -> 910-950 MiB. raylm's worker: 5,000-5,500 -> 5,600-5,900 (without the single arena, 5,000).
"""


def worker_runtime_env(train_cfg: TrainConfig, reads: Sequence[str] = ()) -> dict:
    """The Ray runtime_env of the training workers: on CPU, DeepSpeed's CPU accelerator and the malloc settings
    above (a value the driver's environment already sets wins); when the token data, the base model
    (train.init_from) or another location the workers read or write (`reads`: a teacher model, the run's
    storage) is on an object store, the driver's storage settings (credentials, endpoint, the node cache's
    directory)."""
    env = settings_for(train_cfg.data, train_cfg.init_from or "", *reads)
    if not train_cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        if train_cfg.keep_freed_memory:
            env.update({k: os.environ.get(k, v) for k, v in KEEP_FREED_MEMORY_ENV.items()})
    return {"env_vars": env} if env else {}


def extensions_dir() -> str:
    """Where this process's JIT-built torch extensions live: a folder of its own under torch's default root, one per
    Python environment, torch version and ninja binary.

    DeepSpeed compiles ops on first use (on the CPU, its shared-memory all-reduce, `deepspeed_shm_comm`, whenever its
    comm backend starts: 30-90 s of every core here). torch keeps them in one folder per Python version, shared by
    every virtual environment, and ninja rebuilds whatever it finds built by a different command or a different
    ninja: the build commands name the environment's include paths, and ninja 1.12 changed how its log hashes
    commands. Workers of a local Ray find the system's ninja on PATH, those of a cluster started from the
    environment (raylm.cluster.multihost, an activated virtualenv) the `ninja` package's; each took the op for
    rebuilding after the other. Keyed by all three, every combination builds once.
    """
    ninja = shutil.which("ninja")
    ninja = os.path.realpath(ninja) if ninja else ""
    key = hashlib.sha1(f"{sys.prefix}\0{torch.__version__}\0{ninja}".encode()).hexdigest()[:10]
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}-{key}")


RAY_DATA_QUIET_LOGGERS = {
    "ray.data._internal.execution.streaming_executor": logging.WARNING,  # each execution's plan and start
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled. To enable, set ..."
}
"""Levels for Ray Data's loggers (by module name) in training workers: their token streams run one Ray Data
execution per epoch, with progress bars off (raylm.train.ingest)."""


def prepare_worker_process(cfg: TrainConfig) -> None:
    """Settings a training worker makes before anything imports DeepSpeed: its extensions folder, on the CPU
    DeepSpeed's CPU accelerator and the torch thread count, and quiet about DeepSpeed's own deprecated calls."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())  # a user's own setting wins
    if not cfg.use_gpu:
        # Must precede the first `import deepspeed` in this process: DeepSpeed picks its accelerator on import.
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(cfg.threads_per_worker)
    # DeepSpeed's ZeRO collectives call torch APIs that warn of their deprecation on every rank, every run.
    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # Ray Data's lines about the token stream's plumbing would be the run's output between its progress lines.
    for name, level in RAY_DATA_QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
