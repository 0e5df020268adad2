"""Validation during training: which rows every evaluation reads, and the mean loss over them.

Each rank evaluates the first `eval_batches` micro-batches of its share of the validation split
in file order (no shuffling), read once and reused, so every evaluation of a run scores the same
tokens and its losses compare. Every rank gets the same number of batches: under ZeRO-3 every
forward pass is a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from raylm.tokenize.bpe import load_tokenizer
from raylm.tokenize.shards import TokenMeta, TokenSplit
from raylm.train.config import TrainConfig
from raylm.train.ingest import SequenceOrder, TokenStream
from raylm.train.metrics import target_bytes
from raylm.train.objectives import IGNORE_INDEX, Objective
from raylm.train.topology import RankCoords


def validation_order(cfg: TrainConfig, num_sequences: int, dp_size: int) -> tuple[SequenceOrder, int]:
    """(the validation split's order in file order, micro-batches per rank): which rows the evaluations read."""
    micro = max(1, min(cfg.micro_batch_size, num_sequences // dp_size))
    order = SequenceOrder(num_sequences, micro, dp_size, seed=0, shuffle=False)
    return order, min(cfg.eval_batches, order.batches_per_epoch)


def validation_tokens_per_byte(cfg: TrainConfig, meta: TokenMeta, tokenizer_file: str, dp_size: int) -> float | None:
    """Targets per UTF-8 byte of the validation rows all ranks evaluate together (end-of-text counts 0 bytes);
    None if they spell no text at all.

    Those rows are the first of the split in file order, so decoding their targets as one stream is exact.
    """
    order, count = validation_order(cfg, meta.num_sequences["validation"], dp_size)
    indices = np.sort(np.concatenate([order.epoch_indices(0, r)[:count].reshape(-1) for r in range(dp_size)]))
    rows = TokenSplit(meta, "validation").rows(indices)  # (N, T + 1)
    num_bytes = target_bytes(load_tokenizer(tokenizer_file), rows)
    return rows[:, 1:].size / num_bytes if num_bytes else None


@dataclass
class ValidationSet:
    """One rank's validation batches (N, T + 1) on its device, and their loss masks where the token data has them."""

    batches: list[torch.Tensor]
    masks: list[torch.Tensor] | None = None

    @classmethod
    def read(cls, cfg: TrainConfig, meta: TokenMeta, coords: RankCoords, device: torch.device) -> ValidationSet:
        """This rank's share of the validation rows every evaluation of the run scores."""
        order, count = validation_order(cfg, meta.num_sequences["validation"], coords.dp_size)
        stream = TokenStream(cfg.data, "validation", order, coords.dp_rank)
        batches = [torch.from_numpy(b).to(device) for b in stream.numpy_batches(epoch=0, count=count)]
        masks = None
        if meta.loss_mask:  # SFT data: only completion tokens are targets
            masks = [torch.from_numpy(m).to(device) for m in stream.numpy_mask_batches(epoch=0, count=count)]
        return cls(batches, masks)

    def pairs(self, objective: Objective, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of every batch: the same every evaluation (masked-LM masks are seeded by batch)."""
        masks = self.masks or [None] * len(self.batches)
        return [objective.eval_pair(b, rank, i, loss_mask=m) for i, (b, m) in enumerate(zip(self.batches, masks))]

    @torch.no_grad()
    def evaluate(self, engine, objective: Objective) -> float:
        """Mean cross-entropy per target token over every rank's batches, of a plain (non-pipeline) engine."""
        engine.eval()
        device = self.batches[0].device
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
        for inputs, targets in self.pairs(objective, dist.get_rank()):
            _, loss = engine(inputs, targets)
            tokens = int((targets != IGNORE_INDEX).sum())  # the loss is a mean over the targets that count
            if tokens == 0:
                continue  # a batch with nothing to predict (its loss is NaN)
            totals += torch.stack([loss.detach().double() * tokens, torch.tensor(float(tokens), device=device).double()])
        dist.all_reduce(totals)
        engine.train()
        return float(totals[0] / totals[1])
