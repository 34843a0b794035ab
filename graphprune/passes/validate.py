from __future__ import annotations

import torch

from ..errors import ValidationError


class Validate:
    """Run the rewritten model on a few tokens: logits must be finite and shaped as before."""

    def run(self, model: torch.nn.Module, vocab_size: int | None = None, seq_len: int = 8) -> None:
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
