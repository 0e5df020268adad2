"""Model FLOP utilization: the model's training FLOPs per token and the peak FLOP/s of one worker.

    MFU = flops_per_token x tokens/s (all workers) / (peak FLOP/s per worker x workers)

The peak is `train.peak_flops_per_worker` when set. Otherwise a GPU's dense bf16/fp16 tensor-core
peak from its datasheet (bf16/fp16 runs on a known device), else the best of a few large matmuls
measured on the worker itself, in the training dtype with the worker's threads: on a CPU that is
the honest ceiling (no datasheet figure holds for a shared, throttled core).
"""

from __future__ import annotations

import time

import torch

from raylm.model.gpt import GPT, GPTConfig

# Dense (no sparsity) bf16/fp16 tensor-core FLOP/s from NVIDIA's datasheets, by a part of the device name.
# Checked in order: "H100 PCIe" before "H100".
GPU_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),  # AWS g5: a down-clocked A10
    ("A10", 125e12),
)


def flops_per_token(model: dict | GPTConfig, seq_len: int) -> int:
    """Training FLOPs per token of the GPT `model` (config or its dict) at `seq_len` tokens of context."""
    config = GPTConfig.from_dict(model) if isinstance(model, dict) else model
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        gpt = GPT(config)
    return gpt.flops_per_token(seq_len)


def model_flops_utilization(flops_per_token: float, tokens_per_s: float, peak_flops_per_worker: float, workers: int) -> float:
    """Fraction of the workers' combined peak that the model's own FLOPs (not recomputation) reach."""
    return flops_per_token * tokens_per_s / (peak_flops_per_worker * workers)


def known_gpu_peak(device_name: str) -> float | None:
    """Datasheet dense bf16/fp16 FLOP/s of a GPU by its name (torch.cuda.get_device_name), None if unknown."""
    for part, peak in GPU_PEAK_FLOPS:
        if part in device_name:
            return peak
    return None


def measure_matmul_flops(
    dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 3, max_seconds_each: float = 0.5
) -> float:
    """Best FLOP/s of a (size x size) @ (size x size) matmul over `repeats` timed runs, after a warm-up.

    Runs with the calling thread's torch thread count, so a CPU worker measures its own share of the machine.
    Where the dtype has no fast kernel (bf16 on a CPU without AVX-512 BF16 or AMX runs at about 1 GFLOP/s),
    the matrices shrink (in steps of halving, to no less than 256) until one matmul takes at most
    `max_seconds_each`, so that the measurement stays well under a few seconds.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        started = time.perf_counter()
        torch.matmul(a, b)
        sync()
        return time.perf_counter() - started

    probe = torch.randn(256, 256, device=device).to(dtype)
    seconds(probe, probe)  # warm-up: thread pool start, kernel selection
    rate = 2 * 256**3 / max(seconds(probe, probe), 1e-9)
    while size > 256 and 2 * size**3 / rate > max_seconds_each:
        size //= 2
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds(a, b)
    best = min(seconds(a, b) for _ in range(repeats))
    return 2 * size**3 / best


def peak_flops_per_worker(configured: float | None, precision: str, device: torch.device) -> tuple[float, str]:
    """(FLOP/s of one worker, where it comes from: "configured", "datasheet" or "measured")."""
    if configured is not None:
        return float(configured), "configured"
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        peak = known_gpu_peak(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak, "datasheet"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measure_matmul_flops(dtype, device), "measured"
