from __future__ import annotations

import torch

from ..errors import ValidationError
from .base import Pass, PassError, PassResult, RewriteState


def check_runs(model: torch.nn.Module, vocab_size: int | None = None, seq_len: int = 8) -> None:
    """Run `model` on a few tokens: the output must be finite and shaped [1, seq_len, ...]."""
    config = getattr(model, "config", None)
    vocab = vocab_size or getattr(config, "vocab_size", 100)
    ids = (torch.arange(seq_len, dtype=torch.long) * 7919 % max(vocab - 1, 1)).unsqueeze(0)
    try:
        with torch.no_grad():
            out = model(input_ids=ids)
    except Exception as exc:  # noqa: BLE001 - any failure here means the rewrite is wrong
        raise ValidationError(f"the pruned model does not run: {type(exc).__name__}: {exc}") from exc
    tensor = getattr(out, "logits", None)
    if tensor is None:
        tensor = getattr(out, "last_hidden_state", out[0] if isinstance(out, (tuple, list)) else out)
    if not torch.isfinite(tensor).all():
        raise ValidationError("the pruned model produces NaN/Inf outputs; nothing was written")
    if tensor.shape[:2] != ids.shape:
        raise ValidationError(f"the pruned model's output has shape {tuple(tensor.shape)}")


class Validate(Pass[RewriteState]):
    """Run the rewritten model on a few tokens: logits must be finite and shaped as before."""

    name = "validate"

    def requires(self, rewrite: RewriteState) -> None:
        if rewrite.model is None:
            raise PassError("validation needs the rebuilt model")

    def call(self, rewrite: RewriteState) -> PassResult[RewriteState]:
        check_runs(rewrite.model)
        return PassResult(rewrite, False)
