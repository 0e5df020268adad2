"""The per-worker memory estimate (raylm.train.memory) against real tensors, and the error it raises."""

from __future__ import annotations

import pytest
import torch

from raylm.errors import ConfigError
from raylm.model.gpt import GPT, GPTConfig
from raylm.train.config import TrainConfig
from raylm.train.engine import check_precision
from raylm.train.memory import GIB, MemoryPlan, check_memory, estimate_memory, memory_plan

GPT_CFG = GPTConfig(vocab_size=320, block_size=32, n_layer=2, n_head=2, d_model=64)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _adam_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


def _plan(**kw) -> MemoryPlan:
    cfg = TrainConfig(data="d", output="o", num_workers=1, zero_stage=0, **kw)
    return memory_plan(cfg, GPT_CFG, seq_len=32)


def test_fp32_model_states_equal_a_real_adamw_steps_bytes():
    torch.manual_seed(0)
    model = GPT(GPT_CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 320, (2, 33))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    params = list(model.parameters())  # tied embeddings: lm_head is wte, counted once
    measured = {
        "params": _bytes(params),
        "grads": _bytes(p.grad for p in params),
        "optimizer": _adam_state_bytes(optimizer),  # exp_avg, exp_avg_sq (step counters are scalars)
    }
    estimate = estimate_memory(_plan(precision="fp32"))
    assert (estimate.params_bytes, estimate.grads_bytes, estimate.optimizer_bytes) == (
        measured["params"], measured["grads"], measured["optimizer"]
    )


def test_bf16_model_states_equal_bf16_weights_with_an_fp32_master_copy():
    """Mixed precision as DeepSpeed lays it out: 16-bit weights and gradients, Adam on an fp32 master copy."""
    torch.manual_seed(0)
    model = GPT(GPT_CFG).to(torch.bfloat16)
    x = torch.randint(0, 320, (2, 33))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    for m, p in zip(masters, model.parameters()):
        m.grad = p.grad.float()
    optimizer = torch.optim.AdamW(masters, lr=1e-3)
    optimizer.step()
    measured_optimizer = _bytes(masters) + _adam_state_bytes(optimizer)
    estimate = estimate_memory(_plan(precision="bf16"))
    assert estimate.params_bytes == _bytes(model.parameters())
    assert estimate.grads_bytes == _bytes(p.grad for p in model.parameters())
    assert estimate.optimizer_bytes == measured_optimizer


def test_zero_stages_shard_what_they_promise_across_ranks():
    base = dict(precision="bf16", num_workers=4)
    one_rank = estimate_memory(_plan(precision="bf16"))
    plans = {stage: memory_plan(TrainConfig(data="d", output="o", zero_stage=stage, **base), GPT_CFG, 32) for stage in range(4)}
    est = {stage: estimate_memory(plan) for stage, plan in plans.items()}
    assert est[0].model_states_bytes == one_rank.model_states_bytes  # ZeRO 0: every rank holds everything
    assert est[1].optimizer_bytes == one_rank.optimizer_bytes / 4 and est[1].grads_bytes == one_rank.grads_bytes
    assert est[2].grads_bytes == one_rank.grads_bytes / 4 and est[2].params_bytes == one_rank.params_bytes
    assert est[3].params_bytes == one_rank.params_bytes / 4
    assert est[0].total_bytes > est[1].total_bytes > est[2].total_bytes > est[3].total_bytes


def test_activation_checkpointing_and_smaller_micro_batches_cut_activation_memory():
    full = estimate_memory(_plan(micro_batch_size=8)).activations_bytes
    checkpointed = estimate_memory(_plan(micro_batch_size=8, activation_checkpointing=True)).activations_bytes
    half = estimate_memory(_plan(micro_batch_size=4)).activations_bytes
    assert checkpointed < full and half == pytest.approx(full / 2)


def test_a_model_too_large_for_the_limit_is_refused_with_what_would_fit():
    cfg = TrainConfig(data="d", output="o", num_workers=8, zero_stage=1, precision="bf16", micro_batch_size=4,
                      memory_per_worker_gb=4.0)  # fmt: skip
    big = GPTConfig(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, d_model=2048)  # ~1.3B parameters
    estimate = estimate_memory(memory_plan(cfg, big, 1024))
    assert estimate.total_bytes > 4 * GIB
    with pytest.raises(ConfigError) as e:
        check_memory(cfg, big, seq_len=1024)
    message = str(e.value)
    assert "\n" not in message
    assert f"estimated memory per worker {estimate.total_bytes / GIB:.2f} GiB" in message
    assert "exceeds 4.00 GiB (train.memory_per_worker_gb=4.0)" in message
    assert "would fit: zero_stage=3 + activation_checkpointing=true + micro_batch_size=2" in message
    # the suggestion is real: that config passes the check
    check_memory(cfg.model_copy(update={"zero_stage": 3, "activation_checkpointing": True, "micro_batch_size": 2}),
                 big, seq_len=1024)  # fmt: skip
    # with a looser limit, each single change that fits on its own is offered
    with pytest.raises(ConfigError, match=r"would fit: zero_stage=3 \(.* GiB\) or activation_checkpointing=true"):
        check_memory(cfg.model_copy(update={"memory_per_worker_gb": 20.0}), big, seq_len=1024)


def test_bf16_on_a_gpu_without_bf16_is_refused_in_one_line(monkeypatch):
    """The worker-side check (raylm.train.engine.check_precision); the GPU's answers are stood in for on a CPU."""

    check_precision("bf16", torch.device("cpu"))  # CPUs compute bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    check_precision("fp16", torch.device("cuda", 0))
    with pytest.raises(ConfigError, match=r"^train.precision=bf16: GPU Tesla V100-SXM2-16GB \(compute capability 7.0\) "
                                          r"has no bf16; use precision fp16 or fp32$"):  # fmt: skip
        check_precision("bf16", torch.device("cuda", 0))
