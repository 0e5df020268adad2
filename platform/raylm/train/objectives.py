"""Training objectives: what a row of token data becomes as (inputs, targets) for the model.

    causal  next-token prediction: inputs = row[:-1], targets = row[1:] (a decoder, GPT-style)
    masked  masked-language modelling (BERT): a fraction of the tokens is selected; of those 80% become the
            mask token, 10% a random token, 10% stay; the targets are the original tokens at the selected
            positions and -100 (ignored by the loss) elsewhere. The model attends bidirectionally.

Masks are drawn from a generator seeded by (seed, rank, step), so a resumed run masks the same way the
uninterrupted run would have, and validation uses one fixed set of masks, so its loss compares across evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from raylm.errors import InputError

IGNORE_INDEX = -100


def shift(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) rows -> inputs (B, T) = row[:-1], targets (B, T) = row[1:], each contiguous."""
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def masked_targets(targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Targets (B, T) with -100 (ignored by the loss) where the loss mask (B, T + 1) of their rows is 0.

    Token data with loss masks (tokenize.format sft) marks which ids are training targets: the
    completion, not the prompt. Target j of a row is id j + 1, so it takes mask column j + 1.
    """
    return targets.masked_fill(loss_mask[:, 1:] == 0, IGNORE_INDEX)


def mask_tokens(
    tokens: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    fraction: float,
    generator: torch.Generator,
    keep_ids: tuple[int, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of `tokens` (B, T) -> (inputs (B, T), targets (B, T) with -100 where not selected).

    Tokens in `keep_ids` (special tokens such as the document separator) are never selected.
    Random replacements are drawn from the whole vocabulary, as in BERT.
    """
    probs = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    selected = probs < fraction
    for token in keep_ids:
        selected &= tokens != token
    # A second draw splits the selected positions 80 / 10 / 10 into mask / random / unchanged.
    how = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    to_mask = selected & (how < 0.8)
    to_random = selected & (how >= 0.8) & (how < 0.9)
    random_ids = torch.randint(vocab_size, tokens.shape, generator=generator, device=tokens.device)
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_token_id), tokens)
    inputs = torch.where(to_random, random_ids.to(tokens.dtype), inputs)
    targets = torch.where(selected, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs.contiguous(), targets.contiguous()


@dataclass(frozen=True)
class Objective:
    """Turns token rows (B, T + 1) into (inputs, targets) for training and validation."""

    kind: str = "causal"
    """"causal" or "masked"."""
    mask_token_id: int | None = None
    vocab_size: int = 0
    mask_fraction: float = 0.15
    keep_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ("causal", "masked"):
            raise ValueError(f"objective must be 'causal' or 'masked', got {self.kind!r}")
        if self.kind == "masked" and self.mask_token_id is None:
            raise ValueError("the masked objective needs a mask token id")

    def _generator(self, device: torch.device, *key: int) -> torch.Generator:
        g = torch.Generator(device=device)
        seed = self.seed
        for k in key:  # a fixed mix of the key into one 63-bit seed
            seed = (seed * 1_000_003 + k + 1) % (2**63 - 1)
        g.manual_seed(seed)
        return g

    def _masked(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # Every position of the first T tokens is a prediction target candidate; the last column is unused
        # so that inputs have the same length T as under the causal objective.
        return mask_tokens(
            rows[:, :-1],
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            fraction=self.mask_fraction,
            generator=generator,
            keep_ids=self.keep_ids,
        )

    def train_pair(
        self, rows: torch.Tensor, rank: int, step: int, micro: int, loss_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of training rows, for micro-batch `micro` of optimizer step `step` on `rank`.

        loss_mask: the rows' loss masks (B, T + 1) where the token data has them: only masked-in targets count.
        """
        if self.kind == "causal":
            inputs, targets = shift(rows)
        else:
            inputs, targets = self._masked(rows, self._generator(rows.device, 1, rank, step, micro))
        return inputs, targets if loss_mask is None else masked_targets(targets, loss_mask)

    def eval_pair(
        self, rows: torch.Tensor, rank: int, index: int, loss_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of validation batch `index`: the same masks at every evaluation."""
        if self.kind == "causal":
            inputs, targets = shift(rows)
        else:
            inputs, targets = self._masked(rows, self._generator(rows.device, 2, rank, index))
        return inputs, targets if loss_mask is None else masked_targets(targets, loss_mask)


def build_objective(train_cfg, meta, seed: int, section: str = "train") -> Objective:
    """The Objective of a TrainConfig for its token data (raylm.tokenize.shards.TokenMeta), resolved on the driver.

    The masked objective looks its mask token up in the data's tokenizer: a tokenizer without it is an
    InputError naming the file and the setting that adds it.
    """
    if train_cfg.objective == "causal":
        return Objective("causal", seed=seed)
    tokenizer = Tokenizer.from_file(str(meta.tokenizer_file))
    mask_id = tokenizer.token_to_id(train_cfg.mask_token)
    if mask_id is None:
        raise InputError(
            f"{meta.tokenizer_file}: no {train_cfg.mask_token!r} token for {section}.objective=masked; add it to "
            f"tokenize.special_tokens and tokenize again, or set {section}.mask_token to one the tokenizer has"
        )
    specials = tuple(sorted({meta.eos_token_id, mask_id}))
    return Objective(
        "masked",
        mask_token_id=mask_id,
        vocab_size=meta.vocab_size,
        mask_fraction=train_cfg.mask_fraction,
        keep_ids=specials,
        seed=seed,
    )
