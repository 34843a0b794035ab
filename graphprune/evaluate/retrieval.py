"""Retrieval evaluation of embedding models: recall@1 and MRR of each query's own positive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..calibration.pairs import Pair
from ..errors import UserError
from ..models.encoders import Pooling, embed, tokenize


@dataclass(frozen=True)
class RetrievalResult:
    recall_at_1: float
    mrr: float
    pairs: int
    ranks: tuple[int, ...] = ()  # per query, the rank of its own positive (1 = first): for paired comparisons


def encode(model: torch.nn.Module, tokenizer: Any, texts: list[str], pooling: Pooling, *, max_length: int = 256,
           batch_size: int = 32) -> torch.Tensor:
    """Embeddings of `texts` [n, hidden] without gradients."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                out.append(embed(model, tokenize(tokenizer, texts[start:start + batch_size], max_length), pooling))
    finally:
        model.train(was_training)
    return torch.cat(out)


def retrieval(model: torch.nn.Module, tokenizer: Any, pairs: list[Pair], pooling: Pooling, *,
              max_length: int = 256, batch_size: int = 32) -> RetrievalResult:
    """Each query retrieves among all positives of `pairs` by cosine similarity: recall@1 and MRR
    of its own positive. Ties rank pessimistically (the true positive after equal scores)."""
    if len(pairs) < 2:
        raise UserError("retrieval evaluation needs at least two pairs")
    q = F.normalize(encode(model, tokenizer, [p.query for p in pairs], pooling, max_length=max_length,
                           batch_size=batch_size).double(), dim=-1)
    d = F.normalize(encode(model, tokenizer, [p.positive for p in pairs], pooling, max_length=max_length,
                           batch_size=batch_size).double(), dim=-1)
    scores = q @ d.T
    own = scores.diagonal().unsqueeze(1)
    rank = (scores >= own).sum(1)  # 1 when the own positive beats every other
    return RetrievalResult(recall_at_1=float((rank == 1).double().mean()), mrr=float((1.0 / rank.double()).mean()),
                           pairs=len(pairs), ranks=tuple(rank.tolist()))
