"""The gradient norm the train loop logs, from real DeepSpeed engines (one gloo rank, no Ray) at every ZeRO stage."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from raylm.model.gpt import GPT, GPTConfig
from raylm.train.step import StepWindow, deepspeed_keeps_grad_norm, lm_loss, train_micro_batch

MODEL = GPTConfig(vocab_size=128, block_size=16, n_layer=2, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A real one-rank gloo group, and the launcher variables DeepSpeed reads."""
    launcher = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in launcher}
    os.environ.update(launcher)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, MODEL.vocab_size, (4, MODEL.block_size + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def reference_norm() -> float:
    """The plain torch gradient norm of the same model on the same batch."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    _, loss = model(*batch())
    loss.backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


@pytest.mark.parametrize("zero_stage, grad_clip, bf16", [(0, 1.0, False), (0, 0.0, False), (1, 0.0, False),
                                                         (2, 1.0, False), (3, 0.0, False), (0, 1.0, True)])  # fmt: skip
def test_the_logged_grad_norm_is_the_norm_before_clipping(process_group, zero_stage, grad_clip, bf16):
    import deepspeed

    torch.manual_seed(0)
    model = GPT(MODEL)
    config = {
        "train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip, "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    keeps = deepspeed_keeps_grad_norm(engine)
    assert keeps == (zero_stage > 0 or bf16)  # ZeRO 0 in fp32: the loop takes the norm itself
    window = StepWindow(torch.device("cpu"), grad_accum_steps=1, own_grad_norm=not keeps)
    train_micro_batch(engine, lm_loss, *batch(), window)
    values = window.flush(lr=1e-3, tokens_per_step=4 * MODEL.block_size)
    expected = reference_norm()
    assert expected > grad_clip  # the clip bites where it is on: the norm logged is the one before it
    assert values["grad_norm"] == pytest.approx(expected, rel=2e-2 if bf16 else 1e-4)
    assert values["forward_backward_s"] > 0 and values["optimizer_s"] > 0
