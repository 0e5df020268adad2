"""LoRA adapters on the GPT: a fresh adapter changes nothing, merging is exact, only adapters train."""

from __future__ import annotations

import pytest
import torch

from raylm.model.gpt import GPT, GPTConfig, build_config
from raylm.model.lora import LoRALinear, apply_lora, merge_lora, trainable_fraction

ALL4 = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def _model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, d_model=32, **overrides))


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model: torch.nn.Module) -> None:
    """Non-zero B, as after training (a fresh adapter's B is zero)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.05)


def test_a_fresh_adapter_leaves_the_output_unchanged():
    base = _model().eval()
    ids = _ids()
    expected, _ = base(ids)
    adapted = apply_lora(_model(), rank=4, alpha=8.0, targets=ALL4).eval()
    got, _ = adapted(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_the_merged_model_computes_what_the_adapted_one_does(mlp):
    targets = ALL4 + (("mlp.gate",) if mlp == "swiglu" else ())
    adapted = apply_lora(_model(mlp=mlp), rank=4, alpha=8.0, targets=targets).eval()
    _randomize_adapters(adapted)
    ids = _ids()
    before, _ = adapted(ids)
    merged = merge_lora(adapted).eval()
    after, _ = merged(ids)
    assert type(merged) is GPT and not any(isinstance(m, LoRALinear) for m in merged.modules())
    # the merged model has the plain GPT's parameter names, so it saves and loads as any raylm model
    assert {n for n, _ in merged.named_parameters()} == {n for n, _ in _model(mlp=mlp).named_parameters()}
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # the adapters did change the model (so the equality above is not that of two base models)
    base, _ = _model(mlp=mlp).eval()(ids)
    assert (before - base).abs().max() > 1e-3


def test_only_the_adapters_get_gradients():
    model = apply_lora(_model(), rank=4, alpha=8.0, targets=ALL4)
    _randomize_adapters(model)
    ids = _ids()
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None}
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_a"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(("lora_a", "lora_b")))
    # 2 layers x 4 targets, an A and a B each
    assert len(names) == 2 * 4 * 2


def test_rank_8_on_the_125m_preset_trains_under_one_percent():
    # GPT-2 small's shape (vocabulary 50,257, context 1,024), built on the meta device: only counts matter
    with torch.device("meta"):
        model = GPT(build_config("125m", vocab_size=50257, block_size=1024))
        apply_lora(model, rank=8, alpha=16.0, targets=ALL4)
    trainable, total = trainable_fraction(model)
    print(f"LoRA rank 8 on 125m (qkv, proj, fc, proj): {trainable:,} of {total:,} parameters = {trainable / total:.3%}")
    # per layer: 8 x ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)) = 98,304; 12 layers
    assert trainable == 12 * 98_304
    assert trainable / total <= 0.01


def test_unknown_or_absent_targets_are_refused():
    with pytest.raises(ValueError, match="LoRA targets"):
        apply_lora(_model(), rank=4, alpha=8.0, targets=("attn.q",))
    with pytest.raises(ValueError, match="mlp.gate"):
        apply_lora(_model(), rank=4, alpha=8.0, targets=("mlp.gate",))  # GELU MLP has no gate
