"""CPU workers' malloc settings (train.keep_freed_memory): the environment Ray starts the workers with, and what it
does to a training step run in a thread of its own, as Ray Train runs the loop. Also where workers build torch extensions."""

from __future__ import annotations

import os
import subprocess
import sys

from raylm.train.config import TrainConfig
from raylm.train.worker_runtime import KEEP_FREED_MEMORY_ENV, extensions_dir, worker_runtime_env

# AdamW steps of a small GPT whose logits (16 x 128 x 4096 fp32) are 32 MiB, the size at which glibc starts
# mapping blocks afresh; prints the median of the minor page faults of the steps after two warm-up steps. The
# median: with the settings the heap still grows by a 32 MiB block in one or two of the first ten steps.
STEPS = r"""
import resource, statistics, threading, torch
from raylm.model.gpt import GPT, GPTConfig
torch.set_num_threads(1)
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=4096, block_size=128, n_layer=2, n_head=4, d_model=128))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = torch.randint(0, 4096, (16, 129))
faults = []
def steps():
    for step in range(10):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
thread = threading.Thread(target=steps)
thread.start()
thread.join()
print(statistics.median(faults[2:]))
"""


def _faults_per_step(extra: dict) -> float:
    env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED_MEMORY_ENV}
    done = subprocess.run([sys.executable, "-c", STEPS], env={**env, **extra}, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def test_cpu_workers_get_the_malloc_settings_unless_turned_off_and_gpu_workers_none(monkeypatch):
    for key in KEEP_FREED_MEMORY_ENV:
        monkeypatch.delenv(key, raising=False)
    env = worker_runtime_env(TrainConfig(data="d", output="o"))["env_vars"]
    assert env == {"DS_ACCELERATOR": "cpu", **KEEP_FREED_MEMORY_ENV}
    assert worker_runtime_env(TrainConfig(data="d", output="o", keep_freed_memory=False)) == {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    assert worker_runtime_env(TrainConfig(data="d", output="o", use_gpu=True)) == {}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's own value wins
    assert worker_runtime_env(TrainConfig(data="d", output="o"))["env_vars"]["MALLOC_ARENA_MAX"] == "4"


def test_the_settings_stop_a_training_step_from_faulting_its_tensors_in_afresh():
    default = _faults_per_step({})
    kept = _faults_per_step(worker_runtime_env(TrainConfig(data="d", output="o"))["env_vars"])
    # measured here: 35,000 faults a step (about 140 MiB of fresh pages) with glibc's defaults, none with the settings
    assert default > 5_000 and kept < default / 10, (default, kept)


def test_each_python_environment_and_ninja_build_torch_extensions_in_a_folder_of_their_own(monkeypatch, tmp_path):
    from torch.utils.cpp_extension import get_default_build_root

    here = extensions_dir()
    assert os.path.dirname(here) == get_default_build_root() and extensions_dir() == here
    # another ninja first on PATH (an activated virtualenv's `ninja` package against the system's)
    ninja = tmp_path / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    other_ninja = extensions_dir()
    assert other_ninja != here
    monkeypatch.setattr(sys, "prefix", "/elsewhere/.venv")  # another Python environment
    assert extensions_dir() not in (here, other_ninja)
