"""The GPT model itself: position and MLP variants, causality, parameter counts, config checks."""

from __future__ import annotations

import pytest
import torch

from raylm.model.gpt import GPT, GPTConfig, apply_rotary, build_config, rotary_angles, swiglu_hidden

VARIANTS = [("learned", "gelu"), ("rotary", "gelu"), ("learned", "swiglu"), ("rotary", "swiglu")]


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rotary_angles(torch.tensor([m]), 16, 10000.0)
        ck, sk = rotary_angles(torch.tensor([n]), 16, 10000.0)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum(-1)

    torch.testing.assert_close(score(7, 3), score(104, 100))
    torch.testing.assert_close(score(0, 0), (q * k).sum(-1))  # position 0 is no rotation
    assert not torch.allclose(score(7, 3), score(7, 5))


@pytest.mark.parametrize("positions,mlp", VARIANTS)
def test_every_variant_is_causal_and_learns(positions, mlp):
    torch.manual_seed(0)
    model = GPT(build_config("debug", vocab_size=50, block_size=32, positions=positions, mlp=mlp))
    x = torch.randint(0, 50, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # no position sees the tokens after it
    assert not torch.allclose(a[:, 10:], b[:, 10:])

    pattern = torch.arange(33).remainder(7).repeat(8, 1)  # a sequence a model can learn in a few steps
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        _, loss = model(pattern[:, :-1], pattern[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_rotary_has_no_position_parameters_and_swiglu_keeps_the_size():
    learned = GPT(build_config("demo", vocab_size=100, block_size=64))
    rotary = GPT(build_config("demo", vocab_size=100, block_size=64, positions="rotary"))
    assert rotary.wpe is None and learned.wpe is not None
    assert learned.num_params(non_embedding=False) - rotary.num_params(non_embedding=False) == 64 * 128
    assert learned.num_params() == rotary.num_params()  # non-embedding counts leave positions out either way
    swiglu = GPT(build_config("demo", vocab_size=100, block_size=64, mlp="swiglu"))
    assert swiglu_hidden(128) == 352 and swiglu_hidden(768) == 2048
    assert abs(swiglu.num_params() / learned.num_params() - 1) < 0.05
    assert all(isinstance(m, torch.nn.Linear) for n, m in swiglu.named_modules() if n.endswith(("fc", "gate", "proj")))


def test_bad_variants_are_refused_and_old_configs_load():
    with pytest.raises(ValueError, match="positions must be 'learned' or 'rotary'"):
        GPTConfig(positions="alibi")
    with pytest.raises(ValueError, match="mlp must be 'gelu' or 'swiglu'"):
        GPTConfig(mlp="relu")
    with pytest.raises(ValueError, match="rotary positions need an even head size, got 3"):
        GPTConfig(d_model=6, n_head=2, positions="rotary")
    old = {"vocab_size": 10, "block_size": 8, "n_layer": 1, "n_head": 1, "d_model": 8, "dropout": 0.0, "bias": False}
    cfg = GPTConfig.from_dict(old)  # a model saved before these fields existed
    assert (cfg.positions, cfg.mlp) == ("learned", "gelu")


@pytest.mark.parametrize("positions,mlp", [("learned", "gelu"), ("rotary", "swiglu")])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(positions, mlp):
    torch.manual_seed(0)
    model = GPT(build_config("debug", n_layer=4, vocab_size=64, block_size=32, positions=positions, mlp=mlp)).train()
    x, y = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))

    def run(checkpointing: bool) -> tuple[dict, int]:
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        kept = []  # bytes of every tensor the forward pass saves for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
            _, loss = model(x, y)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(kept)

    plain, plain_bytes = run(False)
    recomputed, recomputed_bytes = run(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)
    assert recomputed_bytes < 0.5 * plain_bytes
