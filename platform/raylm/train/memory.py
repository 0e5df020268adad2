"""How much memory one training worker needs, estimated on the driver before any worker starts.

Model states per worker, for P trainable parameters over N data-parallel ranks (the ZeRO paper's
accounting, Rajbhandari et al. 2020, as DeepSpeed lays them out):

    precision   parameters   gradients   optimizer states (Adam)
    fp32        4 P          4 P         8 P  (exp_avg, exp_avg_sq), + 4 P fp32 master copy under ZeRO >= 1
    bf16/fp16   2 P          2 P         12 P (fp32 master, exp_avg, exp_avg_sq)

ZeRO 1 divides the optimizer states by N, ZeRO 2 also the gradients, ZeRO 3 also the parameters;
offloading moves the offloaded part to host memory (it no longer counts against the GPU).

Activations of one micro-batch of B sequences of T tokens, width d, h heads, L layers (Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", 16-bit: 34 BTd + 5 BhT^2
bytes per layer, the second term for the attention scores), scaled to the element size used; plus the
logits and their gradient, (B, T, vocab) in fp32 each. With activation checkpointing a layer keeps only its
input (B, T, d) and one layer at a time is recomputed with all of its activations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ray
import torch

from raylm.errors import ConfigError
from raylm.model.gpt import GPT
from raylm.model.lora import apply_lora

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker holds, by kind."""

    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float

    @property
    def model_states_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> float:
        return self.model_states_bytes + self.activations_bytes

    def describe(self) -> str:
        parts = (("parameters", self.params_bytes), ("gradients", self.grads_bytes),
                 ("optimizer", self.optimizer_bytes), ("activations", self.activations_bytes))  # fmt: skip
        return f"{self.total_bytes / GIB:.2f} GiB (" + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts) + ")"


@dataclass(frozen=True)
class MemoryPlan:
    """What the estimate depends on (a subset of TrainConfig plus the model's shape)."""

    num_params: int
    """Parameters held by one pipeline stage (the whole model without a pipeline)."""
    trainable_params: int
    """Of those, parameters the optimizer updates (fewer under LoRA)."""
    n_layer: int
    n_head: int
    d_model: int
    vocab_size: int
    seq_len: int
    micro_batch_size: int
    data_parallel_size: int
    zero_stage: int
    precision: str
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    use_gpu: bool = False


def estimate_memory(plan: MemoryPlan) -> MemoryEstimate:
    """Per-worker bytes of parameters, gradients, optimizer states and one micro-batch's activations."""
    n = plan.data_parallel_size
    half = plan.precision in ("bf16", "fp16")
    param_elt = 2 if half else 4
    params = plan.num_params * param_elt
    grads = plan.trainable_params * param_elt
    optimizer = plan.trainable_params * (12 if half or plan.zero_stage >= 1 else 8)
    if plan.zero_stage >= 1:
        optimizer /= n
    if plan.zero_stage >= 2:
        grads /= n
    if plan.zero_stage >= 3:
        params /= n
    if plan.use_gpu:  # offloaded states live in host memory, not on the GPU this estimate is for
        optimizer *= 0 if plan.offload_optimizer else 1
        params *= 0 if plan.offload_params else 1
    return MemoryEstimate(params, grads, optimizer, activation_bytes(plan))


def activation_bytes(plan: MemoryPlan) -> float:
    """Activations kept for the backward pass of one micro-batch (see the module docstring)."""
    b, t, d, h = plan.micro_batch_size, plan.seq_len, plan.d_model, plan.n_head
    scale = (2 if plan.precision in ("bf16", "fp16") else 4) / 2  # the formula counts 16-bit bytes
    per_layer = (34 * b * t * d + 5 * b * h * t * t) * scale
    logits = 2 * b * t * plan.vocab_size * 4  # fp32 logits and their gradient
    if plan.activation_checkpointing:
        return plan.n_layer * b * t * d * 2 * scale + per_layer + logits
    return plan.n_layer * per_layer + logits


