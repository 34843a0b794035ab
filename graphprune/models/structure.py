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
