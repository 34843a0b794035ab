"""Where a model's repeated blocks are (decoder/encoder layers)."""

from __future__ import annotations

import torch


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The ModuleList holding the repeated blocks (decoder/encoder layers), by structure."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) != n_layers:
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def layer_parameter_count(model: torch.nn.Module) -> int:
    """Parameters inside the repeated blocks (decoder/encoder layers): the sparsity denominator."""
    found = find_blocks(model)
    if found is None:
        return sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in found[1].parameters())


def check_windows_fit(config, windows: torch.Tensor) -> None:
    """Refuse calibration windows the model cannot read, before it runs on them: longer than its
    positions (GPT-2 would index out of range, Llama would run past what it was trained on) or holding
    token ids beyond its vocabulary (a tokenizer of another model)."""
    from ..errors import UserError

    if config is None or windows is None or windows.numel() == 0:
        return
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and windows.shape[-1] > positions:
        raise UserError(f"--seqlen {windows.shape[-1]} is longer than the {positions} positions the model has "
                        f"(max_position_embeddings); use --seqlen {positions} or less")
    vocab = getattr(config, "vocab_size", None)
    top = int(windows.max())
    if vocab and top >= vocab:
        raise UserError(f"the tokenizer produced token id {top}, but the model's vocabulary has {vocab} entries: the "
                        f"tokenizer does not belong to this model")
