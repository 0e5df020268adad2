"""The masked-language-model objective: BERT masking, bidirectional attention, learning, and its errors."""

from __future__ import annotations

import pytest
import torch

from raylm.errors import InputError
from raylm.model.gpt import GPT, KVCache, build_config
from raylm.train.objectives import IGNORE_INDEX, Objective, build_objective, mask_tokens

MASK, EOS, VOCAB = 1, 0, 60


def test_masking_selects_the_fraction_and_splits_80_10_10():
    tokens = torch.randint(2, VOCAB, (64, 256))
    g = torch.Generator().manual_seed(0)
    inputs, targets = mask_tokens(tokens, mask_token_id=MASK, vocab_size=VOCAB, fraction=0.15, generator=g)
    selected = targets != IGNORE_INDEX
    assert abs(selected.float().mean().item() - 0.15) < 0.01
    torch.testing.assert_close(targets[selected], tokens[selected])  # targets are the original tokens
    assert torch.equal(inputs[~selected], tokens[~selected])  # unselected tokens are left alone
    masked = (inputs == MASK) & selected
    unchanged = (inputs == tokens) & selected
    assert abs(masked.sum().item() / selected.sum().item() - 0.8) < 0.02
    # 10% random plus 10% kept; a random draw can land on the original token, so "unchanged" is a bit over 10%
    assert 0.09 < unchanged.sum().item() / selected.sum().item() < 0.13


def test_special_tokens_are_never_masked_and_masks_are_reproducible():
    tokens = torch.randint(2, VOCAB, (8, 64))
    tokens[:, ::5] = EOS
    a = mask_tokens(tokens, mask_token_id=MASK, vocab_size=VOCAB, fraction=0.5, generator=torch.Generator().manual_seed(3),
                    keep_ids=(EOS, MASK))  # fmt: skip
    b = mask_tokens(tokens, mask_token_id=MASK, vocab_size=VOCAB, fraction=0.5, generator=torch.Generator().manual_seed(3),
                    keep_ids=(EOS, MASK))  # fmt: skip
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[1][tokens == EOS] == IGNORE_INDEX).all()
    assert torch.equal(a[0][tokens == EOS], tokens[tokens == EOS])


def test_objective_masks_differ_per_step_and_rank_but_validation_is_fixed():
    obj = Objective("masked", mask_token_id=MASK, vocab_size=VOCAB, keep_ids=(EOS,), seed=7)
    rows = torch.randint(2, VOCAB, (4, 33))
    first = obj.train_pair(rows, rank=0, step=1, micro=0)
    assert first[0].shape == (4, 32) and first[1].shape == (4, 32)
    assert torch.equal(first[1], obj.train_pair(rows, rank=0, step=1, micro=0)[1])  # a resumed run masks alike
    assert not torch.equal(first[1], obj.train_pair(rows, rank=0, step=2, micro=0)[1])
    assert not torch.equal(first[1], obj.train_pair(rows, rank=1, step=1, micro=0)[1])
    assert torch.equal(obj.eval_pair(rows, 0, 3)[1], obj.eval_pair(rows, 0, 3)[1])
    causal = Objective("causal")
    inputs, targets = causal.train_pair(rows, 0, 1, 0)
    assert torch.equal(inputs, rows[:, :-1]) and torch.equal(targets, rows[:, 1:])


def test_bidirectional_attention_sees_later_tokens_and_refuses_to_generate():
    torch.manual_seed(0)
    model = GPT(build_config("debug", vocab_size=VOCAB, block_size=32, attention="bidirectional"))
    x = torch.randint(2, VOCAB, (2, 16))
    changed = x.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(changed)
    assert not torch.allclose(a[:, :12], b[:, :12])  # earlier positions depend on later tokens
    with pytest.raises(ValueError, match="does not generate"):
        model(x, cache=KVCache(len(model.blocks)))
    with pytest.raises(ValueError, match="attention must be"):
        build_config("debug", attention="sideways")


def test_masked_lm_learns():
    """Rows count up by one (mod 10) from a random start: a masked token follows from its neighbours."""
    torch.manual_seed(0)
    model = GPT(build_config("debug", vocab_size=16, block_size=32, attention="bidirectional"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    obj = Objective("masked", mask_token_id=MASK, vocab_size=16, keep_ids=(EOS, MASK), seed=0)
    losses = []
    for step in range(150):
        start = torch.randint(0, 10, (16, 1))
        rows = 2 + (start + torch.arange(33)) % 10  # (16, 33) tokens 2..11
        inputs, targets = obj.train_pair(rows, 0, step, 0)
        _, loss = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-20:]) / 20
    assert first > 2.3 and last < 1.2, (first, last)  # ln 10 = 2.3: guessing among the ten symbols


def test_the_mask_token_must_be_in_the_tokenizer(tmp_path):
    from tokenizers import ByteLevelBPETokenizer

    from raylm.train.config import TrainConfig

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["some text to learn from"] * 20, vocab_size=270, special_tokens=["<|endoftext|>"],
                            show_progress=False)  # fmt: skip
    tok.save(str(tmp_path / "tokenizer.json"))

    class Meta:
        tokenizer_file = tmp_path / "tokenizer.json"
        eos_token_id = 0
        vocab_size = 270

    cfg = TrainConfig(data="d", output="o", objective="masked")
    with pytest.raises(InputError, match=r"tokenizer.json: no '<\|mask\|>' token for train.objective=masked"):
        build_objective(cfg, Meta, seed=0)
    assert build_objective(cfg.model_copy(update={"mask_token": "<|endoftext|>"}), Meta, seed=0).mask_token_id == 0
