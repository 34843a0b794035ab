"""Writers for pruned models."""

from .hf import load_pruned, prepare_output, save_pruned

__all__ = ["load_pruned", "prepare_output", "save_pruned"]
