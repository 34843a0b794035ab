"""Perplexity of a causal language model on a text.

Protocol (the one the project's benchmarks use): tokenize the whole text once without special
tokens, take the first `windows` non-overlapping windows of `seqlen` tokens, and report
PPL = exp(mean negative log-likelihood over every predicted token). Each window is scored on its
own (no context carried over), so a window of seqlen tokens predicts seqlen - 1 of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphprune.calibration.text import bos_token_id, needs_bos, tokenize_text
from graphprune.errors import UserError


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of `perplexity`.

    `windows` is the number of windows actually scored: fewer than requested when the text is short.
    `tokens` is the number of predicted tokens the mean NLL is taken over.
    """

    ppl: float
    nll_mean: float
    tokens: int
    windows: int
    window_nll: tuple[float, ...] = ()  # mean NLL of each window, in order: for paired comparisons of models


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    seqlen: int = 512,
    windows: int = 32,
    add_bos: bool | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of causal LM `model` on `text` over the first `windows` windows of `seqlen` tokens.

    `add_bos=None` decides from the model: Gemma models get BOS + seqlen - 1 text tokens per window,
    others seqlen text tokens. Raises UserError when the text is shorter than one window or the
    model does not produce logits.
    """
    for name, value in (("seqlen", seqlen), ("windows", windows), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if seqlen < 2:
        raise UserError("seqlen must be at least 2: a window of one token predicts nothing")
    if add_bos is None:
        add_bos = needs_bos(model)

    text_tokens_per_window = seqlen - 1 if add_bos else seqlen
    token_ids = tokenize_text(tokenizer, text)
    available_windows = token_ids.numel() // text_tokens_per_window
    if available_windows == 0:
        raise UserError(
            f"evaluation text has {token_ids.numel()} tokens; at least {text_tokens_per_window} are needed "
            f"for one window of {seqlen} tokens"
        )
    window_count = min(windows, available_windows)
    inputs = token_ids[: window_count * text_tokens_per_window].view(window_count, text_tokens_per_window)
    if add_bos:
        bos_column = torch.full((window_count, 1), bos_token_id(tokenizer), dtype=torch.long)
        inputs = torch.cat([bos_column, inputs], dim=1)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout would make the number noisy
    window_sums: list[float] = []
    try:
        progress_bar = tqdm(total=window_count, desc="perplexity", unit="window", disable=not progress)
        with torch.inference_mode(), progress_bar:
            for start in range(0, window_count, batch_size):
                batch = inputs[start : start + batch_size].to(device)
                window_sums += _window_nll_sums(model, batch)
                progress_bar.update(batch.shape[0])
    finally:
        model.train(was_training)

    predicted_tokens = window_count * (seqlen - 1)
    nll_mean = sum(window_sums) / predicted_tokens
    ppl = math.exp(nll_mean) if nll_mean < 709 else math.inf  # exp overflows a float beyond ~709
    return PerplexityResult(ppl=ppl, nll_mean=nll_mean, tokens=predicted_tokens, windows=window_count,
                            window_nll=tuple(total / (seqlen - 1) for total in window_sums))


def _window_nll_sums(model: torch.nn.Module, batch: torch.Tensor) -> list[float]:
    """Per window of the batch, the sum of -log p(token | previous tokens of its window)."""
    output = model(input_ids=batch, use_cache=False)
    logits = getattr(output, "logits", None)
    if logits is None:
        raise UserError(f"perplexity needs a causal language model; {type(model).__name__} returns no logits")
    # Position t predicts token t + 1; the last position predicts nothing (ignore_index), which
    # avoids copying the [batch, seqlen, vocab] logits into a shifted slice.
    targets = torch.full_like(batch, -100)
    targets[:, :-1] = batch[:, 1:]
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
    return nll.view(batch.shape).sum(dim=1).tolist()
