"""The InfoNCE loss of embedding models over in-batch negatives, and its calibration batches.

For a batch of B pairs with embeddings q_i, p_i,
    L = -1/B Σ_i log softmax_j( cos(q_i, p_j) / τ )[i],   τ = `TEMPERATURE` = 0.05,
i.e. every other positive of the batch is a negative of query i. τ = 0.05 is the scale 20 of
sentence-transformers' MultipleNegativesRankingLoss, with which all-MiniLM-L6-v2 was trained.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..models.encoders import Pooling, embed, tokenize
from .pairs import Pair

TEMPERATURE = 0.05


def info_nce(queries: torch.Tensor, positives: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE over in-batch negatives (see the module docstring)."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(queries.shape[0], device=queries.device))


def pair_batches(tokenizer: Any, pairs: list[Pair], *, max_length: int, batch_size: int):
    """[(query inputs, positive inputs)] of `batch_size` pairs each (a last smaller batch included
    when it has at least two pairs: one pair has no in-batch negative)."""
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        if len(chunk) < 2:
            continue
        batches.append((tokenize(tokenizer, [p.query for p in chunk], max_length),
                        tokenize(tokenizer, [p.positive for p in chunk], max_length)))
    if not batches:
        raise UserError("InfoNCE needs at least two pairs per batch; give more calibration pairs")
    return batches


def info_nce_step(model: torch.nn.Module, batch, pooling: Pooling, temperature: float = TEMPERATURE):
    """A closure computing the InfoNCE loss of one pair batch (for gradient collection)."""
    queries, positives = batch

    def loss() -> torch.Tensor:
        return info_nce(embed(model, queries, pooling), embed(model, positives, pooling), temperature)
    return loss
