"""Embedding models (BERT-style encoders): pooling, the InfoNCE loss and retrieval evaluation.

Pooling follows the model's sentence-transformers configuration (``1_Pooling/config.json``;
mean, cls, max or mean-sqrt-len over the non-padding tokens) and defaults to mean pooling for a
bare Hugging Face encoder directory or module.

InfoNCE with in-batch negatives: for a batch of B pairs with embeddings q_i, p_i,
    L = -1/B Σ_i log softmax_j( cos(q_i, p_j) / τ )[i],   τ = `TEMPERATURE` = 0.05,
i.e. every other positive of the batch is a negative of query i. τ = 0.05 is the scale 20 of
sentence-transformers' MultipleNegativesRankingLoss, with which all-MiniLM-L6-v2 was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data.pairs import Pair
from .errors import UserError

TEMPERATURE = 0.05
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    normalize: bool = False  # sentence-transformers' Normalize module: unit-length embeddings


@dataclass(frozen=True)
class RetrievalResult:
    recall_at_1: float
    mrr: float
    pairs: int
    ranks: tuple[int, ...] = ()  # per query, the rank of its own positive (1 = first): for paired comparisons


def is_encoder(model: Any) -> bool:
    """An embedding model rather than a causal LM (judged from the config like the model loader)."""
    from .models.loading import _CAUSAL_LM_ARCHITECTURE_SUFFIXES, _is_causal_lm

    if type(model).__name__.endswith(_CAUSAL_LM_ARCHITECTURE_SUFFIXES):  # an in-memory LM whose config lists none
        return False
    config = getattr(model, "config", None)
    return config is not None and not _is_causal_lm(config)


def pooling_of(directory: str | Path | None) -> Pooling:
    """The pooling a sentence-transformers folder declares; mean pooling when it declares none."""
    if directory is None or not (Path(directory) / "modules.json").is_file():
        return Pooling()
    root = Path(directory)
    try:
        modules = json.loads((root / "modules.json").read_text(encoding="utf-8"))
        normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
        pooling_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
        if pooling_dir is None:
            return Pooling(normalize=normalize)
        config = json.loads((root / pooling_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"{root}: cannot read the sentence-transformers pooling configuration ({error})") from error
    modes = [mode for key, mode in POOLING_MODES.items() if config.get(key)]
    if len(modes) != 1:
        raise UserError(f"{root / pooling_dir / 'config.json'}: supported pooling is exactly one of "
                        f"{', '.join(POOLING_MODES.values())}; found {modes or 'none'}")
    return Pooling(mode=modes[0], normalize=normalize)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sentence embeddings [batch, hidden] from token states [batch, tokens, hidden]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if pooling.mode == "cls":
        out = hidden[:, 0]
    elif pooling.mode == "max":
        out = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    else:
        summed = (hidden * mask).sum(1)
        count = mask.sum(1).clamp_min(1.0)
        out = summed / (count.sqrt() if pooling.mode == "mean_sqrt_len" else count)
    return F.normalize(out, dim=-1) if pooling.normalize else out


def embed(model: torch.nn.Module, inputs: dict[str, torch.Tensor], pooling: Pooling) -> torch.Tensor:
    output = model(**inputs)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return pool(hidden, inputs["attention_mask"], pooling)


def info_nce(queries: torch.Tensor, positives: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """InfoNCE over in-batch negatives (see the module docstring)."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(positives, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(queries.shape[0], device=queries.device))


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    if len(texts) > 1 and getattr(tokenizer, "pad_token_id", None) is None:
        raise UserError("the tokenizer defines no padding token, which batches of texts of an embedding model need")
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


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