def memory_plan(train_cfg, gpt, seq_len: int) -> MemoryPlan:
    """The MemoryPlan of a TrainConfig training the GPTConfig `gpt` on sequences of `seq_len` tokens."""
    with torch.device("meta"):  # shapes only: no memory, no initialization
        model = GPT(gpt)
        if getattr(train_cfg, "lora", None) is not None:
            lora = train_cfg.lora
            apply_lora(model, lora.rank, lora.alpha, lora.targets)
    stages = getattr(train_cfg, "pipeline_stages", 1)
    num_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MemoryPlan(
        num_params=-(-num_params // stages),
        trainable_params=-(-trainable // stages),
        n_layer=-(-gpt.n_layer // stages),
        n_head=gpt.n_head,
        d_model=gpt.d_model,
        vocab_size=gpt.vocab_size,
        seq_len=seq_len,
        micro_batch_size=train_cfg.micro_batch_size,
        data_parallel_size=max(1, train_cfg.num_workers // stages),
        zero_stage=train_cfg.zero_stage,
        precision=train_cfg.precision,
        activation_checkpointing=train_cfg.activation_checkpointing,
        offload_optimizer=train_cfg.offload_optimizer,
        offload_params=train_cfg.offload_params,
        use_gpu=train_cfg.use_gpu,
    )


def worker_memory_limit(train_cfg) -> tuple[float | None, str]:
    """(bytes one worker may use, where that figure comes from); (None, "") when nothing is known.

    memory_per_worker_gb when set; else for GPU workers the driver's GPU memory (when it has the same
    GPUs), for CPU workers the Ray node with the most memory shared by the workers that fit on it.
    """
    if train_cfg.memory_per_worker_gb is not None:
        return train_cfg.memory_per_worker_gb * GIB, f"train.memory_per_worker_gb={train_cfg.memory_per_worker_gb}"
    if train_cfg.use_gpu:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return float(props.total_memory), f"the memory of GPU {props.name}"
        return None, ""
    if not ray.is_initialized():
        return None, ""
    best = None
    for node in ray.nodes():
        res = node.get("Resources", {})
        if not node.get("Alive") or "memory" not in res:
            continue
        sharing = max(1, min(train_cfg.num_workers, int(res.get("CPU", 1) // train_cfg.cpus_per_worker) or 1))
        per_worker = res["memory"] / sharing
        if best is None or per_worker > best[0]:
            best = (per_worker, f"Ray node {node.get('NodeManagerAddress')}'s {res['memory'] / GIB:.1f} GiB shared by {sharing} workers")
    return best if best is not None else (None, "")


def check_memory(train_cfg, gpt, seq_len: int, section: str = "train") -> MemoryEstimate:
    """ConfigError when one worker's estimate exceeds its limit, with the estimate, the limit and what would fit."""
    plan = memory_plan(train_cfg, gpt, seq_len)
    estimate = estimate_memory(plan)
    limit, source = worker_memory_limit(train_cfg)
    if limit is None or estimate.total_bytes <= limit:
        return estimate
    hint = _what_fits(plan, limit, max_zero=1 if getattr(train_cfg, "pipeline_stages", 1) > 1 else 3)
    raise ConfigError(
        f"{section}: estimated memory per worker {estimate.describe()} with ZeRO {plan.zero_stage}, {plan.precision},"
        f" {plan.data_parallel_size} data-parallel ranks, micro_batch_size {plan.micro_batch_size} exceeds"
        f" {limit / GIB:.2f} GiB ({source}){hint}"
    )


def _what_fits(plan: MemoryPlan, limit: float, max_zero: int) -> str:
    """The first of: a higher ZeRO stage, activation checkpointing, halved micro batches (cumulatively) that fits."""
    changes: list[tuple[str, dict]] = []
    if plan.zero_stage < max_zero:
        changes.append((f"zero_stage={max_zero}", {"zero_stage": max_zero}))
    if not plan.activation_checkpointing:
        changes.append(("activation_checkpointing=true", {"activation_checkpointing": True}))
    micro = plan.micro_batch_size // 2
    while micro >= 1:
        changes.append((f"micro_batch_size={micro} (and grad_accum_steps x{plan.micro_batch_size // micro})",
                        {"micro_batch_size": micro}))  # fmt: skip
        micro //= 2
    alone = [(n, estimate_memory(replace(plan, **c)).total_bytes) for n, c in changes]
    fits = [f"{n} ({b / GIB:.2f} GiB)" for n, b in alone if b <= limit and not n.startswith("micro")]
    fits += [f"{n} ({b / GIB:.2f} GiB)" for n, b in alone if b <= limit and n.startswith("micro")][:1]
    if fits:
        return "; would fit: " + " or ".join(fits)
    applied, names = plan, []
    for name, change in changes:
        if "micro_batch_size" in change and names and names[-1].startswith("micro"):
            names.pop()
        applied, names = replace(applied, **change), names + [name]
        total = estimate_memory(applied).total_bytes
        if total <= limit:
            return f"; would fit: {' + '.join(names)} ({total / GIB:.2f} GiB)"
    return "; even ZeRO 3, activation checkpointing and micro_batch_size=1 exceed it: use more workers or a smaller model"
