"""One calibration set, ready for both kinds of statistics: token windows for the activation hooks
and loss closures for the gradient criteria.

Decoders: `nsamples` windows of `seqlen` tokens (see data/calibration.py), LM loss over
`batch_size` windows per step. Encoders (embedding models): `nsamples` (query, positive) pairs
from the calibration side of the pair split (see data/pairs.py), each text truncated to `seqlen`
tokens, InfoNCE over `batch_size` pairs per step; their activations are collected on windows of
the pairs' text, each framed by the tokenizer's special tokens ([CLS] ... [SEP]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..models.encoders import Pooling
from ..progress import in_stage
from .infonce import TEMPERATURE, info_nce_step, pair_batches
from .gradients import LossStep, lm_steps


def content_digest(windows: torch.Tensor, texts: list[str] = ()) -> str:
    """sha256 of what calibration feeds the model: the token windows (ids, as int64) and, for
    encoders, the texts of the pairs the gradient batches tokenize. Cache keys and the report carry
    it, so an edited calibration file never reuses statistics of its old content."""
    import hashlib

    from .cache import tensor_bytes

    h = hashlib.sha256(f"{tuple(windows.shape)}\0".encode())
    h.update(tensor_bytes(windows.to(torch.int64)))
    for text in texts:
        h.update(b"\0" + text.encode("utf-8"))
    return h.hexdigest()


@dataclass
class CalibrationSet:
    windows: torch.Tensor  # [nsamples, seqlen] token ids for activation statistics
    steps: list[LossStep]  # one loss closure per gradient batch
    note: dict  # what the run report says about this set


@in_stage("calibrate")
def calibration_set(model: torch.nn.Module, tokenizer: Any, source: str, *, encoder: bool, pooling: Pooling | None,
                    nsamples: int, seqlen: int, seed: int, batch_size: int) -> CalibrationSet:
    from .data import CalibrationData
    from .text import load_calibration, needs_bos, windows_from_text

    if isinstance(source, CalibrationData):
        source.capture(model)  # a forward loop runs once here, recording its input_ids

    if not encoder:
        windows = load_calibration(source, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                   add_bos=needs_bos(model))
        return CalibrationSet(windows, lm_steps(model, windows, batch_size),
                              {"source": str(source), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                               "loss": "lm", "sha256": content_digest(windows)})
    from .pairs import load_pairs, pair_text

    pooling = pooling or Pooling()
    pairs = load_pairs(source, "calibration", limit=nsamples, seed=seed)
    # [CLS] ... [SEP] around each window: the activation statistics (FLAP, least squares) must see
    # the special-token positions an encoder always has, and whose activations differ most.
    windows = windows_from_text(pair_text(pairs), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed,
                                framed=True, label=f"(pairs of {source})")
    steps = [info_nce_step(model, batch, pooling)
             for batch in pair_batches(tokenizer, pairs, max_length=seqlen, batch_size=batch_size)]
    return CalibrationSet(windows, steps, {
        "source": str(source), "pairs": len(pairs), "split": "calibration", "max_tokens": seqlen, "seed": seed,
        "loss": "infonce", "temperature": TEMPERATURE, "pairs_per_batch": batch_size, "pooling": pooling.mode,
        "nsamples": nsamples, "seqlen": seqlen, "windows": "framed by the special tokens",
        "sha256": content_digest(windows, [t for p in pairs for t in (p.query, p.positive)])})
